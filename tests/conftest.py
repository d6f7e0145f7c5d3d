"""Shared fixtures: a throwaway Postgres database (or LEDGER_TEST_DATABASE_URL),
a throwaway SQLite file, and fresh ledger names.

Without a reachable Postgres the Postgres tests skip with a message, except
under CI=true, where they fail: CI must never pass without the real database.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2_grpc

from ledger_service.storage import migrate
from ledger_service.storage.uow import create_engine

_GIVEN_URL = os.environ.get("LEDGER_TEST_DATABASE_URL")
# Where throwaway databases are created: the server of LEDGER_TEST_DATABASE_URL
# if given, else the local one.
ADMIN_URL = os.environ.get("LEDGER_TEST_ADMIN_URL") or (
    sa.make_url(_GIVEN_URL).set(database="postgres").render_as_string(hide_password=False)
    if _GIVEN_URL
    else "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def missing_requirement(message: str) -> NoReturn:
    """Skips with `message`, except under CI=true, where nothing may be skipped."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} [CI=true: these tests must run]", pytrace=False)
    pytest.skip(message)


def _postgres_unreachable(reason: str) -> NoReturn:
    missing_requirement(
        f"PostgreSQL not reachable ({reason}); start it or set LEDGER_TEST_DATABASE_URL"
    )


def migrated(url: str) -> str:
    engine = create_engine(url, pool_size=1)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


@contextlib.contextmanager
def throwaway_pg_database(prefix: str, *, migrate_it: bool = True) -> Iterator[str]:
    """A new Postgres database, migrated unless told not to, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(ADMIN_URL, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _postgres_unreachable(str(exc.orig).strip().splitlines()[0])
    try:
        url = sa.make_url(ADMIN_URL).set(database=name).render_as_string(False)
        yield migrated(url) if migrate_it else url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a migrated Postgres database for this test session."""
    if _GIVEN_URL:
        try:
            yield migrated(_GIVEN_URL)
        except sa.exc.OperationalError as exc:
            _postgres_unreachable(str(exc.orig).strip().splitlines()[0])
        return
    with throwaway_pg_database("ledger_test") as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "ledger.sqlite3"
    return migrated(f"sqlite:///{path}")


def hold_row_lock(conn: sa.Connection, ledger: str, rows: str = "counter") -> None:
    """Locks the ledger's counter row ("counter") or its account rows
    ("account") in `conn`'s open transaction, as a concurrent writer would,
    until the caller ends that transaction."""
    table = "ledger_counters" if rows == "counter" else "ledger_account_totals"
    conn.exec_driver_sql(f"SELECT 1 FROM {table} WHERE ledger = %(l)s FOR UPDATE", {"l": ledger})


def lock_waiters_when(engine: sa.Engine, expected: int, *, timeout: float) -> int:
    """Polls until `expected` sessions of the engine's database wait on a lock
    (or `timeout` seconds pass); returns the last count seen."""
    deadline = time.monotonic() + timeout
    with engine.connect() as probe:
        while True:
            waiting: int = probe.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).scalar_one()
            # pg_stat_activity is read once per transaction: end it, so that
            # the next poll sees a new snapshot.
            probe.rollback()
            if waiting == expected or time.monotonic() >= deadline:
                return waiting
            time.sleep(0.05)


def entry_fields(ledger: str, key: str, **overrides: Any) -> dict[str, Any]:
    """A valid entry's fields, for PostEntryRequest or validate_new_entry."""
    return {
        "ledger": ledger,
        "idempotency_key": key,
        "debit_account": "cash",
        "credit_account": "revenue",
        "amount": 100,
        "asset": "USD",
        **overrides,
    }


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on each store: the same guarantees hold on both."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(request.getfixturevalue("sqlite_url"))


@pytest.fixture
def ledger() -> str:
    """A fresh ledger name, so tests never depend on each other's data."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def serve() -> Iterator[Callable[[object], str]]:
    """serve(servicer) -> address: a scripted LedgerService (a stand-in for
    the server, for a client's retry and resume rules) on loopback, stopped
    after the test."""
    servers: list[grpc.Server] = []

    def start(servicer: object) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        servicer_ = cast(ledger_pb2_grpc.LedgerServiceServicer, servicer)
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer_, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)
