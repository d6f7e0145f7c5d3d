"""Use cases: plain functions of plain values over a unit of work.

Blocking (they run database statements); the gRPC edge calls them from a
thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from .domain import (
    AccountView,
    Counter,
    CounterNotInitialized,
    Entry,
    IdempotencyConflict,
    NewEntry,
    PositionAhead,
    PostResult,
    TotalOverflow,
)
from .storage.repository import DuplicateIdempotencyKey, LedgerRepository, Page


class UnitOfWork(Protocol):
    ledger: LedgerRepository

    def __enter__(self) -> UnitOfWork: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def commit(self) -> None: ...


# uow_factory(write=..., timeout=...) -> UnitOfWork
UowFactory = Callable[..., UnitOfWork]

# A same-key race costs one retry: the loser's insert fails on the unique key
# only after the winner committed, so the next attempt finds the winner's entry.
_KEY_RACE_ATTEMPTS = 3


def initialize_counter(uow_factory: UowFactory, ledger: str) -> Counter:
    with uow_factory(write=True) as uow:
        value = uow.ledger.create_counter(ledger)
        if value is not None:
            uow.commit()
            return Counter(ledger, value, created=True)
        existing = uow.ledger.counter_value(ledger)
    # ON CONFLICT DO NOTHING returned nothing, so the row exists and is committed.
    assert existing is not None
    return Counter(ledger, existing, created=False)


def post_entry(
    uow_factory: UowFactory, entry: NewEntry, timeout: float | None = None
) -> PostResult:
    """Stores `entry` with the ledger's next number, or replays its key.

    Order inside the transaction: idempotency lookup, account totals, and only
    then the counter (storage/numbering.py), so every way to fail happens
    before a number is taken, and the counter lock is held for one statement.
    """
    for _ in range(_KEY_RACE_ATTEMPTS):
        try:
            with uow_factory(write=True, timeout=timeout) as uow:
                existing = uow.ledger.find_by_key(entry.ledger, entry.idempotency_key)
                if existing is not None:
                    return _replay(existing, entry)
                if not uow.ledger.add_to_account_totals(entry):
                    raise TotalOverflow(entry.ledger)
                stored = uow.ledger.append(entry)
                if stored is None:
                    raise CounterNotInitialized(entry.ledger)
                uow.commit()
                return PostResult(stored, replayed=False)
        except DuplicateIdempotencyKey:
            continue
    raise RuntimeError(f"idempotency key {entry.idempotency_key!r} kept racing; giving up")


def _replay(existing: Entry, requested: NewEntry) -> PostResult:
    """Same key, same payload: the original entry. Same key, other payload: conflict."""
    differing = existing.payload.differing_fields(requested)
    if differing:
        raise IdempotencyConflict(
            requested.ledger, requested.idempotency_key, existing.sequence, differing
        )
    return PostResult(existing, replayed=True)


def stream_start(uow_factory: UowFactory, ledger: str, after_sequence: int) -> int:
    """Checks a stream's start position; returns the ledger's current head."""
    with uow_factory() as uow:
        head = uow.ledger.counter_value(ledger)
    if head is None:
        raise CounterNotInitialized(ledger)
    if after_sequence > head:
        raise PositionAhead(ledger, after_sequence, head)
    return head


def read_page(uow_factory: UowFactory, ledger: str, after_sequence: int, limit: int) -> Page:
    with uow_factory() as uow:
        return uow.ledger.page_after(ledger, after_sequence, limit)


def get_account(uow_factory: UowFactory, ledger: str, account: str) -> AccountView:
    with uow_factory() as uow:
        view = uow.ledger.account_view(ledger, account)
    if view is None:
        raise CounterNotInitialized(ledger)
    return view
