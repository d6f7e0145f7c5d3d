"""Domain errors -> canonical gRPC status, in ONE table, applied by an interceptor.

Every error carries a google.rpc.ErrorInfo (domain "ledger.v1", UPPER_SNAKE
reason); bad input also carries google.rpc.BadRequest field violations.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain import (
    CounterNotInitialized,
    DeadlineExceeded,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    Overloaded,
    PositionAhead,
    StorageUnavailable,
    TotalOverflow,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "ledger.v1"
SERVICE_PREFIX = "/ledger.v1.LedgerService/"


class ShuttingDown(LedgerError):
    reason = "SERVER_SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("server is shutting down; reconnect and resume from your last position")


class InternalError(LedgerError):
    reason = "INTERNAL"

    def __init__(self) -> None:
        super().__init__("internal error; see the server log")


# The one table. Same (reason, domain) always means the same thing.
STATUS_OF: dict[type[LedgerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    CounterNotInitialized: grpc.StatusCode.FAILED_PRECONDITION,
    IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    TotalOverflow: grpc.StatusCode.FAILED_PRECONDITION,
    PositionAhead: grpc.StatusCode.OUT_OF_RANGE,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    InternalError: grpc.StatusCode.INTERNAL,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(exc: LedgerError) -> grpc.Status:
    code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata
            )
        )
    ]
    if isinstance(exc, InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in exc.violations
                    ]
                )
            )
        )
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=exc.message, details=details
    )
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    if isinstance(exc, LedgerError):
        status = to_rpc_status(exc)
    else:
        log.exception("unexpected error", exc_info=exc)
        status = to_rpc_status(InternalError())
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


# grpc-stubs type handlers for the sync server only, hence the Any below.
class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns exceptions escaping LedgerService methods into rich statuses."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
