"""New entries as the gRPC edge posts them: written from the event loop when
every key is new (the common case), else by the careful use cases in the
thread pool, within what is left of the callers' time. Followers are woken
once something new committed."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

from ..domain.entries import NewEntry, PostResult
from ..domain.errors import check_deadline
from . import use_cases
from .ports import Blocking, NewEntryWriter, UowFactory

R = TypeVar("R")

# Told of each write: its kind ("group", "atomic" or "single"), its seconds,
# and the entries it posted and replayed (the metrics, if on).
WriteObserver = Callable[[str, float, int, int], None]


def _unobserved(kind: str, seconds: float, posted: int, replayed: int) -> None:
    pass


def _last_new(results: Sequence[PostResult]) -> int:
    """The highest number a write handed out (its followers' new head)."""
    return max((r.entry.sequence for r in results if not r.replayed), default=0)


class Writes:
    def __init__(
        self,
        uow: UowFactory,
        run: Blocking,
        writer: NewEntryWriter | None,
        published: Callable[[str, int], None],
        observe: WriteObserver = _unobserved,
    ) -> None:
        self._uow = uow
        self._run = run
        # Postgres: the common write from the event loop (storage/loop_writer.py).
        self._writer = writer
        self._published = published  # wakes the ledger's followers
        self._observe = observe

    async def group(
        self, batch: Sequence[NewEntry], time_left: float | None
    ) -> list[use_cases.Outcome]:
        """A group commit's transaction: each entry gets its own outcome."""
        start = time.perf_counter()
        outcomes = await self._write(use_cases.post_group, batch, time_left)
        results = [o for o in outcomes if isinstance(o, PostResult)]
        posted = sum(not r.replayed for r in results)
        self._observe("group", time.perf_counter() - start, posted, len(results) - posted)
        if posted:
            self._published(batch[0].ledger, _last_new(results))
        return outcomes

    async def atomic(self, batch: Sequence[NewEntry], time_left: float | None) -> list[PostResult]:
        """PostEntries: all of the batch, or none of it."""
        start = time.perf_counter()
        results = await self._write(use_cases.post_atomic, batch, time_left)
        posted = sum(not r.replayed for r in results)
        self._observe("atomic", time.perf_counter() - start, posted, len(results) - posted)
        if posted:
            self._published(batch[0].ledger, _last_new(results))
        return results

    async def one(self, entry: NewEntry, time_left: float | None) -> PostResult:
        """One transaction per post (without group commit)."""
        start = time.perf_counter()
        result: PostResult = await self._run(use_cases.post_entry, self._uow, entry, time_left)
        posted = 0 if result.replayed else 1
        self._observe("single", time.perf_counter() - start, posted, 1 - posted)
        if not result.replayed:
            self._published(entry.ledger, result.entry.sequence)
        return result

    async def reverse(
        self,
        ledger: str,
        sequence: int,
        idempotency_key: str,
        description: str,
        posted_by: str,
        time_left: float | None,
    ) -> PostResult:
        """ReverseEntry: one transaction of its own (the careful path)."""
        start = time.perf_counter()
        result: PostResult = await self._run(
            use_cases.reverse_entry,
            self._uow,
            ledger,
            sequence,
            idempotency_key,
            description,
            posted_by,
            time_left,
        )
        posted = 0 if result.replayed else 1
        self._observe("single", time.perf_counter() - start, posted, 1 - posted)
        if not result.replayed:
            self._published(ledger, result.entry.sequence)
        return result

    async def _write(
        self,
        careful: Callable[..., list[R]],
        batch: Sequence[NewEntry],
        time_left: float | None,
    ) -> list[R]:
        """`batch` from the event loop if every key is new, else with
        `careful` (post_group or post_atomic) in the thread pool."""
        if self._writer is None:
            written: list[R] = await self._run(careful, self._uow, batch, time_left)
            return written
        deadline = None if time_left is None else time.monotonic() + time_left
        results = await use_cases.post_new(self._writer, batch, time_left)
        if results is not None:
            return cast(list[R], results)
        check_deadline(deadline)
        if deadline is not None:
            time_left = deadline - time.monotonic()
        decided: list[R] = await self._run(
            functools.partial(careful, look_up_first=True), self._uow, batch, time_left
        )
        return decided
