"""Helpers shared by the integration tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger_service.domain.entries import NewEntry
from ledger_service.domain.validation import validate_new_entry
from ledger_service.storage.schema import counters, entries

from ..conftest import entry_fields


def make_entry(ledger: str, key: str, **overrides: Any) -> NewEntry:
    return validate_new_entry(**entry_fields(ledger, key, **overrides))


def sequences(engine: Engine, ledger: str) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(entries.c.sequence)
                .where(entries.c.ledger == ledger)
                .order_by(entries.c.sequence)
            ).scalars()
        )


def counter_value(engine: Engine, ledger: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(counters.c.value).where(counters.c.ledger == ledger)).scalar()


def run_concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Starts n calls together (barrier) on n threads; returns results or exceptions."""
    barrier = threading.Barrier(n)

    def call(i: int) -> Any:
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))
