"""Log lines on stderr, as text (the default) or one JSON object per line;
and the one line a failed or slow LedgerService call gets.

JSON with the standard library's logging alone: a formatter of a few lines
writes every record as {time, level, logger, message, ...its fields}, so
every logger of the process (gRPC's Python side, Alembic, ours) comes out
alike, and no dependency decides what a line may carry.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any

from ..api.errors import Failure

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; the others are a line's fields (extra=...).
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger,
    message, the fields passed as `extra`, and a traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def check_level(level: str) -> None:
    if level.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"--log-level: unknown level {level!r} (DEBUG, INFO, WARNING, ERROR)")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: {fmt!r} is not one of {', '.join(FORMATS)}")


def configure(level: str, fmt: str) -> None:
    """The root logger writes to stderr at `level`, as `fmt` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)  # warnings too become lines of JSON
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


call_log = logging.getLogger("ledger_service.calls")

# Errors the caller caused and can fix, and a drain's ends of streams:
# informational for the operator.
_CALLER_ERRORS = frozenset(
    {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS", "OUT_OF_RANGE", "NOT_FOUND"}
)
_EXPECTED_REASONS = frozenset({"SERVER_SHUTTING_DOWN"})
_LONGEST_LEDGER = 100


class CallLog:
    """Logs a failed call, or one slower than `slow_seconds` (0: none), in one
    line with its method, ledger, principal, status and duration. Never a
    token, an amount, a description or a metadata value: only the request's
    ledger is read, and an error's message, which may name fields, metadata
    keys and the idempotency key in question, not the entry's contents."""

    def __init__(self, slow_seconds: float = 0.0) -> None:
        self.slow_seconds = slow_seconds if slow_seconds > 0 else math.inf

    def slow(self, method: str, request: Any, principal: str, status: str, seconds: float) -> None:
        fields = _fields(method, request, principal, status, seconds)
        call_log.warning(
            "%s %s after %.1f ms (slow; ledger %r, principal %r)",
            method,
            status,
            fields["duration_ms"],
            fields["ledger"],
            principal,
            extra=fields,
        )

    def failed(self, method: str, failure: Failure) -> None:
        fields = _fields(
            method, failure.request, failure.principal, failure.status, failure.seconds
        )
        fields.update(peer=failure.peer, reason=failure.reason)
        if failure.unexpected:  # a bug: the traceback is for the operator only
            level, why = logging.ERROR, f"unexpected error: {type(failure.error).__name__}"
        else:
            expected = failure.status in _CALLER_ERRORS or failure.reason in _EXPECTED_REASONS
            level = logging.INFO if expected else logging.WARNING
            why = str(failure.error)
        fields["error"] = why
        call_log.log(
            level,
            "%s failed: %s %s in %.1f ms (ledger %r, principal %r, peer %s): %s",
            method,
            failure.status,
            failure.reason,
            fields["duration_ms"],
            fields["ledger"],
            failure.principal,
            failure.peer,
            why,
            extra=fields,
            exc_info=failure.error if failure.unexpected else None,
        )


def _fields(
    method: str, request: Any, principal: str, status: str, seconds: float
) -> dict[str, Any]:
    ledger = str(getattr(request, "ledger", ""))
    if len(ledger) > _LONGEST_LEDGER:  # a bad request's, unchecked: keep the line short
        ledger = ledger[:_LONGEST_LEDGER] + "..."
    return {
        "method": method,
        "ledger": ledger,
        "principal": principal,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
