"""The primary and hot standby of tests/standby.py: what is committed on the
primary reaches the standby, not while its replay is paused, and the standby
refuses writes."""

from __future__ import annotations

import time

import psycopg
import pytest

from .. import standby
from ..standby import ReplicatedPair

pytestmark = pytest.mark.postgres

# The module-scoped fixture, made this module's (an assignment, unlike an
# import, does not trip ruff's F811 on the parameters named after it).
standby_pair = standby.standby_pair


def count_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM standby_smoke").fetchone()
    assert row is not None
    return int(row[0])


def insert_row(url: str, value: int) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("INSERT INTO standby_smoke (v) VALUES (%s)", (value,))


def test_replication_follows_pause_and_resume(standby_pair: ReplicatedPair) -> None:
    pair = standby_pair
    with psycopg.connect(pair.primary_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE standby_smoke (v integer NOT NULL)")
    insert_row(pair.primary_url, 1)
    pair.wait_caught_up(timeout=30)
    assert count_rows(pair.standby_url) == 1

    pair.pause_replay()
    try:
        pair.wait_replay_paused(timeout=30)
        insert_row(pair.primary_url, 2)
        assert count_rows(pair.primary_url) == 2
        for _ in range(5):  # ~0.5 s: the paused standby must stay behind
            assert count_rows(pair.standby_url) == 1
            time.sleep(0.1)
        with pytest.raises(TimeoutError):
            pair.wait_caught_up(timeout=0.2)
    finally:
        pair.resume_replay()
    pair.wait_caught_up(timeout=30)
    assert count_rows(pair.standby_url) == 2
    assert pair.replay_pause_state() == "not paused"


def test_standby_refuses_writes(standby_pair: ReplicatedPair) -> None:
    with (
        psycopg.connect(standby_pair.standby_url, autocommit=True, connect_timeout=5) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only transaction"),
    ):
        conn.execute("INSERT INTO ledger_counters (ledger) VALUES ('x')")


def test_standby_has_the_migrated_schema(standby_pair: ReplicatedPair) -> None:
    with psycopg.connect(standby_pair.standby_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery(), to_regclass('ledger_counters') IS NOT NULL"
        ).fetchone()
    assert row == (True, True)
