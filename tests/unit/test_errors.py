"""The one error table: every domain error becomes a canonical status with an
ErrorInfo (and BadRequest for bad input)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from ledger_service.api.errors import ERROR_DOMAIN, STATUS_OF, to_rpc_status
from ledger_service.domain import (
    CounterNotInitialized,
    FieldViolation,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
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


@pytest.mark.parametrize("error_class", list(STATUS_OF), ids=[c.__name__ for c in STATUS_OF])
def test_every_mapped_error_has_a_distinct_upper_snake_reason(
    error_class: type[LedgerError],
) -> None:
    reasons = [c.reason for c in STATUS_OF]
    assert reasons.count(error_class.reason) == 1
    assert error_class.reason.isupper() and " " not in error_class.reason
