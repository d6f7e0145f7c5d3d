"""Wakes following streams when a ledger gets new entries.

One HeadWatcher per server process. Posts in this process publish to it after
commit; on Postgres one LISTEN connection per process (storage/listener.py)
publishes commits made by every process, while the process has live followers: every
commit notifies every listening process, so a process that follows nothing
does not listen (it would wake for each commit of the whole cluster for
nothing). Streams also poll, so a lost notification only delays delivery,
never loses an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class HeadWatcher:
    """Per-ledger wake-up events, used on the event loop's thread only."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        # The highest head a notification named, per ledger: a reader of a
        # standby woken before it replayed that far must look again.
        self._heard: dict[str, int] = {}
        self._following = 0
        # Set while something in this process follows a ledger (see following()).
        self.wanted = asyncio.Event()

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Marks a live reader of a ledger for its lifetime: while any is
        active, this process listens for other processes' commits."""
        self._following += 1
        self.wanted.set()
        try:
            yield
        finally:
            self._following -= 1
            if not self._following:
                self.wanted.clear()

    def event(self, ledger: str) -> asyncio.Event:
        """Take this BEFORE reading, then wait on it: a commit published after
        the read began sets it, so no wake-up falls between read and wait."""
        ev = self._events.get(ledger)
        if ev is None:
            ev = self._events[ledger] = asyncio.Event()
        return ev

    def heard(self, ledger: str) -> int:
        """The highest head announced for `ledger` (0: none known)."""
        return self._heard.get(ledger, 0)

    def publish(self, ledger: str, head: int = 0) -> None:
        """`ledger` has new entries, up to `head` if known."""
        if head > self._heard.get(ledger, 0):
            self._heard[ledger] = head
        ev = self._events.pop(ledger, None)
        if ev is not None:
            ev.set()

    def publish_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()
