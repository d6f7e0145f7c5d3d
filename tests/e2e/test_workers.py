"""`serve --workers N`: a supervisor of worker processes sharing one port.
A worker killed under load is replaced and no acknowledged post is lost or
doubled; SIGTERM drains every worker and leaves no process behind; a worker
that cannot start fails the start in one line, not a restart loop."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from ledger_service.auth.tokens import new_token, token_digest
from ledger_service.testing import ServerProcess

from .conftest import FAST, assert_books_hold, cli, init
from .test_cli import assert_fails_in_one_line
from .traffic import Callers, check_books

WORKERS = [*FAST, "--pool-size", "4", "--workers", "2"]
# What each worker logs once it serves (never "listening on": the supervisor says that).
SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving on ")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def serving_workers(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process that said it serves."""
    return {int(i): int(pid) for i, pid in SERVING.findall("".join(server.lines))}


def parent_of(pid: int) -> int | None:
    """The parent's pid of a live process (not a zombie), else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()  # after "(command name)"
    except FileNotFoundError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def test_a_worker_killed_under_load_is_replaced_and_every_post_is_there_once(
    fresh_pg_url: str, ledger: str
) -> None:
    with ServerProcess(fresh_pg_url, extra_args=WORKERS) as server:
        assert server.proc is not None
        supervisor = server.proc.pid
        workers = serving_workers(server)
        # Both serve, as children of the supervisor, on the port it announced.
        assert sorted(workers) == [0, 1], server.lines
        assert all(parent_of(pid) == supervisor for pid in workers.values())
        assert f"serving on 127.0.0.1:{server.port} " in "".join(server.lines)
        assert "(database " in "".join(server.lines) and "2 workers)" in "".join(server.lines)
        init(server.stub, ledger)
        with Callers(server.address, ledger, n=12, separate_connections=True) as callers:
            callers.wait_for_acks(100)
            os.kill(workers[1], signal.SIGKILL)
            wait_until(
                lambda: serving_workers(server)[1] != workers[1],
                f"worker 1 was not replaced:\n{''.join(server.lines)}",
            )
            callers.wait_for_acks(callers.acked() + 100)  # the service keeps serving
        assert not callers.failures, callers.failures
        replacement = serving_workers(server)[1]
        assert parent_of(replacement) == supervisor
        assert parent_of(workers[0]) == supervisor  # the other one was left alone
        log = "".join(server.lines)
        assert f"worker 1 (pid {workers[1]}) was killed by SIGKILL; restarting it" in log
        assert "(2 of 2 workers serving)" in log
        # Exactly 1..N, each key once, each acknowledged key with its number.
        check_books(fresh_pg_url, server.stub, ledger, callers.acks)
        assert "Traceback" not in log
    assert_books_hold(fresh_pg_url, ledger)


def test_sigterm_drains_every_worker_and_leaves_no_process_behind(pg_url: str) -> None:
    server = ServerProcess(pg_url, extra_args=[*WORKERS, "--metrics-listen", "127.0.0.1:0"])
    with server:
        workers = serving_workers(server)
        assert sorted(workers) == [0, 1], server.lines
        log = "".join(server.lines)
        # Port 0: each worker its own free metrics port.
        ports = dict(re.findall(r"worker (\d+) metrics at http://127\.0\.0\.1:(\d+)/metrics", log))
        assert sorted(ports) == ["0", "1"] and ports["0"] != ports["1"], log
        for port in ports.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
                assert page.status == 200
        assert server.terminate() == 0
        assert [pid for pid in workers.values() if parent_of(pid) is not None] == []
        wait_until(  # the last lines may still be on their way through the pipe
            lambda: "".join(server.lines).count("ledger_service.server: stopped") == 2,
            f"not both workers said they stopped:\n{''.join(server.lines)}",
        )


def test_a_worker_that_cannot_reach_its_database_fails_the_start_in_one_line(
    pg_url: str,
) -> None:
    missing = f"ledger_missing_{uuid.uuid4().hex[:8]}"
    url = sa.make_url(pg_url).set(database=missing).render_as_string(hide_password=False)
    result = cli("serve", "--database-url", url, "--listen", "127.0.0.1:0", "--workers", "2")
    assert_fails_in_one_line(result, "does not exist", missing)
    assert result.returncode == 2
    assert "restarting" not in result.stderr and "listening on" not in result.stderr


def test_a_worker_that_cannot_read_its_tls_file_fails_the_start_in_one_line(
    sqlite_url: str,
) -> None:
    tls = ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"]
    result = cli(
        "serve", "--database-url", sqlite_url, "--listen", "127.0.0.1:0", *tls, "--workers", "2"
    )
    assert_fails_in_one_line(result, "/nonexistent/cert.pem")
    assert "restarting" not in result.stderr


def test_workers_on_a_port_in_use_fail_in_one_line(sqlite_url: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli(
            "serve",
            "--database-url",
            sqlite_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
        )
    assert_fails_in_one_line(result, f"cannot listen on 127.0.0.1:{port}", "in use")
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--workers", "0"], {}),
        (["--workers", "banana"], {}),
        ([], {"LEDGER_WORKERS": "banana"}),
    ],
)
def test_a_bad_worker_count_fails_in_one_line(
    sqlite_url: str, args: list[str], env: dict[str, str]
) -> None:
    result = cli("serve", "--database-url", sqlite_url, "--listen", "127.0.0.1:0", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert_fails_in_one_line(result, "--workers")


def test_sighup_reaches_every_worker(sqlite_url: str, tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    digest = token_digest(new_token())
    auth.write_text(f'[[principal]]\nname = "nobody"\ntoken_sha256 = ["{digest}"]\nroles = []\n')
    with ServerProcess(sqlite_url, extra_args=[*WORKERS, "--auth-file", str(auth)]) as server:
        assert server.proc is not None
        workers = serving_workers(server)
        server.proc.send_signal(signal.SIGHUP)  # re-read even though nothing changed
        wait_until(
            lambda: "".join(server.lines).count("auth file reloaded: 1 principals") == 2,
            f"not every worker re-read the auth file:\n{''.join(server.lines)}",
        )
        assert serving_workers(server) == workers  # and none of them died of it
        assert "restarting" not in "".join(server.lines)
