"""What the end of one LedgerService call records (api/errors.map_errors
calls it once per call): its metrics, and a log line if it failed or was slow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import Failure
from .logs import CallLog
from .metrics import NO_METRICS, MethodMetrics, Metrics


class CallObserver:
    """One method's: built once at startup, so a call pays only what it records."""

    __slots__ = ("_log", "_method", "_metrics", "_slow")

    def __init__(self, method: str, metrics: MethodMetrics, log: CallLog, *, streaming: bool):
        self._method = method
        self._metrics = metrics
        self._log = log
        # A stream lasts as long as its consumer reads: never "slow".
        self._slow = math.inf if streaming else log.slow_seconds

    def ok(self, request: Any, principal: str, seconds: float) -> None:
        self._metrics.ok(seconds)
        if seconds >= self._slow:
            self._log.slow(self._method, request, principal, "OK", seconds)

    def failed(self, failure: Failure) -> None:
        self._metrics.failed(failure.status, failure.reason, failure.seconds)
        if not failure.logged:
            self._log.failed(self._method, failure)

    def ended(self, request: Any, principal: str, status: str, seconds: float) -> None:
        """Ended without an answer of ours: cancelled by the caller (its
        deadline, say: logged if slow), or aborted."""
        self._metrics.failed(status, "", seconds)
        if seconds >= self._slow:
            self._log.slow(self._method, request, principal, status, seconds)


@dataclass(frozen=True)
class Observability:
    """The metrics (NO_METRICS: off) and the call log the calls report to."""

    metrics: Metrics = NO_METRICS
    call_log: CallLog = field(default_factory=CallLog)

    def call(self, method: str, *, streaming: bool) -> CallObserver:
        return CallObserver(
            method,
            self.metrics.method(method, streaming=streaming),
            self.call_log,
            streaming=streaming,
        )
