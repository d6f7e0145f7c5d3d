"""Prometheus metrics of one server, in a registry of its own (so that tests
and several servers in one process stay apart), served over HTTP at /metrics.

The hooks record once per call or per transaction, never per entry: a call
costs one pre-bound counter increment and one histogram observation. With
metrics off the hooks hold NO_METRICS, whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SERVICE = "ledger.v1.LedgerService"

# Seconds. Up to a minute: StreamEntries is timed until its stream ends.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Entries per group-commit transaction (at most 1000).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
# Entries a follower is behind its ledger's head.
LAG_BUCKETS = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class MethodMetrics:
    """One LedgerService method's calls; this base records nothing."""

    __slots__ = ()

    def ok(self, seconds: float) -> None:
        pass

    def failed(self, code: str, reason: str, seconds: float) -> None:
        """`reason`: the ErrorInfo reason, "" when the status carries none."""


_NO_METHOD = MethodMetrics()


class Metrics:
    """What the hooks record; this base (NO_METRICS) records nothing."""

    registry: CollectorRegistry | None = None

    def method(self, name: str, *, streaming: bool) -> MethodMetrics:
        return _NO_METHOD

    def batch(self, size: int) -> None:
        """A group-commit transaction of `size` posts."""

    def written(self, kind: str, seconds: float, posted: int, replayed: int) -> None:
        """A write (`kind`: group, atomic or single) took `seconds`; it
        committed `posted` new entries and replayed `replayed`."""

    def following(self) -> contextlib.AbstractContextManager[Any]:
        """Held while a following stream is open."""
        return contextlib.nullcontext()

    def lag(self, entries: int) -> None:
        """A live follower was just sent entries up to `entries` below the head."""

    def watch_consumers(self, lags: Callable[[], list[tuple[str, str, int]]]) -> None:
        """`lags()` gives (ledger, consumer, lag) of every named consumer;
        called at each scrape."""


NO_METRICS = Metrics()


class _ConsumerLags(Collector):
    """ledger_consumer_lag_entries, read from the database at each scrape:
    the positions live there, shared by every server process."""

    def __init__(self, lags: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._lags = lags

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "ledger_consumer_lag_entries",
            "Entries a named consumer has yet to acknowledge: its ledger's head minus its "
            "position (AckEntries)",
            labels=["ledger", "consumer"],
        )
        try:
            lags = self._lags()
        except Exception as exc:  # an unreachable database must not fail the scrape
            log.warning("consumer lag not measured: %s", exc)
            return
        for ledger, consumer, lag in lags:
            gauge.add_metric([ledger, consumer], lag)
        yield gauge


class _Method(MethodMetrics):
    __slots__ = ("_handled", "_labels", "_method", "_ok", "_refused", "_seconds")

    def __init__(self, metrics: PrometheusMetrics, name: str, streaming: bool) -> None:
        kind = "server_stream" if streaming else "unary"
        self._labels = (SERVICE, name, kind)
        self._method = name
        self._handled = metrics.handled
        self._refused = metrics.refused
        # Bound once: labels() per call would cost more than the increment.
        self._ok = metrics.handled.labels(*self._labels, "OK")
        self._seconds = metrics.handling_seconds.labels(*self._labels)

    def ok(self, seconds: float) -> None:
        self._ok.inc()
        self._seconds.observe(seconds)

    def failed(self, code: str, reason: str, seconds: float) -> None:
        self._handled.labels(*self._labels, code).inc()
        self._seconds.observe(seconds)
        if reason:
            self._refused.labels(self._method, reason).inc()


class PrometheusMetrics(Metrics):
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        # The names and labels of go-grpc-prometheus, so its dashboards apply.
        rpc = ["grpc_service", "grpc_method", "grpc_type"]
        self.handled = Counter(
            "grpc_server_handled",
            "LedgerService calls completed, by method and status code",
            [*rpc, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from a call's start to its answer (StreamEntries: to the stream's end)",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.refused = Counter(
            "ledger_refused_calls",
            "Calls answered with an error, by method and ErrorInfo reason",
            ["grpc_method", "reason"],
            registry=registry,
        )
        self._posted = Counter("ledger_entries_posted", "New entries committed", registry=registry)
        self._replayed = Counter(
            "ledger_entries_replayed",
            "Posts answered with the entry already stored under their idempotency key",
            registry=registry,
        )
        self._batches = Histogram(
            "ledger_group_commit_batch_size",
            "PostEntry calls per group-commit transaction",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._write_seconds = Histogram(
            "ledger_write_duration_seconds",
            "Seconds a write took, from the event loop's view (kind: group, atomic, single)",
            ["kind"],
            buckets=LATENCY_BUCKETS[:-2],
            registry=registry,
        )
        self._following = Gauge(
            "ledger_following_streams",
            "StreamEntries calls with follow open now (catching up or live)",
            registry=registry,
        )
        self._lag = Histogram(
            "ledger_stream_lag_entries",
            "Entries between a live follower's position and its ledger's head, "
            "observed each time the follower is sent new entries",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._write_kinds = {
            kind: self._write_seconds.labels(kind) for kind in ("group", "atomic", "single")
        }

    def method(self, name: str, *, streaming: bool) -> MethodMetrics:
        return _Method(self, name, streaming)

    def batch(self, size: int) -> None:
        self._batches.observe(size)

    def written(self, kind: str, seconds: float, posted: int, replayed: int) -> None:
        self._write_kinds[kind].observe(seconds)
        if posted:
            self._posted.inc(posted)
        if replayed:
            self._replayed.inc(replayed)

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        self._following.inc()
        try:
            yield
        finally:
            self._following.dec()

    def lag(self, entries: int) -> None:
        self._lag.observe(entries)

    def watch_consumers(self, lags: Callable[[], list[tuple[str, str, int]]]) -> None:
        assert self.registry is not None
        self.registry.register(_ConsumerLags(lags))


class MetricsServer:
    """/metrics over HTTP on `host:port` (port 0: a free one), in a thread
    of its own; close() stops it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._httpd, self._thread = start_http_server(port, host, registry=registry)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
