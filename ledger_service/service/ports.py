"""What the use cases need from storage, which implements it (storage/):
the repository, the unit of work, the write of new entries from the event
loop, and the exceptions storage raises to the service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

from ..domain.accounts import AccountView, AssetTotals
from ..domain.balances import Breach, Limits
from ..domain.consumers import ConsumerPosition
from ..domain.entries import Balance, Counter, Entry, NewEntry, PostResult


class DuplicateIdempotencyKey(Exception):
    """A concurrent transaction committed the same (ledger, idempotency_key) first."""


class TotalsOutOfRange(Exception):
    """An account total would pass int64."""


class LimitBreached(Exception):
    """The batch would take accounts beyond their balance limits: `refused`,
    by entry index, the entries that cross one, taken in order (each
    refused entry moving nothing); the first is where an atomic batch
    fails. Empty: a limit's last guard in the database refused it (a bug)."""

    def __init__(self, refused: dict[int, Breach]) -> None:
        super().__init__(refused)
        self.refused = refused


class ReversalTaken(Exception):
    """An entry of the batch reverses one that a committed entry reverses."""


class LimitsBroken(Exception):
    """New limits that the account's current totals already break."""

    def __init__(self, debits: int, credits: int) -> None:
        super().__init__(debits, credits)
        self.debits = debits
        self.credits = credits


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

    def results(self) -> list[PostResult]:
        """The entries, new, each with its accounts' totals right after it."""


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

    def rows_touching(
        self, ledger: str, account: str, after_sequence: int, limit: int
    ) -> EntryRows:
        """Up to `limit` entries above `after_sequence` with a posting of
        `account`, and the counter of the same snapshot (None: no counter)."""

    def store_position(
        self, ledger: str, consumer: str, sequence: int, at: datetime
    ) -> ConsumerPosition:
        """Moves a consumer's position forward (never back); the stored one."""

    def position(self, ledger: str, consumer: str) -> int | None: ...

    def consumers(self, ledger: str) -> tuple[list[ConsumerPosition], int] | None:
        """The consumers by name and the head; None without a counter."""

    def consumer_lags(self) -> list[tuple[str, str, int]]:
        """(ledger, consumer, lag) of every consumer of every ledger."""

    def account_view(
        self, ledger: str, account: str, as_of_sequence: int = 0
    ) -> AccountView | None:
        """Totals and limits per asset, as of entry `as_of_sequence` (0:
        now); None without a counter. With as_of_sequence above the head,
        the view's as_of_sequence is the head and its balances empty."""

    def entry(
        self, ledger: str, sequence: int | None = None, idempotency_key: str | None = None
    ) -> Entry | None: ...

    def reversal_of(self, ledger: str, sequence: int) -> Entry | None:
        """The entry that reverses entry `sequence`, if any."""

    def balances_at(self, found: Sequence[Entry]) -> list[tuple[Balance, ...]]:
        """For each entry (of one ledger), its accounts' totals right after it."""

    def set_limits(self, ledger: str, account: str, asset: str, limits: Limits) -> bool:
        """Sets the limits (creating the totals row at zero); False without
        a counter. Raises LimitsBroken when the current totals break them."""

    def list_accounts(
        self, ledger: str, after_account: str, limit: int
    ) -> tuple[list[tuple[str, list[AssetTotals]]], int] | None:
        """Up to `limit` accounts after `after_account`, by name, with their
        totals, and the counter value of the same snapshot; None without a
        counter."""


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
