"""End-to-end fixtures: real server processes on loopback, real databases."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.testing import ServerProcess

from ..conftest import entry_fields, throwaway_pg_database

# Short intervals keep the tests quick; they change latency, not behaviour.
FAST = ["--poll-interval", "0.2", "--shutdown-grace", "5"]


@pytest.fixture(scope="session")
def pg_server(pg_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_url, extra_args=FAST) as server:
        yield server


@pytest.fixture(scope="session")
def sqlite_server(sqlite_url: str) -> Iterator[ServerProcess]:
    with ServerProcess(sqlite_url, extra_args=FAST) as server:
        yield server


@pytest.fixture(params=["postgres", "sqlite"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """One running server per store; tests using it run on both."""
    name = "pg_server" if request.param == "postgres" else "sqlite_server"
    result: ServerProcess = request.getfixturevalue(name)
    return result


@pytest.fixture
def stub(server: ServerProcess) -> ledger_pb2_grpc.LedgerServiceStub:
    return server.stub


@pytest.fixture
def fresh_pg_url(pg_url: str) -> Iterator[str]:
    """A database of its own, for tests that cut connections or kill servers."""
    with throwaway_pg_database("ledger_e2e") as url:
        yield url


def post_request(ledger: str, key: str, **overrides: Any) -> ledger_pb2.PostEntryRequest:
    return ledger_pb2.PostEntryRequest(**entry_fields(ledger, key, **overrides))


def batch_request(ledger: str, keys: list[str], **overrides: Any) -> ledger_pb2.PostEntriesRequest:
    items = []
    for key in keys:
        fields = entry_fields(ledger, key, **overrides)
        del fields["ledger"]
        items.append(ledger_pb2.EntryInput(**fields))
    return ledger_pb2.PostEntriesRequest(ledger=ledger, entries=items)


def init(stub: ledger_pb2_grpc.LedgerServiceStub, ledger: str) -> None:
    stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=ledger), timeout=10)


def details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """(ErrorInfo, BadRequest field names) from the grpc-status-details-bin trailer."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    found_info = False
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            found_info = True
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    assert found_info, "error carries no google.rpc.ErrorInfo"
    assert info.domain == "ledger.v1"
    return info, fields


def collect_stream(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    ledger: str,
    *,
    after: int = 0,
    follow: bool = False,
    until: int | None = None,
    timeout: float = 60.0,
) -> list[ledger_pb2.StreamEntriesResponse]:
    """Reads a stream; with `until`, stops once that sequence has arrived.
    `timeout` only guards against a hang."""
    call = stub.StreamEntries(
        ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=after, follow=follow),
        timeout=timeout,
    )
    messages = []
    for message in call:
        messages.append(message)
        if until is not None and message.entries and message.entries[-1].sequence >= until:
            call.cancel()
            break
    return messages


def run_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """n threads released together; returns each result or exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`ledger-service ARGS` as a deploy script runs it (`env`: added variables)."""
    return subprocess.run(
        [sys.executable, "-m", "ledger_service", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def verify_books(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`ledger-service verify` as an operator runs it, against `url`."""
    return cli("verify", "--database-url", url, *args, timeout=120)


def assert_books_hold(url: str, ledger: str) -> None:
    result = verify_books(url, "--ledger", ledger)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
