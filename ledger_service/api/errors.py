"""Domain errors -> canonical gRPC status and ErrorReason, in ONE table,
applied to every LedgerService method by map_errors.

Every error carries a google.rpc.ErrorInfo (domain "ledger.v1", reason = the
contract's ErrorReason value name without its ERROR_REASON_ prefix); bad input
also carries google.rpc.BadRequest field violations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from types import SimpleNamespace
from typing import Any, NamedTuple, NoReturn, Protocol, TypeAlias, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ..auth.access import CALLER
from ..domain.errors import (
    AccountTotalOverflow,
    AlreadyReversed,
    BalanceLimitExceeded,
    ConsumerBehind,
    CounterNotInitialized,
    DeadlineExceeded,
    EntryNotFound,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    Overloaded,
    PermissionDenied,
    PositionAhead,
    StandbyBehind,
    StorageUnavailable,
    TooManyStreams,
    Unauthenticated,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "ledger.v1"
Context = grpc.aio.ServicerContext[Any, Any]


class ShuttingDown(LedgerError):
    def __init__(self) -> None:
        super().__init__("server is shutting down; reconnect and resume from your last position")


class InternalError(LedgerError):
    def __init__(self) -> None:
        super().__init__("internal error; see the server log")


Reason: TypeAlias = ledger_pb2.ErrorReason.ValueType
_REASON_PREFIX = "ERROR_REASON_"


class Row(NamedTuple):
    """One row of the table: what an error class becomes on the wire."""

    code: grpc.StatusCode
    reason: Reason


# The one table. Same (reason, domain) always means the same thing; every
# ErrorReason but UNSPECIFIED is one row's (tests/unit/test_error_reasons.py).
ERRORS: dict[type[LedgerError], Row] = {
    InvalidArgument: Row(grpc.StatusCode.INVALID_ARGUMENT, ledger_pb2.ERROR_REASON_INVALID_FIELD),
    CounterNotInitialized: Row(
        grpc.StatusCode.FAILED_PRECONDITION, ledger_pb2.ERROR_REASON_COUNTER_NOT_INITIALIZED
    ),
    IdempotencyConflict: Row(
        grpc.StatusCode.ALREADY_EXISTS, ledger_pb2.ERROR_REASON_IDEMPOTENCY_KEY_REUSED
    ),
    AccountTotalOverflow: Row(
        grpc.StatusCode.FAILED_PRECONDITION, ledger_pb2.ERROR_REASON_ACCOUNT_TOTAL_OVERFLOW
    ),
    PositionAhead: Row(
        grpc.StatusCode.OUT_OF_RANGE, ledger_pb2.ERROR_REASON_POSITION_AHEAD_OF_LEDGER
    ),
    StorageUnavailable: Row(
        grpc.StatusCode.UNAVAILABLE, ledger_pb2.ERROR_REASON_STORAGE_UNAVAILABLE
    ),
    DeadlineExceeded: Row(
        grpc.StatusCode.DEADLINE_EXCEEDED, ledger_pb2.ERROR_REASON_DEADLINE_EXCEEDED
    ),
    Overloaded: Row(
        grpc.StatusCode.RESOURCE_EXHAUSTED, ledger_pb2.ERROR_REASON_TOO_MANY_PENDING_POSTS
    ),
    ShuttingDown: Row(grpc.StatusCode.UNAVAILABLE, ledger_pb2.ERROR_REASON_SERVER_SHUTTING_DOWN),
    InternalError: Row(grpc.StatusCode.INTERNAL, ledger_pb2.ERROR_REASON_INTERNAL),
    Unauthenticated: Row(grpc.StatusCode.UNAUTHENTICATED, ledger_pb2.ERROR_REASON_UNAUTHENTICATED),
    PermissionDenied: Row(
        grpc.StatusCode.PERMISSION_DENIED, ledger_pb2.ERROR_REASON_PERMISSION_DENIED
    ),
    TooManyStreams: Row(
        grpc.StatusCode.RESOURCE_EXHAUSTED, ledger_pb2.ERROR_REASON_TOO_MANY_STREAMS
    ),
    BalanceLimitExceeded: Row(
        grpc.StatusCode.FAILED_PRECONDITION, ledger_pb2.ERROR_REASON_BALANCE_LIMIT_EXCEEDED
    ),
    AlreadyReversed: Row(
        grpc.StatusCode.FAILED_PRECONDITION, ledger_pb2.ERROR_REASON_ALREADY_REVERSED
    ),
    EntryNotFound: Row(grpc.StatusCode.NOT_FOUND, ledger_pb2.ERROR_REASON_ENTRY_NOT_FOUND),
    StandbyBehind: Row(grpc.StatusCode.UNAVAILABLE, ledger_pb2.ERROR_REASON_STANDBY_BEHIND),
    ConsumerBehind: Row(
        grpc.StatusCode.FAILED_PRECONDITION, ledger_pb2.ERROR_REASON_CONSUMER_POSITION_BEHIND
    ),
}


def reason_name(reason: Reason) -> str:
    """The ErrorInfo reason string of an ErrorReason value, e.g.
    ERROR_REASON_INVALID_FIELD -> "INVALID_FIELD" (what clients compare)."""
    return ledger_pb2.ErrorReason.Name(reason).removeprefix(_REASON_PREFIX)


# Derived once: the wire strings of every row, and where unknown classes go.
_WIRE: dict[type[LedgerError], tuple[grpc.StatusCode, str]] = {
    cls: (row.code, reason_name(row.reason)) for cls, row in ERRORS.items()
}
_UNMAPPED = _WIRE[InternalError]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(exc: LedgerError) -> grpc.Status:
    code, reason = _WIRE.get(type(exc), _UNMAPPED)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=exc.metadata)
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


@dataclass(frozen=True, slots=True)
class Failure:
    """How a call failed, as map_errors saw it: what its observers record."""

    request: Any
    principal: str
    peer: str
    status: str  # the gRPC status code's name
    reason: str  # the ErrorInfo reason
    seconds: float
    error: BaseException
    logged: bool = False  # logged already where it was decided (auth refusals)
    unexpected: bool = False  # a bug


class CallReport(Protocol):
    """Where one method's calls report how they ended (observability/calls.py)."""

    def ok(self, request: Any, principal: str, seconds: float) -> None: ...

    def failed(self, failure: Failure) -> None: ...

    def ended(self, request: Any, principal: str, status: str, seconds: float) -> None:
        """Ended without an answer of ours: cancelled by the caller, or aborted."""


class Observe(Protocol):
    def call(self, method: str, *, streaming: bool) -> CallReport: ...


class _Unobserved:
    """Without an observer: only a bug is logged, with its traceback."""

    def ok(self, request: Any, principal: str, seconds: float) -> None:
        pass

    def failed(self, failure: Failure) -> None:
        if failure.unexpected:
            log.error("unexpected error", exc_info=failure.error)

    def ended(self, request: Any, principal: str, status: str, seconds: float) -> None:
        pass


# Refusals auth.access logs itself, with the principal and the peer.
_LOGGED_BY_GATE = (Unauthenticated, PermissionDenied)


async def _abort(
    context: Context, exc: BaseException, call: CallReport, request: Any, seconds: float
) -> NoReturn:
    if isinstance(exc, LedgerError):
        unexpected, (code, reason) = False, _WIRE.get(type(exc), _UNMAPPED)
    else:
        unexpected, (code, reason) = True, _UNMAPPED
    call.failed(
        Failure(
            request,
            _principal(),
            context.peer(),
            code.name,
            reason,
            seconds,
            exc,
            logged=isinstance(exc, _LOGGED_BY_GATE),
            unexpected=unexpected,
        )
    )
    status = to_rpc_status(exc if isinstance(exc, LedgerError) else InternalError())
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


def _principal() -> str:
    principal = CALLER.get()  # set by the guard (auth.access), in this call's context
    return "" if principal is None else principal.name


def _aborted_code(context: Context) -> str:
    """The code of a call a method ended itself with context.abort."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


# guard(method name, request, context) runs before each call and may refuse
# it by raising: authentication and roles, and whether the database is ready.
Guard = Callable[[str, Any, Context], None]


def _open(method: str, request: Any, context: Context) -> None:
    pass


def map_errors(
    servicer: ledger_pb2_grpc.LedgerServiceServicer,
    guard: Guard = _open,
    observe: Observe | None = None,
) -> ledger_pb2_grpc.LedgerServiceServicer:
    """The LedgerService methods of `servicer`, each wrapped once so that the
    guard runs first, an exception escaping it becomes a rich status, and
    its end is reported to `observe` (metrics, the call log; without it
    only unexpected errors are logged). Ready for
    add_LedgerServiceServicer_to_server. A stream refused by the guard ends
    before its first message.

    Why not a server interceptor: grpc.aio runs interceptors on every call
    (a pipeline of coroutines, and ours then built a new handler for the
    call); this wrapping is done once, at startup.
    """
    mapped = SimpleNamespace()  # what add_LedgerServiceServicer_to_server reads
    for method in ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].methods:
        inner = getattr(servicer, method.name)
        streaming = method.server_streaming
        wrap = _stream if streaming else _unary
        call = _Unobserved() if observe is None else observe.call(method.name, streaming=streaming)
        setattr(mapped, method.name, wrap(method.name, inner, guard, call))
    return cast(ledger_pb2_grpc.LedgerServiceServicer, mapped)


def _unary(
    name: str,
    inner: Callable[[Any, Context], Awaitable[Any]],
    guard: Guard,
    call: CallReport,
) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        start = perf_counter()
        try:
            guard(name, request, context)
            response = await inner(request, context)
        except grpc.aio.AbortError:
            call.ended(request, _principal(), _aborted_code(context), perf_counter() - start)
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            call.ended(request, _principal(), "CANCELLED", perf_counter() - start)
            raise
        except Exception as exc:
            await _abort(context, exc, call, request, perf_counter() - start)
        call.ok(request, _principal(), perf_counter() - start)
        return response

    return unary


def _stream(
    name: str,
    inner: Callable[[Any, Context], AsyncIterator[Any]],
    guard: Guard,
    call: CallReport,
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        start = perf_counter()
        try:
            guard(name, request, context)
            async for response in inner(request, context):
                yield response
        except grpc.aio.AbortError:
            call.ended(request, _principal(), _aborted_code(context), perf_counter() - start)
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the consumer went away
            call.ended(request, _principal(), "CANCELLED", perf_counter() - start)
            raise
        except Exception as exc:
            await _abort(context, exc, call, request, perf_counter() - start)
        call.ok(request, _principal(), perf_counter() - start)

    return stream
