"""What the use cases need from storage, which implements it (storage/):
the repository, the unit of work, the write of new entries from the event
loop, and the exceptions storage raises to the service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from ..domain.accounts import AccountView
from ..domain.entries import Counter, Entry, NewEntry


class DuplicateIdempotencyKey(Exception):
    """A concurrent transaction committed the same (ledger, idempotency_key) first."""


class TotalsOutOfRange(Exception):
    """An account total would pass int64."""


# (sequence, created_at in epoch microseconds, the entry's stored encoding)
StoredRow = tuple[int, int, bytes]


@dataclass(frozen=True)
class EntryRows:
    """Consecutive stored entries, plus the counter's value read after them
    (None: no counter)."""

    rows: list[StoredRow]
    head: int | None

    @property
    def sequences(self) -> list[int]:
        return [row[0] for row in self.rows]


class NumberedBatch(Protocol):
    """What the database gave a batch: its entries, with their numbers."""

    def entries(self) -> list[Entry]: ...


class LedgerRepository(Protocol):
    """The ledger's tables, on the connection of a unit of work."""

    def counter_value(self, ledger: str) -> int | None: ...

    def counter(self, ledger: str) -> Counter | None: ...

    def create_counter(self, ledger: str, initialized_by: str = "") -> Counter | None:
        """The new counter, or None when it already existed."""

    def find_by_keys(self, ledger: str, keys: Collection[str]) -> dict[str, Entry]: ...

    def add_entries(self, ledger: str, batch: Sequence[NewEntry]) -> NumberedBatch | None:
        """Numbers, stores and adds to the account totals; None (nothing
        written) without a counter. Raises DuplicateIdempotencyKey or
        TotalsOutOfRange, having written nothing."""

    def rows_after(self, ledger: str, after_sequence: int, limit: int) -> EntryRows: ...

    def account_view(self, ledger: str, account: str) -> AccountView | None: ...


class UnitOfWork(Protocol):
    """One transaction: `with uow_factory(write=True) as uow: ...; uow.commit()`;
    leaving it without commit() rolls back."""

    @property
    def ledger(self) -> LedgerRepository: ...

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

# await run(fn, *args): a blocking use case, in the database thread pool.
Blocking = Callable[..., Awaitable[Any]]


class NewEntryWriter(Protocol):
    """The common write (every key new) without a thread: storage.loop_writer."""

    async def add_new_entries(
        self, ledger: str, batch: Sequence[NewEntry], time_left: float | None
    ) -> NumberedBatch | None: ...
