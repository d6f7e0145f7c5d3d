"""Fan-out of live entries: one database reader per followed ledger per process.

Without it, every commit would wake every following stream of the ledger and
each would read the same new rows from the database: N followers, N reads per
commit, and under load the reads queue up behind each other. Here one task per
ledger reads the new rows once into a bounded buffer of recent entries, and
every caught-up follower takes its next rows from there. A follower that falls
behind the buffer reads from the database on its own until it is back.

Order and completeness rest on the same rule as everywhere: rows are read
`sequence > last` in keyset order, so the buffer always holds consecutive
entries, and a follower asks for exactly the entries after its position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..domain.errors import LedgerError, StorageUnavailable
from ..service.ports import StoredRow
from ..service.reads import ReplayLooks
from .watch import HeadWatcher

log = logging.getLogger(__name__)

# read(ledger, after_sequence, limit) -> (rows, head or None)
Reader = Callable[[str, int, int], Awaitable[tuple[list[StoredRow], int | None]]]


class FollowerMetrics(Protocol):
    """Where the stream loop reports following streams and their lag."""

    def following(self) -> contextlib.AbstractContextManager[Any]:
        """Held while a following stream is open."""
        ...

    def lag(self, entries: int) -> None:
        """A live follower was just sent entries up to `entries` below the head."""


class _Unmeasured:
    def following(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def lag(self, entries: int) -> None:
        pass


@dataclass
class _Tail:
    last: int  # sequence of the newest row read (rows, if any, end with it)
    rows: list[StoredRow] = field(default_factory=list)  # consecutive, oldest first
    head: int = 0
    subscribers: int = 0
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    error: LedgerError | None = None
    task: asyncio.Task[None] | None = None

    def after(self, position: int, limit: int) -> list[StoredRow] | None:
        """Up to `limit` rows right after `position`; [] if none yet; None if
        `position` is older than the buffer (read the database instead)."""
        if not self.rows:
            return [] if position >= self.last else None
        first = self.rows[0][0]
        if position < first - 1:
            return None
        start = position - first + 1
        return self.rows[start : start + limit]


class Tails:
    def __init__(
        self,
        read: Reader,
        watcher: HeadWatcher,
        *,
        poll_interval: float,
        capacity: int = 4096,
        read_size: int = 512,
        metrics: FollowerMetrics | None = None,
    ) -> None:
        self._read = read
        self._watcher = watcher
        self._poll = poll_interval
        self._capacity = capacity
        self._read_size = read_size
        self._tails: dict[str, _Tail] = {}
        # Where the servicer's stream loop reports followers and their lag.
        self.metrics: FollowerMetrics = metrics or _Unmeasured()

    @contextlib.asynccontextmanager
    async def follow(self, ledger: str, position: int) -> AsyncIterator[_Tail]:
        """Subscribes to `ledger`'s tail (starting its reader if needed)."""
        tail = self._tails.get(ledger)
        if tail is None or tail.error is not None:
            tail = self._tails[ledger] = _Tail(last=position)
            tail.task = asyncio.get_running_loop().create_task(self._refresh(ledger, tail))
        tail.subscribers += 1
        try:
            yield tail
        finally:
            tail.subscribers -= 1
            if tail.subscribers == 0 and tail.task is not None:
                tail.task.cancel()
                if self._tails.get(ledger) is tail:
                    del self._tails[ledger]

    async def _refresh(self, ledger: str, tail: _Tail) -> None:
        # While it runs, this process listens for other processes' commits.
        with self._watcher.following():
            await self._follow(ledger, tail)

    async def _follow(self, ledger: str, tail: _Tail) -> None:
        looks = ReplayLooks()
        try:
            while True:
                wake = self._watcher.event(ledger)  # before the read: no lost wake-up
                rows, head = await self._read(ledger, tail.last, self._read_size)
                if rows:
                    tail.rows.extend(rows)
                    tail.last = rows[-1][0]
                    if len(tail.rows) > self._capacity:
                        del tail.rows[: len(tail.rows) - self._capacity]
                tail.head = max(tail.head, head or 0, tail.last)
                if rows:
                    self._notify(tail)
                if len(rows) == self._read_size:
                    continue
                if tail.head < self._watcher.heard(ledger):
                    # Told of entries this database does not show yet (a
                    # standby, replaying): look again soon, not at the next
                    # notification, which may never come.
                    await asyncio.sleep(looks.next())
                    continue
                looks.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self._poll)
        except LedgerError as exc:
            # Followers end with this error (e.g. UNAVAILABLE) and resume;
            # the next follower starts a new reader.
            tail.error = exc
            self._notify(tail)
        except Exception as exc:  # a bug: never leave followers waiting silently
            log.exception("tail reader of ledger %s failed", ledger)
            tail.error = StorageUnavailable(f"reading new entries failed ({exc}); resume")
            self._notify(tail)

    def wake_all(self) -> None:
        """Wakes every follower (e.g. to notice a shutdown)."""
        for tail in self._tails.values():
            self._notify(tail)

    @staticmethod
    def _notify(tail: _Tail) -> None:
        event, tail.updated = tail.updated, asyncio.Event()
        event.set()
