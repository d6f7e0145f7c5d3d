"""Group commit: concurrent PostEntry calls for one ledger share a transaction.

The counter row admits one writer per ledger at a time, so one transaction per
entry caps a ledger at about one commit (one WAL flush) per entry. Here each
ledger has at most one transaction in flight per process; posts that arrive
meanwhile queue up and go together in the next one (one counter bump, one
insert round trip, one commit). A lone caller is not delayed: with nothing in
flight its post is written at once, as a batch of one, in its own task.

Under concurrent load the next transaction also waits, briefly (max_wait,
3 ms by default), until as many posts are queued as the previous one carried:
the callers just answered usually come straight back, and a group that waits
for them is larger, so the per-transaction work (in this process and in the
database) is shared by more entries (docs/performance.md). It is the idea of
Postgres' commit_delay/commit_siblings. After a transaction of one entry (a
lone caller) nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..domain.entries import NewEntry, PostResult
from ..domain.errors import DeadlineExceeded, LedgerError, Overloaded

log = logging.getLogger(__name__)

# Runs one batch (in the database thread pool) -> one outcome per entry.
BatchWriter = Callable[
    [Sequence[NewEntry], float | None], Awaitable[list[PostResult | LedgerError]]
]


@dataclass
class _Pending:
    entry: NewEntry
    deadline: float | None  # time.monotonic() value, None for no deadline
    future: asyncio.Future[PostResult]


class GroupCommitter:
    def __init__(
        self,
        write: BatchWriter,
        *,
        max_batch: int = 1000,
        max_pending: int = 10_000,
        max_wait: float = 0.003,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self._write = write
        self._max_batch = max_batch
        self._max_wait = max_wait
        # Told each transaction's number of posts (the metrics, if on).
        self._on_batch = on_batch or _ignore
        # A flusher waiting for its queue to reach a size: ledger -> (size, wake-up).
        self._gathering: dict[str, tuple[int, asyncio.Future[None]]] = {}
        # Bound on posts waiting in this process (all ledgers): beyond it new
        # posts get RESOURCE_EXHAUSTED instead of growing memory.
        self._max_pending = max_pending
        self._pending = 0
        self._queues: dict[str, deque[_Pending]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak refs

    async def post(self, entry: NewEntry, time_left: float | None) -> PostResult:
        """Queues `entry` for the next transaction of its ledger; `time_left`
        is the caller's remaining deadline (bounds the database work)."""
        if self._pending >= self._max_pending:
            raise Overloaded(self._max_pending)
        queue = self._queues.get(entry.ledger)
        if queue is None:
            return await self._post_alone(entry, time_left)
        loop = asyncio.get_running_loop()
        item = _Pending(
            entry, None if time_left is None else time.monotonic() + time_left, loop.create_future()
        )
        queue.append(item)
        self._pending += 1
        gathering = self._gathering.get(entry.ledger)
        if gathering is not None and len(queue) >= gathering[0]:
            _wake(gathering[1])
        return await item.future

    async def _post_alone(self, entry: NewEntry, time_left: float | None) -> PostResult:
        """Nothing in flight for this ledger: the caller writes its entry in
        its own task, as a batch of one, with no queue or flush task between
        it and the database (a lone caller's latency is that of a plain
        write). Posts arriving meanwhile queue up, and a flush task takes
        them over once this write is done."""
        ledger = entry.ledger
        queue: deque[_Pending] = deque()
        self._queues[ledger] = queue
        log.debug("group commit: ledger %s, batch of 1", ledger)
        self._on_batch(1)
        try:
            (outcome,) = await self._write([entry], time_left)
        finally:
            if queue:
                task = asyncio.get_running_loop().create_task(self._flush(ledger, queue, 1))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self._queues[ledger]
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    async def _flush(self, ledger: str, queue: deque[_Pending], last: int) -> None:
        """Writes the queued posts of `ledger`, batch after batch, until none
        is left. `last`: entries in the ledger's previous transaction."""
        try:
            while queue:
                if self._max_wait > 0:  # returns at once after a batch of one
                    await self._gather(ledger, queue, min(last, self._max_batch))
                batch: list[_Pending] = []
                now = time.monotonic()
                while queue and len(batch) < self._max_batch:
                    item = queue.popleft()
                    self._pending -= 1
                    if item.future.done():  # the caller went away (cancelled)
                        continue
                    if item.deadline is not None and item.deadline <= now:
                        item.future.set_exception(
                            DeadlineExceeded("deadline exceeded while queued; nothing was written")
                        )
                        continue
                    batch.append(item)
                last = len(batch)
                if batch:
                    await self._run(batch, now)
        finally:
            del self._queues[ledger]

    async def _gather(self, ledger: str, queue: deque[_Pending], size: int) -> None:
        """Returns once `size` posts are queued, or after max_wait."""
        if len(queue) >= size:
            return
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        self._gathering[ledger] = (size, woken)
        timer = loop.call_later(self._max_wait, _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
            del self._gathering[ledger]

    async def _run(self, batch: list[_Pending], now: float) -> None:
        # The transaction may run as long as the most patient caller allows.
        deadlines = [p.deadline for p in batch]
        timeout = None if None in deadlines else max(d for d in deadlines if d) - now
        log.debug("group commit: ledger %s, batch of %d", batch[0].entry.ledger, len(batch))
        self._on_batch(len(batch))
        try:
            outcomes = await self._write([p.entry for p in batch], timeout)
        except Exception as exc:  # the batch failed as a whole (e.g. UNAVAILABLE)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, outcome in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if isinstance(outcome, LedgerError):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)


def _ignore(size: int) -> None:
    pass


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
