"""Shared fixtures: a throwaway Postgres database (or LEDGER_TEST_DATABASE_URL),
a throwaway SQLite file, and fresh ledger names.

Without a reachable Postgres the Postgres tests skip with a message, except
under CI=true, where they fail: CI must never pass without the real database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledger_service.storage import migrate
from ledger_service.storage.uow import create_engine

ADMIN_URL = os.environ.get("LEDGER_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_unreachable(reason: str) -> None:
    message = f"PostgreSQL not reachable ({reason}); start it or set LEDGER_TEST_DATABASE_URL"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} [CI=true: Postgres tests must run]", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a migrated Postgres database for this test session."""
    given = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if given:
        engine = create_engine(given, pool_size=1)
        try:
            migrate.upgrade(engine)
        except sa.exc.OperationalError as exc:
            _postgres_unreachable(str(exc.orig).strip().splitlines()[0])
        finally:
            engine.dispose()
        yield given
        return
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _postgres_unreachable(str(exc.orig).strip().splitlines()[0])
    url = sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "ledger.sqlite3"
    url = f"sqlite:///{path}"
    engine = create_engine(url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    return url


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
