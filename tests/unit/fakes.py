"""In-memory stand-ins for the service's ports (service/ports.py), for unit
tests of the use cases without a database, in the manner of cosmicpython's
FakeRepository and FakeUnitOfWork.

`FakeStore` is the database: what is committed, shared by every unit of work
of one `FakeUowFactory`. A `FakeRepository` stages its writes and applies them
only on its unit of work's commit(), as SQLite's open transaction does, so a
use case that forgets to commit writes nothing here either. The store records
every repository call and can commit another transaction's entries just before
a given add_entries call, to play a same-key race.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING

from ledger_service.api import wire
from ledger_service.domain.accounts import AccountView, AssetTotals
from ledger_service.domain.balances import Limits, Movements
from ledger_service.domain.consumers import ConsumerPosition
from ledger_service.domain.entries import (
    Balance,
    Counter,
    Entry,
    NewEntry,
    PostResult,
    epoch_micros,
)
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service.ports import (
    DuplicateIdempotencyKey,
    EntryRows,
    LedgerRepository,
    NewEntryWriter,
    TotalsOutOfRange,
    UnitOfWork,
    UowFactory,
)

# A batch's created_at: EPOCH plus its first number in seconds, so it never
# decreases along the sequence (as the database clock read under the lock).
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

# One repository call: the method's name and the keys it was given (in order
# for add_entries, sorted for find_by_keys, none for the others).
Call = tuple[str, tuple[str, ...]]


class FakeNumbered:
    """service.ports.NumberedBatch: the entries as numbered."""

    def __init__(
        self, entries: list[Entry], balances: list[tuple[Balance, ...]] | None = None
    ) -> None:
        self._entries = entries
        self._balances = balances or [() for _ in entries]

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def results(self) -> list[PostResult]:
        return [PostResult(e, False, b) for e, b in zip(self._entries, self._balances, strict=True)]


class FakeStore:
    """The committed tables, the call log, and the hooks of a test."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.entries: dict[tuple[str, str], Entry] = {}  # (ledger, idempotency_key)
        self.totals: dict[tuple[str, str, str], tuple[int, int]] = {}  # (ledger, account, asset)
        self.calls: list[Call] = []
        self.commits = 0  # commits of the units of work under test
        # add_entries call number (1 = the first recorded) -> what happens
        # just before it: typically another transaction commits its key.
        self.before_add_entries: dict[int, Callable[[], None]] = {}

    def calls_to(self, method: str) -> list[tuple[str, ...]]:
        return [keys for name, keys in self.calls if name == method]

    def sequences(self, ledger: str) -> dict[int, str]:
        """Committed entries of `ledger`: sequence -> idempotency key, in order."""
        found = {e.sequence: key for (led, key), e in self.entries.items() if led == ledger}
        return dict(sorted(found.items()))

    def commit_concurrently(self, ledger: str, batch: Sequence[NewEntry]) -> list[Entry]:
        """Another transaction (not recorded) numbers and commits `batch`."""
        other = FakeRepository(self, write=True, record=False)
        numbered = other.add_entries(ledger, batch)
        assert numbered is not None, f"no counter for {ledger!r}"
        other.apply()
        return numbered.entries()


class FakeRepository:
    """service.ports.LedgerRepository over a FakeStore, for one unit of work."""

    def __init__(self, store: FakeStore, *, write: bool, record: bool = True) -> None:
        self._store = store
        self._write = write
        self._record = record
        self._counters: dict[str, int] = {}
        self._entries: dict[tuple[str, str], Entry] = {}
        self._totals: dict[tuple[str, str, str], tuple[int, int]] = {}  # the new values

    # -- the protocol -----------------------------------------------------
    def counter_value(self, ledger: str) -> int | None:
        self._log("counter_value")
        return self._counter(ledger)

    def counter(self, ledger: str) -> Counter | None:
        self._log("counter")
        value = self._counter(ledger)
        return None if value is None else Counter(ledger, value, created=False)

    def create_counter(self, ledger: str, initialized_by: str = "") -> Counter | None:
        self._log("create_counter")
        self._check_writable()
        if self._counter(ledger) is not None:
            return None
        seed = max((e.sequence for e in self._ledger_entries(ledger)), default=0)
        self._counters[ledger] = seed
        return Counter(ledger, seed, created=True, initialized_by=initialized_by)

    def find_by_keys(self, ledger: str, keys: Collection[str]) -> dict[str, Entry]:
        self._log("find_by_keys", tuple(sorted(keys)))
        found = {key: self._entry(ledger, key) for key in keys}
        return {key: entry for key, entry in found.items() if entry is not None}

    def add_entries(self, ledger: str, batch: Sequence[NewEntry]) -> FakeNumbered | None:
        if self._record:
            self._log("add_entries", tuple(e.idempotency_key for e in batch))
            hook = self._store.before_add_entries.pop(
                len(self._store.calls_to("add_entries")), None
            )
            if hook is not None:
                hook()
        self._check_writable()
        assert all(e.ledger == ledger for e in batch), "a batch is of one ledger"
        value = self._counter(ledger)
        if value is None:
            return None  # the write is conditional on the counter row: nothing at all
        new_totals = self._totals_after(ledger, batch)
        keys = [e.idempotency_key for e in batch]
        if len(set(keys)) < len(keys) or any(self._entry(ledger, k) is not None for k in keys):
            raise DuplicateIdempotencyKey(ledger)
        at = EPOCH + timedelta(seconds=value + 1)
        numbered = [
            Entry(value + i, at, entry, payload_wire=wire.payload(entry))
            for i, entry in enumerate(batch, start=1)
        ]
        self._counters[ledger] = value + len(batch)
        self._entries.update(((ledger, e.payload.idempotency_key), e) for e in numbered)
        self._totals.update(new_totals)
        moves = Movements(batch)
        after = {(acc, asset): v for (_, acc, asset), v in new_totals.items()}
        return FakeNumbered(numbered, moves.balances(after))

    def rows_after(self, ledger: str, after_sequence: int, limit: int) -> EntryRows:
        self._log("rows_after")
        after = sorted(
            (e for e in self._ledger_entries(ledger) if e.sequence > after_sequence),
            key=lambda e: e.sequence,
        )[:limit]
        rows = [(e.sequence, epoch_micros(e.created_at), wire.stored_payload(e)) for e in after]
        return EntryRows(rows, self._counter(ledger))

    def entry(
        self, ledger: str, sequence: int | None = None, idempotency_key: str | None = None
    ) -> Entry | None:
        for e in self._ledger_entries(ledger):
            if e.sequence == sequence or e.payload.idempotency_key == idempotency_key:
                return e
        return None

    def reversal_of(self, ledger: str, sequence: int) -> Entry | None:
        found = [e for e in self._ledger_entries(ledger) if e.payload.reverses_sequence == sequence]
        return found[0] if found else None

    def balances_at(self, found: Sequence[Entry]) -> list[tuple[Balance, ...]]:
        return [() for _ in found]

    def set_limits(self, ledger: str, account: str, asset: str, limits: Limits) -> bool:
        raise NotImplementedError("limits are tested against real databases")

    def list_accounts(
        self, ledger: str, after_account: str, limit: int
    ) -> tuple[list[tuple[str, list[AssetTotals]]], int] | None:
        raise NotImplementedError("listings are tested against real databases")

    def rows_touching(
        self, ledger: str, account: str, after_sequence: int, limit: int
    ) -> EntryRows:
        raise NotImplementedError("filtered streams are tested against real databases")

    def store_position(
        self, ledger: str, consumer: str, sequence: int, at: datetime
    ) -> ConsumerPosition:
        raise NotImplementedError("consumers are tested against real databases")

    def position(self, ledger: str, consumer: str) -> int | None:
        raise NotImplementedError("consumers are tested against real databases")

    def consumers(self, ledger: str) -> tuple[list[ConsumerPosition], int] | None:
        raise NotImplementedError("consumers are tested against real databases")

    def consumer_lags(self) -> list[tuple[str, str, int]]:
        raise NotImplementedError("consumers are tested against real databases")

    def account_view(
        self, ledger: str, account: str, as_of_sequence: int = 0
    ) -> AccountView | None:
        self._log("account_view")
        head = self._counter(ledger)
        if head is None:
            return None
        merged = {**self._store.totals, **self._totals}
        balances = [
            AssetTotals(asset, debits, credits)
            for (led, acc, asset), (debits, credits) in sorted(merged.items())
            if (led, acc) == (ledger, account)
        ]
        return AccountView(ledger, account, balances, as_of_sequence=head)

    # -- the unit of work's side -----------------------------------------
    def apply(self) -> None:
        """Commit: the staged writes become the store's."""
        self._store.counters.update(self._counters)
        self._store.entries.update(self._entries)
        self._store.totals.update(self._totals)
        self.discard()

    def discard(self) -> None:
        self._counters, self._entries, self._totals = {}, {}, {}

    # -- reads through the staged writes ----------------------------------
    def _counter(self, ledger: str) -> int | None:
        return self._counters.get(ledger, self._store.counters.get(ledger))

    def _entry(self, ledger: str, key: str) -> Entry | None:
        return self._entries.get((ledger, key), self._store.entries.get((ledger, key)))

    def _ledger_entries(self, ledger: str) -> list[Entry]:
        merged = {**self._store.entries, **self._entries}
        return [e for (led, _), e in merged.items() if led == ledger]

    def _totals_after(
        self, ledger: str, batch: Sequence[NewEntry]
    ) -> dict[tuple[str, str, str], tuple[int, int]]:
        """The account totals with `batch` added; TotalsOutOfRange past int64."""
        after: dict[tuple[str, str, str], tuple[int, int]] = {}
        for e in batch:
            for account, debit, credit in (
                (e.debit_account, e.amount, 0),
                (e.credit_account, 0, e.amount),
            ):
                key = (ledger, account, e.asset)
                current = after.get(key) or self._totals.get(key) or self._store.totals.get(key)
                debits, credits = current or (0, 0)
                after[key] = (debits + debit, credits + credit)
        if any(d > INT64_MAX or c > INT64_MAX for d, c in after.values()):
            raise TotalsOutOfRange(ledger)
        return after

    def _check_writable(self) -> None:
        assert self._write, "a write in a unit of work opened without write=True"

    def _log(self, method: str, keys: tuple[str, ...] = ()) -> None:
        if self._record:
            self._store.calls.append((method, keys))


class FakeUnitOfWork:
    """service.ports.UnitOfWork: leaving it without commit() discards its writes."""

    def __init__(self, store: FakeStore, *, write: bool, timeout: float | None) -> None:
        self.store = store
        self.write = write
        self.timeout = timeout
        self.committed = False
        self._repository = FakeRepository(store, write=write)
        self._open = False

    @property
    def ledger(self) -> FakeRepository:
        assert self._open, "the repository is used outside its unit of work"
        return self._repository

    def __enter__(self) -> FakeUnitOfWork:
        assert not self._open, "a unit of work is entered once"
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._repository.discard()  # what commit() did not apply is rolled back
        self._open = False

    def commit(self) -> None:
        assert self._open, "commit() outside the unit of work"
        self._repository.apply()
        self.committed = True
        self.store.commits += 1


class FakeUowFactory:
    """service.ports.UowFactory: `factory(write=..., timeout=...)`, over one store."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store if store is not None else FakeStore()
        self.opened: list[FakeUnitOfWork] = []

    def __call__(self, *, write: bool = False, timeout: float | None = None) -> FakeUnitOfWork:
        uow = FakeUnitOfWork(self.store, write=write, timeout=timeout)
        self.opened.append(uow)
        return uow


class FakeNewEntryWriter:
    """service.ports.NewEntryWriter as storage/loop_writer.py behaves: writes
    and commits a batch whose keys are all new, else refuses (None) with
    nothing written. `refuse=True` refuses everything."""

    def __init__(self, store: FakeStore, *, refuse: bool = False) -> None:
        self.store = store
        self.refuse = refuse
        self.calls: list[tuple[str, tuple[str, ...], float | None]] = []

    async def add_new_entries(
        self, ledger: str, batch: Sequence[NewEntry], time_left: float | None
    ) -> FakeNumbered | None:
        self.calls.append((ledger, tuple(e.idempotency_key for e in batch), time_left))
        if self.refuse:
            return None
        repository = FakeRepository(self.store, write=True, record=False)
        try:
            numbered = repository.add_entries(ledger, batch)
        except (DuplicateIdempotencyKey, TotalsOutOfRange):
            return None
        repository.apply()
        return numbered


if TYPE_CHECKING:  # the fakes satisfy the ports (checked by mypy, not run)
    _repository: LedgerRepository = FakeRepository(FakeStore(), write=False)
    _uow: UnitOfWork = FakeUnitOfWork(FakeStore(), write=False, timeout=None)
    _factory: UowFactory = FakeUowFactory()
    _writer: NewEntryWriter = FakeNewEntryWriter(FakeStore())
