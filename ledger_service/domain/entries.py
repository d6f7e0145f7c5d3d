"""Entries: a validated one without its number yet, a committed one, and what
a post returns. They are built a thousand at a time per batch, so they are
slotted and not frozen (a frozen dataclass's __init__ is several times
slower); nothing mutates them: treat them as values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(slots=True)
class NewEntry:
    """A validated entry that has no number yet."""

    ledger: str
    idempotency_key: str
    debit_account: str
    credit_account: str
    amount: int
    asset: str
    entry_type: str = ""
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Its ledger.v1.Entry encoding (without sequence and created_at) when the
    # edge already has it (see wire.py); not part of the value.
    encoded: bytes | None = field(default=None, compare=False, repr=False)
    # The principal that posts it (empty: auth is off). Not part of the
    # payload a replay compares: the same key and payload replay whoever asks.
    posted_by: str = ""

    def differing_fields(self, other: NewEntry) -> list[str]:
        """Payload fields (not ledger or key) whose values differ from `other`."""
        names = (
            "debit_account",
            "credit_account",
            "amount",
            "asset",
            "entry_type",
            "description",
        )
        fields = [n for n in names if getattr(self, n) != getattr(other, n)]
        if dict(self.metadata) != dict(other.metadata):
            fields.append("metadata")
        return fields


@dataclass(slots=True)
class Entry:
    """A committed entry with its number."""

    sequence: int
    created_at: datetime
    payload: NewEntry
    # The payload's ledger.v1.Entry encoding when storage has it at hand (a
    # cache for the gRPC edge, see wire.py; not part of the value).
    payload_wire: bytes | None = field(default=None, compare=False, repr=False)
    # Its link in the ledger's hash chain (domain/chain.py); b"" for a row
    # restored without one.
    hash: bytes = b""


@dataclass(slots=True)
class PostResult:
    entry: Entry
    replayed: bool


@dataclass(frozen=True)
class Counter:
    ledger: str
    value: int
    created: bool
    initialized_by: str = ""  # who created it ("" when not recorded)
    initialized_at: datetime | None = None
    head_hash: bytes = b""  # the hash of entry `value` (b"": none yet)


# One entry of a batch, without `ledger`, in NewEntry's field order:
# idempotency_key, debit_account, credit_account, amount, asset, entry_type,
# description, metadata, encoded.
EntryFields = tuple[str, str, str, int, str, str, str, Mapping[str, str], bytes | None]


# created_at as the wire and the hash chain carry it: microseconds since the
# epoch (the database clock keeps microseconds).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def from_epoch_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def epoch_micros(value: datetime) -> int:
    if value.tzinfo is None:  # naive values are UTC (SQLite)
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND
