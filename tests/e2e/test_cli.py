"""The `ledger-service` command as a deploy script would use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ledger_service.testing import ServerProcess


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrate_then_init_counter_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    assert cli("migrate", "--database-url", url).returncode == 0
    assert cli("migrate", "--database-url", url).returncode == 0  # already at head
    first = cli("init-counter", "--ledger", "books", "--database-url", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "ledger books: counter created, value 0"
    again = cli("init-counter", "--ledger", "books", "--database-url", url)
    assert again.stdout.strip() == "ledger books: counter already existed, value 0"


def test_init_counter_on_postgres(pg_url: str, ledger: str) -> None:
    result = cli("init-counter", "--ledger", ledger, "--database-url", pg_url)
    assert result.returncode == 0, result.stderr
    assert "counter created" in result.stdout


def test_init_counter_rejects_a_bad_name(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    cli("migrate", "--database-url", url)
    result = cli("init-counter", "--ledger", "no spaces please", "--database-url", url)
    assert result.returncode == 1
    assert "ledger: must match" in result.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    with pytest.raises(RuntimeError, match="ledger-service migrate"):
        ServerProcess(url).start()


def test_the_client_package_needs_none_of_the_server_dependencies() -> None:
    from importlib.metadata import requires

    names = {
        r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires("ledger-client") or []
    }
    assert names == {"grpcio", "grpcio-status", "protobuf"}
    probe = (
        "import sys, ledger_client, ledger.v1.ledger_pb2_grpc;"
        "server = ('sqlalchemy', 'psycopg', 'alembic', 'ledger_service');"
        "bad = [m for m in server if m in sys.modules];"
        "assert not bad, bad"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
