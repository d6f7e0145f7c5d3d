"""Use cases: plain functions of plain values over a unit of work.

Blocking (they run database statements); the gRPC edge calls them from a
thread pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..domain.accounts import AccountView
from ..domain.entries import Counter, Entry, NewEntry, PostResult
from ..domain.errors import (
    AccountTotalOverflow,
    CounterNotInitialized,
    IdempotencyConflict,
    LedgerError,
    PositionAhead,
)
from .ports import (
    DuplicateIdempotencyKey,
    EntryRows,
    NewEntryWriter,
    TotalsOutOfRange,
    UowFactory,
)

# A same-key race costs one retry: the loser's insert fails on the unique key
# only after the winner committed, so the next attempt finds the winner's entry.
_KEY_RACE_ATTEMPTS = 3

# What one entry of a group commit gets back: its result, or its own error.
Outcome = PostResult | LedgerError


class _LookUpFirst(Exception):
    """An optimistic write met a key already stored (or no counter): redo it
    with the idempotency lookup."""


class _SplitBatch(Exception):
    """A group-commit batch hit something that only one of its entries may
    deserve (an overflowing total, a key a concurrent transaction just took):
    the transaction is rolled back and its entries are retried one by one."""


def initialize_counter(uow_factory: UowFactory, ledger: str, initialized_by: str = "") -> Counter:
    """The ledger's counter, created (by `initialized_by`) if it did not exist."""
    with uow_factory(write=True) as uow:
        created = uow.ledger.create_counter(ledger, initialized_by)
        if created is not None:
            uow.commit()
            return created
        existing = uow.ledger.counter(ledger)
    # ON CONFLICT DO NOTHING returned nothing, so the row exists and is committed.
    assert existing is not None
    return existing


def post_entry(
    uow_factory: UowFactory, entry: NewEntry, timeout: float | None = None
) -> PostResult:
    """Stores `entry` with the ledger's next number, or replays its key."""
    outcome = _post_one(uow_factory, entry, timeout)
    if isinstance(outcome, LedgerError):
        raise outcome
    return outcome


def post_group(
    uow_factory: UowFactory,
    batch: Sequence[NewEntry],
    timeout: float | None = None,
    *,
    look_up_first: bool = False,
) -> list[Outcome]:
    """Group commit: independent posts of one ledger in ONE transaction (one
    counter bump, contiguous numbers). Each entry gets its own outcome: a
    replay, a conflict or an error of its own does not stop the others.
    `look_up_first`: skip the optimistic write (post_new was just refused)."""
    try:
        return _write_with_fallback(
            uow_factory, batch, timeout, atomic=False, look_up_first=look_up_first
        )
    except _SplitBatch:
        return [_post_one(uow_factory, entry, timeout) for entry in batch]


def post_atomic(
    uow_factory: UowFactory,
    batch: Sequence[NewEntry],
    timeout: float | None = None,
    *,
    look_up_first: bool = False,
) -> list[PostResult]:
    """All of `batch` commits with contiguous numbers, or nothing does. Keys
    already posted with the same payload replay and take no number. Its keys
    are distinct (validate_batch refuses a batch that repeats one)."""
    for _ in range(_KEY_RACE_ATTEMPTS):
        try:
            outcomes = _write_with_fallback(
                uow_factory, batch, timeout, atomic=True, look_up_first=look_up_first
            )
        except _SplitBatch:
            continue  # a concurrent post took one of the keys: look again
        return [o for o in outcomes if isinstance(o, PostResult)]
    raise RuntimeError("idempotency keys kept racing; giving up")


async def post_new(
    writer: NewEntryWriter, batch: Sequence[NewEntry], time_left: float | None
) -> list[PostResult] | None:
    """The common case of post_group and post_atomic, on the event loop:
    every key of `batch` new (and distinct), so every entry is stored with
    the next numbers, in order. None, with nothing written, when that is not
    so; post_group or post_atomic (look_up_first=True) then decide."""
    if len({e.idempotency_key for e in batch}) < len(batch):
        return None  # repeated keys replay each other: the careful path's job
    numbered = await writer.add_new_entries(batch[0].ledger, batch, time_left)
    if numbered is None:
        return None
    return [PostResult(entry, replayed=False) for entry in numbered.entries()]


def _post_one(uow_factory: UowFactory, entry: NewEntry, timeout: float | None) -> Outcome:
    for _ in range(_KEY_RACE_ATTEMPTS):
        try:
            return _write_with_fallback(uow_factory, [entry], timeout, atomic=False)[0]
        except _SplitBatch:
            continue  # the same key was committed concurrently: replay it now
        except LedgerError as exc:
            return exc
    raise RuntimeError(f"idempotency key {entry.idempotency_key!r} kept racing; giving up")


def _write_with_fallback(
    uow_factory: UowFactory,
    batch: Sequence[NewEntry],
    timeout: float | None,
    *,
    atomic: bool,
    look_up_first: bool = False,
) -> list[Outcome]:
    """Writes as if every key were new (no lookup round trip: the common
    case); if one was not, the unique key refuses the insert, the transaction
    rolls back whole, and the write is redone with the lookup."""
    if not look_up_first:
        try:
            return _write(uow_factory, batch, timeout, atomic=atomic, optimistic=True)
        except _LookUpFirst:
            pass
    return _write(uow_factory, batch, timeout, atomic=atomic, optimistic=False)


def _write(
    uow_factory: UowFactory,
    batch: Sequence[NewEntry],
    timeout: float | None,
    *,
    atomic: bool,
    optimistic: bool,
) -> list[Outcome]:
    """The one write path. Order: idempotency lookup (unless optimistic),
    then account totals and only then the counter (storage/numbering.py), so
    every way to fail comes before a number is taken, and the counter lock is
    held for the insert and the commit only.
    An optimistic write that fails in any way raises _LookUpFirst: only the
    careful write decides what the caller hears."""
    ledger = batch[0].ledger
    outcomes: list[Outcome | None] = [None] * len(batch)
    first_of_key: dict[str, int] = {}
    fresh: list[int] = []
    with uow_factory(write=True, timeout=timeout) as uow:
        stored = (
            {}
            if optimistic
            else uow.ledger.find_by_keys(ledger, {e.idempotency_key for e in batch})
        )
        for i, entry in enumerate(batch):
            existing = stored.get(entry.idempotency_key)
            if existing is not None:
                outcome = _replay(existing, entry, i if atomic else None)
                if atomic and isinstance(outcome, LedgerError):
                    raise outcome
                outcomes[i] = outcome
            elif entry.idempotency_key not in first_of_key:
                first_of_key[entry.idempotency_key] = i
                fresh.append(i)
        if fresh:
            new = [batch[i] for i in fresh]
            try:
                appended = uow.ledger.add_entries(ledger, new)
            except TotalsOutOfRange as exc:
                if optimistic:
                    raise _LookUpFirst() from exc  # a replay's amount may have been counted
                if atomic or len(batch) == 1:
                    raise AccountTotalOverflow(ledger) from exc
                raise _SplitBatch() from exc
            except DuplicateIdempotencyKey as exc:
                raise (_LookUpFirst() if optimistic else _SplitBatch()) from exc
            if appended is None and optimistic:
                raise _LookUpFirst()
            if appended is None:
                raise CounterNotInitialized(ledger) if atomic or len(batch) == 1 else _SplitBatch()
            uow.commit()
            for i, entry_ in zip(fresh, appended.entries(), strict=True):
                outcomes[i] = PostResult(entry_, replayed=False)
    # A key repeated within one group: later copies replay the first (or
    # conflict with it), exactly as if they had arrived after it.
    for i, entry in enumerate(batch):
        if outcomes[i] is None:
            first = outcomes[first_of_key[entry.idempotency_key]]
            assert first is not None
            outcomes[i] = (
                _replay(first.entry, entry, None) if isinstance(first, PostResult) else first
            )
    return [o for o in outcomes if o is not None]


def _replay(existing: Entry, requested: NewEntry, index: int | None) -> Outcome:
    """Same key, same payload: the original entry. Same key, other payload: conflict."""
    differing = existing.payload.differing_fields(requested)
    if differing:
        return IdempotencyConflict(
            requested.ledger, requested.idempotency_key, existing.sequence, differing, index
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


def read_rows(uow_factory: UowFactory, ledger: str, after_sequence: int, limit: int) -> EntryRows:
    with uow_factory() as uow:
        return uow.ledger.rows_after(ledger, after_sequence, limit)


def get_account(uow_factory: UowFactory, ledger: str, account: str) -> AccountView:
    with uow_factory() as uow:
        view = uow.ledger.account_view(ledger, account)
    if view is None:
        raise CounterNotInitialized(ledger)
    return view


def get_ledger(uow_factory: UowFactory, ledger: str) -> Counter:
    """The ledger's counter: its head number and head hash, read together."""
    with uow_factory() as uow:
        counter = uow.ledger.counter(ledger)
    if counter is None:
        raise CounterNotInitialized(ledger)
    return counter
