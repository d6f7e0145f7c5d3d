"""Entries: a validated one without its number yet, a committed one, and what
a post returns. They are built a thousand at a time per batch, so they are
slotted and not frozen (a frozen dataclass's __init__ is several times
slower); nothing mutates them: treat them as values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple


class Posting(NamedTuple):
    """One movement of an entry: `amount` of `asset` from credit to debit."""

    debit_account: str
    credit_account: str
    amount: int
    asset: str


@dataclass(slots=True)
class NewEntry:
    """A validated entry that has no number yet: either the single pair of
    fields (debit_account .. asset), or `postings` with those fields empty."""

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
    # The multi-posting form (empty: the single pair above), in order.
    postings: tuple[Posting, ...] = ()
    # The entry it reverses (ReverseEntry); 0: none.
    reverses_sequence: int = 0

    def all_postings(self) -> tuple[Posting, ...]:
        """Every posting, whichever form the entry was posted in."""
        if self.postings:
            return self.postings
        return (Posting(self.debit_account, self.credit_account, self.amount, self.asset),)

    def differing_fields(self, other: NewEntry) -> list[str]:
        """Payload fields (not ledger or key) whose values differ from `other`.
        The same postings in the same order are the same payload."""
        names = (
            "debit_account",
            "credit_account",
            "amount",
            "asset",
            "entry_type",
            "description",
            "postings",
            "reverses_sequence",
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


class Balance(NamedTuple):
    """An account's totals in one asset right after some entry (a tuple:
    a batch makes two per entry, and tuples are cheap to make and sort)."""

    account: str
    asset: str
    debits: int
    credits: int

    @property
    def balance(self) -> int:
        return self.debits - self.credits


@dataclass(slots=True)
class PostResult:
    entry: Entry
    replayed: bool
    # The touched accounts' totals right after `entry`, by (account, asset).
    balances: tuple[Balance, ...] = ()


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
