"""The one error table: every domain error becomes a canonical status with an
ErrorInfo (and BadRequest for bad input)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.api.errors import (
    ERROR_DOMAIN,
    ERRORS,
    map_errors,
    reason_name,
    to_rpc_status,
)
from ledger_service.domain.errors import (
    CounterNotInitialized,
    FieldViolation,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    PositionAhead,
)


def decode(status: grpc.Status) -> status_pb2.Status:
    (key, value), *_ = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def test_counter_not_initialized_is_failed_precondition_with_reason() -> None:
    status = to_rpc_status(CounterNotInitialized("books"))
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "InitializeCounter" in status.details
    info = error_details_pb2.ErrorInfo()
    decode(status).details[0].Unpack(info)
    assert (info.reason, info.domain, info.metadata["ledger"]) == (
        "COUNTER_NOT_INITIALIZED",
        ERROR_DOMAIN,
        "books",
    )


def test_invalid_argument_carries_field_violations() -> None:
    status = to_rpc_status(InvalidArgument([FieldViolation("amount", "must be > 0")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = decode(status).details
    bad = error_details_pb2.BadRequest()
    details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("amount", "must be > 0")]


def test_conflict_is_already_exists() -> None:
    status = to_rpc_status(IdempotencyConflict("l", "k", 3, ["amount"]))
    assert status.code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("error_class", list(ERRORS), ids=[c.__name__ for c in ERRORS])
def test_every_mapped_error_has_a_distinct_upper_snake_reason(
    error_class: type[LedgerError],
) -> None:
    reasons = [row.reason for row in ERRORS.values()]
    assert reasons.count(ERRORS[error_class].reason) == 1
    name = reason_name(ERRORS[error_class].reason)
    assert name.isupper() and " " not in name


class _Failing:
    """Raises what a servicer's bug or a domain error would raise (the other
    methods are the base servicer's UNIMPLEMENTED)."""

    InitializeCounter = ledger_pb2_grpc.LedgerServiceServicer.InitializeCounter
    PostEntries = ledger_pb2_grpc.LedgerServiceServicer.PostEntries
    GetLedger = ledger_pb2_grpc.LedgerServiceServicer.GetLedger
    SetAccountLimits = ledger_pb2_grpc.LedgerServiceServicer.SetAccountLimits
    ReverseEntry = ledger_pb2_grpc.LedgerServiceServicer.ReverseEntry
    GetEntry = ledger_pb2_grpc.LedgerServiceServicer.GetEntry
    ListAccounts = ledger_pb2_grpc.LedgerServiceServicer.ListAccounts
    AckEntries = ledger_pb2_grpc.LedgerServiceServicer.AckEntries
    ListConsumers = ledger_pb2_grpc.LedgerServiceServicer.ListConsumers

    async def PostEntry(self, request: Any, context: Any) -> Any:
        raise RuntimeError("secret connection string")

    async def GetAccount(self, request: Any, context: Any) -> Any:
        raise CounterNotInitialized(request.ledger)

    async def StreamEntries(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield ledger_pb2.StreamEntriesResponse(head_sequence=7)
        raise PositionAhead(request.ledger, request.after_sequence, 7)


async def _served(calls: Callable[[Any], Awaitable[None]]) -> None:
    server = grpc.aio.server()
    servicer = cast(ledger_pb2_grpc.LedgerServiceServicer, _Failing())
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(map_errors(servicer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await calls(ledger_pb2_grpc.LedgerServiceStub(channel))
    finally:
        await server.stop(None)


def _reason(error: grpc.aio.AioRpcError) -> str:
    metadata: Any = error.trailing_metadata()  # grpc-stubs type it loosely
    (details,) = [v for k, v in metadata if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return str(info.reason)


def test_map_errors_gives_every_method_a_rich_status_and_hides_unexpected_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def calls(stub: Any) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as bug:
            await stub.PostEntry(ledger_pb2.PostEntryRequest(ledger="l"), timeout=10)
        assert bug.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (bug.value.details() or "")
        assert _reason(bug.value) == "INTERNAL"

        with pytest.raises(grpc.aio.AioRpcError) as domain:
            await stub.GetAccount(ledger_pb2.GetAccountRequest(ledger="books"), timeout=10)
        assert domain.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(domain.value) == "COUNTER_NOT_INITIALIZED"

        call = stub.StreamEntries(ledger_pb2.StreamEntriesRequest(ledger="l", after_sequence=9))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as midway:
            async for message in call:
                received.append(message.head_sequence)
        assert received == [7]  # what was sent before the error still arrives
        assert midway.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert _reason(midway.value) == reason_name(ERRORS[PositionAhead].reason)

    asyncio.run(_served(calls))
    assert "secret connection string" in caplog.text  # logged for the operator
