"""The errors use cases raise on purpose. Which status code and which stable
reason (the contract's ErrorReason) each becomes is the gRPC edge's business:
one table, api/errors.py."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from .limits import INT64_MAX


class LedgerError(Exception):
    """Base of every error a use case raises on purpose."""

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(LedgerError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message, {"fields": ",".join(v.field for v in violations)})


class CounterNotInitialized(LedgerError):
    def __init__(self, ledger: str) -> None:
        super().__init__(
            f"ledger {ledger!r} has no counter: call InitializeCounter "
            f"(or `ledger-service init-counter --ledger {ledger}`) first",
            {"ledger": ledger},
        )


class IdempotencyConflict(LedgerError):
    def __init__(
        self, ledger: str, key: str, sequence: int, fields: list[str], index: int | None = None
    ) -> None:
        self.fields = fields
        where = "" if index is None else f"entries[{index}]: "
        metadata = {"ledger": ledger, "sequence": str(sequence), "fields": ",".join(fields)}
        if index is not None:
            metadata["index"] = str(index)
        super().__init__(
            f"{where}idempotency_key {key!r} was already used in ledger {ledger!r} by entry "
            f"{sequence} with a different payload; differing fields: {', '.join(fields)}",
            metadata,
        )


class AccountTotalOverflow(LedgerError):
    def __init__(self, ledger: str) -> None:
        super().__init__(
            f"posting would overflow an account total in ledger {ledger!r} "
            f"(totals are limited to {INT64_MAX}); nothing was written",
            {"ledger": ledger},
        )


class Overloaded(LedgerError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this server already has {limit} posts waiting to be written; "
            "retry later with the same idempotency key",
            {"limit": str(limit)},
        )


class PositionAhead(LedgerError):
    def __init__(
        self, ledger: str, after_sequence: int, head: int, field: str = "after_sequence"
    ) -> None:
        super().__init__(
            f"{field} {after_sequence} is beyond ledger {ledger!r}'s last entry {head}: "
            "this position does not belong to this ledger's history",
            {"ledger": ledger, "head_sequence": str(head)},
        )


class BalanceLimitExceeded(LedgerError):
    """A post would take an account beyond a balance limit (or a new limit
    is already broken); nothing was written."""

    def __init__(
        self,
        ledger: str,
        account: str,
        asset: str,
        limit_name: str,
        limit: int,
        would_reach: int,
        index: int | None = None,
        *,
        already: bool = False,
    ) -> None:
        what = "debits - credits" if limit_name == "max_net_debit" else "credits - debits"
        where = "" if index is None else f"entries[{index}]: "
        if already:
            text = (
                f"account {account!r} {asset} in ledger {ledger!r}: {what} is {would_reach}"
                f" now, which already breaks the new {limit_name} {limit}; nothing was changed"
            )
        else:
            text = (
                f"{where}account {account!r} {asset} in ledger {ledger!r}: {what} would reach"
                f" {would_reach}, beyond its {limit_name} {limit}; nothing was written"
            )
        metadata = {
            "ledger": ledger,
            "account": account,
            "asset": asset,
            limit_name: str(limit),
            "limit": limit_name,
            "would_reach": str(would_reach),
        }
        if index is not None:
            metadata["index"] = str(index)
        super().__init__(text, metadata)
        self.index = index


class AlreadyReversed(LedgerError):
    def __init__(self, ledger: str, sequence: int, reversed_by: int) -> None:
        super().__init__(
            f"entry {sequence} of ledger {ledger!r} was already reversed by entry {reversed_by}"
            " (with another idempotency key); an entry is reversed at most once",
            {"ledger": ledger, "sequence": str(sequence), "reversed_by": str(reversed_by)},
        )


class EntryNotFound(LedgerError):
    def __init__(self, ledger: str, which: str) -> None:
        super().__init__(f"ledger {ledger!r} has no entry with {which}", {"ledger": ledger})


class ConsumerBehind(LedgerError):
    """An ack below the consumer's stored position, which only moves forward."""

    def __init__(self, ledger: str, consumer: str, sequence: int, stored: int) -> None:
        super().__init__(
            f"consumer {consumer!r} of ledger {ledger!r} is already at {stored}: positions "
            f"only move forward, so {sequence} was not stored",
            {"ledger": ledger, "consumer": consumer, "sequence": str(stored)},
        )


class StandbyBehind(LedgerError):
    """The hot standby has not replayed what the primary has and the read needs."""

    def __init__(self, ledger: str, replayed: int | None, waited: float) -> None:
        where = "no counter" if replayed is None else f"entry {replayed}"
        super().__init__(
            f"the standby serving reads has replayed ledger {ledger!r} only to {where}, "
            f"behind the primary, after waiting {waited:g}s; retry",
            {"ledger": ledger, "replayed_sequence": str(replayed or 0)},
        )


class StorageUnavailable(LedgerError):
    """The database could not do the work now; the message says why."""


class DeadlineExceeded(LedgerError):
    """The callers' deadline passed before the work was done."""


class Unauthenticated(LedgerError):
    """No credentials, or credentials nobody is known by."""


class PermissionDenied(LedgerError):
    """A known principal without the role the call needs."""


class TooManyStreams(LedgerError):
    """A principal already holds its quota of following streams."""

    def __init__(self, principal: str, limit: int) -> None:
        super().__init__(
            f"{principal} already follows {limit} streams on this server, its limit: "
            "close one, or follow from another server",
            {"limit": str(limit)},
        )


def check_deadline(deadline: float | None) -> None:
    """Refuses to send a write once the callers' deadline (a time.monotonic()
    value, None for none) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        # The caller has already been told DEADLINE_EXCEEDED; do not make
        # the outcome depend on a race with it. (A commit that started in
        # time may still finish late: retrying with the same key is safe.)
        raise DeadlineExceeded("deadline exceeded before commit; nothing was written")
