"""Use cases: plain functions of plain values over a unit of work.

Blocking (they run database statements); the gRPC edge calls them from a
thread pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from ..domain.accounts import AccountView, AssetTotals
from ..domain.balances import Breach, Limits
from ..domain.consumers import Acked, ConsumerPosition
from ..domain.entries import Counter, Entry, NewEntry, Posting, PostResult
from ..domain.errors import (
    AccountTotalOverflow,
    AlreadyReversed,
    BalanceLimitExceeded,
    ConsumerBehind,
    CounterNotInitialized,
    EntryNotFound,
    IdempotencyConflict,
    LedgerError,
    PositionAhead,
)
from .ports import (
    DuplicateIdempotencyKey,
    EntryRows,
    LimitBreached,
    LimitsBroken,
    NewEntryWriter,
    ReversalTaken,
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
    return numbered.results()


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
        replays = [o for o in outcomes if isinstance(o, PostResult)]
        # A replay's totals are those right after its original entry.
        for replay, balances in zip(
            replays, uow.ledger.balances_at([r.entry for r in replays]), strict=True
        ):
            replay.balances = balances
        while fresh:
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
            except ReversalTaken as exc:
                if optimistic:
                    raise _LookUpFirst() from exc
                if len(batch) > 1:
                    raise _SplitBatch() from exc
                winner = uow.ledger.reversal_of(ledger, batch[0].reverses_sequence)
                if winner is None or winner.payload.idempotency_key == batch[0].idempotency_key:
                    # Rolled back meanwhile, or this very reversal committed
                    # by a concurrent retry: _post_one tries again (replays).
                    raise _SplitBatch() from exc
                raise AlreadyReversed(ledger, batch[0].reverses_sequence, winner.sequence) from exc
            except LimitBreached as exc:
                if optimistic:
                    raise _LookUpFirst() from exc  # a replay's amount may have been counted
                if not exc.refused:  # the database's last guard: a bug to look into
                    raise RuntimeError("a balance limit's check refused a write") from exc
                earliest = min(exc.refused)
                if atomic or len(batch) == 1:
                    where = fresh[earliest] if atomic else None
                    raise _limit_error(ledger, exc.refused[earliest], where) from exc
                # Only those posts fail (taken in order, each refused one
                # moving nothing); the others are written without them.
                for k in sorted(exc.refused, reverse=True):
                    outcomes[fresh.pop(k)] = _limit_error(ledger, exc.refused[k], None)
                continue
            if appended is None and optimistic:
                raise _LookUpFirst()
            if appended is None:
                raise CounterNotInitialized(ledger) if atomic or len(batch) == 1 else _SplitBatch()
            uow.commit()
            for i, result in zip(fresh, appended.results(), strict=True):
                outcomes[i] = result
            break
    # A key repeated within one group: later copies replay the first (or
    # conflict with it), exactly as if they had arrived after it.
    for i, entry in enumerate(batch):
        if outcomes[i] is None:
            first = outcomes[first_of_key[entry.idempotency_key]]
            assert first is not None
            if isinstance(first, PostResult):
                again = _replay(first.entry, entry, None)
                if isinstance(again, PostResult):
                    again.balances = first.balances
                outcomes[i] = again
            else:
                outcomes[i] = first
    return [o for o in outcomes if o is not None]


def _limit_error(ledger: str, b: Breach, index: int | None) -> BalanceLimitExceeded:
    return BalanceLimitExceeded(
        ledger, b.account, b.asset, b.limit_name, b.limit, b.would_reach, index
    )


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


def read_rows(
    uow_factory: UowFactory, ledger: str, after_sequence: int, limit: int, account: str = ""
) -> EntryRows:
    """Entries after a number: all of them, or (`account`) those with a
    posting of the account, found by its index."""
    with uow_factory() as uow:
        if account:
            return uow.ledger.rows_touching(ledger, account, after_sequence, limit)
        return uow.ledger.rows_after(ledger, after_sequence, limit)


def consumer_position(uow_factory: UowFactory, ledger: str, consumer: str) -> int:
    """Where a named consumer's stream starts: after its stored position, 0
    if it never acked."""
    with uow_factory() as uow:
        return uow.ledger.position(ledger, consumer) or 0


def ack_entries(uow_factory: UowFactory, ledger: str, consumer: str, sequence: int) -> Acked:
    """Stores the consumer's position: forward only, never above the head;
    the same position again is a success (with its first time)."""
    with uow_factory(write=True) as uow:
        head = uow.ledger.counter_value(ledger)
        if head is None:
            raise CounterNotInitialized(ledger)
        if sequence > head:
            raise PositionAhead(ledger, sequence, head, "sequence")
        stored = uow.ledger.store_position(ledger, consumer, sequence, datetime.now(UTC))
        uow.commit()
    if stored.sequence > sequence:
        raise ConsumerBehind(ledger, consumer, sequence, stored.sequence)
    return Acked(stored, head)


def list_consumers(uow_factory: UowFactory, ledger: str) -> tuple[list[ConsumerPosition], int]:
    """The ledger's consumers by name, and the head their lag is measured from."""
    with uow_factory() as uow:
        listed = uow.ledger.consumers(ledger)
    if listed is None:
        raise CounterNotInitialized(ledger)
    return listed


def consumer_lags(uow_factory: UowFactory) -> list[tuple[str, str, int]]:
    with uow_factory() as uow:
        return uow.ledger.consumer_lags()


def get_account(
    uow_factory: UowFactory, ledger: str, account: str, as_of_sequence: int = 0
) -> AccountView:
    """An account's totals per asset, now or as of entry `as_of_sequence`."""
    with uow_factory() as uow:
        view = uow.ledger.account_view(ledger, account, as_of_sequence)
    if view is None:
        raise CounterNotInitialized(ledger)
    if as_of_sequence > view.as_of_sequence:
        raise PositionAhead(ledger, as_of_sequence, view.as_of_sequence, "as_of_sequence")
    return view


def set_account_limits(
    uow_factory: UowFactory, ledger: str, account: str, asset: str, limits: Limits
) -> tuple[AssetTotals, int]:
    """Creates or replaces the account's limits in `asset`; returns its totals
    with them and the number they are as of."""
    for _ in range(_KEY_RACE_ATTEMPTS):
        with uow_factory(write=True) as uow:
            try:
                created = uow.ledger.set_limits(ledger, account, asset, limits)
            except LimitsBroken as exc:
                broken = limits.breach(exc.debits, exc.credits)
                if broken is None:
                    continue  # a post moved the totals since: try again
                name, limit, value = broken
                raise BalanceLimitExceeded(
                    ledger, account, asset, name, limit, value, already=True
                ) from exc
            if not created:
                raise CounterNotInitialized(ledger)
            uow.commit()
            break
    else:
        raise RuntimeError("the account's totals kept moving across the limits; giving up")
    view = get_account(uow_factory, ledger, account)
    totals = next(b for b in view.balances if b.asset == asset)
    return totals, view.as_of_sequence


def get_entry(
    uow_factory: UowFactory,
    ledger: str,
    sequence: int | None = None,
    idempotency_key: str | None = None,
) -> Entry:
    with uow_factory() as uow:
        entry = uow.ledger.entry(ledger, sequence, idempotency_key)
        if entry is None and uow.ledger.counter_value(ledger) is None:
            raise CounterNotInitialized(ledger)
    if entry is None:
        which = f"sequence {sequence}" if sequence is not None else f"key {idempotency_key!r}"
        raise EntryNotFound(ledger, which)
    return entry


def reverse_entry(
    uow_factory: UowFactory,
    ledger: str,
    sequence: int,
    idempotency_key: str,
    description: str = "",
    posted_by: str = "",
    timeout: float | None = None,
) -> PostResult:
    """Posts the reversal of entry `sequence`: every posting swapped, with
    reverses_sequence set. At most one per entry (the database's unique
    index decides races); the same key replays."""
    with uow_factory() as uow:
        original = uow.ledger.entry(ledger, sequence)
        if original is None:
            if uow.ledger.counter_value(ledger) is None:
                raise CounterNotInitialized(ledger)
            raise EntryNotFound(ledger, f"sequence {sequence}")
        earlier = uow.ledger.reversal_of(ledger, sequence)
    if earlier is not None and earlier.payload.idempotency_key != idempotency_key:
        raise AlreadyReversed(ledger, sequence, earlier.sequence)
    reversal = reversal_of(original, idempotency_key, description, posted_by)
    return post_entry(uow_factory, reversal, timeout)


def reversal_of(
    original: Entry, idempotency_key: str, description: str, posted_by: str
) -> NewEntry:
    """The entry that undoes `original`: the same postings, debit and credit
    exchanged, in the same form. Its type and metadata are its own (empty):
    `reverses_sequence` says what it is."""
    p = original.payload
    return replace(
        p,
        idempotency_key=idempotency_key,
        debit_account=p.credit_account,
        credit_account=p.debit_account,
        entry_type="",
        description=description,
        metadata={},
        encoded=None,
        posted_by=posted_by,
        postings=tuple(
            Posting(x.credit_account, x.debit_account, x.amount, x.asset) for x in p.postings
        ),
        reverses_sequence=original.sequence,
    )


def list_accounts(
    uow_factory: UowFactory, ledger: str, after_account: str, page_size: int
) -> tuple[list[tuple[str, list[AssetTotals]]], int, bool]:
    """A page of accounts after `after_account`, the number it is as of, and
    whether more follow."""
    with uow_factory() as uow:
        page = uow.ledger.list_accounts(ledger, after_account, page_size + 1)
    if page is None:
        raise CounterNotInitialized(ledger)
    accounts, head = page
    return accounts[:page_size], head, len(accounts) > page_size


def get_ledger(uow_factory: UowFactory, ledger: str) -> Counter:
    """The ledger's counter: its head number and head hash, read together."""
    with uow_factory() as uow:
        counter = uow.ledger.counter(ledger)
    if counter is None:
        raise CounterNotInitialized(ledger)
    return counter
