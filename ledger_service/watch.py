"""Wakes following streams when a ledger gets new entries.

One HeadWatcher per server process. Posts in this process publish to it after
commit; on Postgres one LISTEN connection per process (PgListener) publishes
commits made by every process. Streams also poll, so a lost notification only
delays delivery, never loses an entry.
"""

from __future__ import annotations

import asyncio
import logging
import os

import psycopg
import sqlalchemy as sa

from .storage.dialect import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class HeadWatcher:
    """Per-ledger wake-up events, used on the event loop's thread only."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, ledger: str) -> asyncio.Event:
        """Take this BEFORE reading, then wait on it: a commit published after
        the read began sets it, so no wake-up falls between read and wait."""
        ev = self._events.get(ledger)
        if ev is None:
            ev = self._events[ledger] = asyncio.Event()
        return ev

    def publish(self, ledger: str) -> None:
        ev = self._events.pop(ledger, None)
        if ev is not None:
            ev.set()

    def publish_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()


class PgListener:
    """The process's one LISTEN connection; reconnects with backoff."""

    def __init__(self, url: sa.URL, watcher: HeadWatcher) -> None:
        # libpq takes the SQLAlchemy URL without the "+psycopg" driver suffix.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._watcher = watcher
        # Names the connection in pg_stat_activity, one per server process.
        self.application_name = f"ledger-service-listen {os.getpid()}"
        self.connected = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=self.application_name
                )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.connected.set()
                    backoff = 0.1
                    # Commits made while we were not listening: wake everyone.
                    self._watcher.publish_all()
                    async for note in conn.notifies():
                        ledger, _, _ = note.payload.rpartition(":")
                        self._watcher.publish(ledger)
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                log.warning("LISTEN connection lost (%s); streams poll meanwhile", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
