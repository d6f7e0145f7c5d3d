"""What ledger_client retries, against an in-process server that fails on
cue: only UNAVAILABLE and DEADLINE_EXCEEDED, always with the same key, and
within total_timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, cast

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_client import LedgerClient

from ledger_service.api.errors import ERRORS


class _Scripted:
    """PostEntry as scripted; the other methods are the base's UNIMPLEMENTED."""

    _Base = ledger_pb2_grpc.LedgerServiceServicer
    InitializeCounter, PostEntries = _Base.InitializeCounter, _Base.PostEntries
    StreamEntries, GetAccount = _Base.StreamEntries, _Base.GetAccount

    def __init__(self, fail: Callable[[int, Any], None]) -> None:
        self.keys: list[str] = []
        self._fail = fail  # called with (attempt number, context): aborts or stalls

    def PostEntry(self, request: Any, context: Any) -> ledger_pb2.PostEntryResponse:
        self.keys.append(request.idempotency_key)
        self._fail(len(self.keys), context)
        entry = ledger_pb2.Entry(sequence=1, idempotency_key=request.idempotency_key)
        return ledger_pb2.PostEntryResponse(entry=entry, replayed=len(self.keys) > 1)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(servicer: _Scripted) -> str:
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


def _post(client: LedgerClient) -> ledger_pb2.PostEntryResponse:
    return client.post_entry("l", debit_account="a", credit_account="b", amount=1, asset="USD")


@pytest.mark.parametrize("code", sorted({row.code for row in ERRORS.values()}, key=str))
def test_the_client_retries_only_unavailable_and_deadline_exceeded(
    serve: Any, code: grpc.StatusCode
) -> None:
    def fail(attempt: int, context: Any) -> None:
        context.abort(code, "scripted")

    servicer = _Scripted(fail)
    client = LedgerClient(serve(servicer), max_attempts=3, backoff=0.01)
    with client, pytest.raises(grpc.RpcError) as error:
        _post(client)
    assert error.value.code() == code
    retried = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(servicer.keys) == (3 if retried else 1)
    assert len(set(servicer.keys)) == 1  # every attempt carries the same key


def test_the_client_retries_its_own_deadline_with_the_same_key(serve: Any) -> None:
    def fail(attempt: int, context: Any) -> None:
        if attempt == 1:
            time.sleep(1.0)  # past the attempt's deadline; its answer is lost

    servicer = _Scripted(fail)
    with LedgerClient(serve(servicer), timeout=0.5, backoff=0.01) as client:
        result = _post(client)
    assert len(servicer.keys) >= 2 and len(set(servicer.keys)) == 1
    assert result.replayed and result.entry.idempotency_key == servicer.keys[0]


def test_total_timeout_bounds_the_retries(serve: Any) -> None:
    servicer = _Scripted(lambda attempt, context: time.sleep(1))
    client = LedgerClient(
        serve(servicer), timeout=0.1, total_timeout=0.6, max_attempts=1000, backoff=0.01
    )
    with client, pytest.raises(grpc.RpcError) as error:
        _post(client)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Each attempt takes its 0.1 s deadline, so 0.6 s allow a handful, not 1000.
    assert 1 <= len(servicer.keys) <= 10, len(servicer.keys)
