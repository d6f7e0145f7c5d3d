"""Where reads go: the primary, or a hot standby (`--read-database-url`).

A standby replays the primary's commits in commit order, which is number
order, so every snapshot it serves holds a prefix 1..k of each ledger: a
stream read there never skips and never goes backwards. What it can do is
lag. A read whose answer might only mean "not replayed yet" (no counter, a
position above the standby's head, no such entry) asks the primary for the
ledger's head, waits until the standby has replayed that far, and reads
again; after `replay_wait` seconds it gives up with StandbyBehind
(UNAVAILABLE, retryable) rather than answer something the primary would not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..domain.errors import CounterNotInitialized, EntryNotFound, PositionAhead, StandbyBehind
from .ports import Blocking, UowFactory

T = TypeVar("T")

# Answers a lagging standby may give that the primary would not.
_MAYBE_STALE = (CounterNotInitialized, PositionAhead, EntryNotFound)
# Seconds between looks at the standby's replay of a ledger, doubling.
_FIRST_LOOK, _LAST_LOOK = 0.005, 0.1


class ReplayLooks:
    """The pauses between looks at a database that is behind a head known
    to exist (a standby, replaying): short at first, doubling up to
    _LAST_LOOK; reset() once it has caught up."""

    def __init__(self) -> None:
        self._next = _FIRST_LOOK

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, _LAST_LOOK)
        return delay

    def reset(self) -> None:
        self._next = _FIRST_LOOK


def head(uow_factory: UowFactory, ledger: str) -> int | None:
    """The ledger's counter value; None without a counter."""
    with uow_factory() as uow:
        value: int | None = uow.ledger.counter_value(ledger)
    return value


class Reads:
    """`await reads.call(use_case, ledger, *args)`: `use_case(uow_factory,
    ledger, *args)` on the read database. Without a standby (`primary` is
    the read database), a plain call."""

    def __init__(
        self,
        run: Blocking,
        uow: UowFactory,
        primary: UowFactory | None = None,
        *,
        replay_wait: float = 5.0,
    ) -> None:
        self._run = run
        self.uow = uow  # the read database's units of work
        self._primary = primary  # None: `uow` is the primary's
        self.replay_wait = replay_wait

    @property
    def standby(self) -> bool:
        return self._primary is not None

    async def call(
        self, fn: Callable[..., T], ledger: str, *args: Any, time_left: float | None = None
    ) -> T:
        try:
            result: T = await self._run(fn, self.uow, ledger, *args)
            return result
        except _MAYBE_STALE as exc:
            if self._primary is None:
                raise
            target = await self._run(head, self._primary, ledger)
            if target is None:
                raise  # the primary has no such ledger either
            await self.replayed(ledger, target, time_left, cause=exc)
        result = await self._run(fn, self.uow, ledger, *args)
        return result

    async def replayed(
        self,
        ledger: str,
        target: int,
        time_left: float | None = None,
        *,
        cause: BaseException | None = None,
    ) -> int:
        """Waits until the read database has replayed `ledger` up to
        `target`; returns its head. StandbyBehind after `replay_wait`
        seconds (or `time_left`, the caller's, if sooner)."""
        wait = self.replay_wait if time_left is None else min(self.replay_wait, time_left)
        deadline = time.monotonic() + wait
        looks = ReplayLooks()
        while True:
            seen: int | None = await self._run(head, self.uow, ledger)
            if seen is not None and seen >= target:
                return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise StandbyBehind(ledger, seen, wait) from cause
            await asyncio.sleep(min(looks.next(), left))
