"""The `ledger-service` command as a deploy script would use it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ledger.v1 import ledger_pb2

from ledger_service.testing import ServerProcess

from .conftest import cli

# A log line (text format): a start's warnings may come before its failure.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ \S+: ")


def assert_fails_in_one_line(result: subprocess.CompletedProcess[str], *says: str) -> str:
    """A non-zero exit, no traceback, one `ledger-service: ...` line saying
    `says`; any other line is a log line. Returns the line."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    failures = [line for line in lines if line.startswith("ledger-service: ")]
    assert len(failures) == 1, result.stderr
    assert all(_LOG_LINE.match(line) for line in lines if line not in failures), result.stderr
    for text in says:
        assert text in failures[0], result.stderr
    return failures[0]


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'served.sqlite3'}"
    assert cli("migrate", "--database-url", url).returncode == 0
    return url


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


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


def test_serve_on_a_port_in_use_fails_in_one_line(migrated_sqlite: str, taken_port: int) -> None:
    result = cli("serve", "--database-url", migrated_sqlite, "--listen", f"127.0.0.1:{taken_port}")
    assert_fails_in_one_line(result, f"cannot listen on 127.0.0.1:{taken_port}", "in use")


def test_serve_with_its_metrics_port_in_use_fails_in_one_line(
    migrated_sqlite: str, taken_port: int
) -> None:
    result = cli(
        "serve",
        "--database-url",
        migrated_sqlite,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        f"127.0.0.1:{taken_port}",
    )
    assert_fails_in_one_line(result, "--metrics-listen", "in use")


def missing_database(pg_url: str) -> str:
    name = f"ledger_missing_{uuid.uuid4().hex[:8]}"
    return sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)


def test_serve_on_a_postgres_database_that_does_not_exist_fails_in_one_line(
    pg_url: str,
) -> None:
    url = missing_database(pg_url)
    result = cli("serve", "--database-url", url, "--listen", "127.0.0.1:0")
    assert_fails_in_one_line(result, "does not exist", sa.make_url(url).database or "")


def test_migrate_and_init_counter_fail_in_one_line_on_a_database_they_cannot_use(
    pg_url: str,
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{closed_port()}/ledger"
    for args in (("migrate",), ("init-counter", "--ledger", "books")):
        result = cli(*args, "--database-url", unreachable)
        assert_fails_in_one_line(result, "refused")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        result = cli(*args, "--database-url", missing_database(pg_url))
        assert_fails_in_one_line(result, "does not exist")


def test_serve_on_an_unreachable_database_serves_anyway_not_ready() -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/ledger"
    with ServerProcess(url, extra_args=["--shutdown-grace", "1"]) as server:
        health = health_pb2_grpc.HealthStub(server.channel)
        answer = health.Check(
            health_pb2.HealthCheckRequest(service="ledger.v1.LedgerService"), timeout=10
        )
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.InitializeCounter(
                ledger_pb2.InitializeCounterRequest(ledger="books"), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--database-url", "not a url"], {}, "--database-url"),
        (["--database-url", "mysql://db/ledger"], {}, "unsupported database 'mysql'"),
        (["--listen", "127.0.0.1"], {}, "--listen: expected host:port"),
        (["--metrics-listen", "localhost"], {}, "--metrics-listen: expected host:port"),
        (["--log-level", "LOUD"], {}, "--log-level"),
        (["--slow-call-ms", "-1"], {}, "--slow-call-ms"),
        ([], {"LEDGER_LOG_FORMAT": "xml"}, "--log-format"),
        ([], {"LEDGER_POOL_SIZE": "many"}, "LEDGER_POOL_SIZE"),
    ],
)
def test_serve_with_a_bad_setting_fails_in_one_line(
    migrated_sqlite: str, args: list[str], env: dict[str, str], says: str
) -> None:
    result = cli("serve", "--database-url", migrated_sqlite, *args, env=env)
    line = assert_fails_in_one_line(result, says)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, line


def test_a_bad_flag_value_gets_the_usage_and_one_error_line() -> None:
    result = cli("serve", "--log-format", "xml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ledger-service serve: error:")
