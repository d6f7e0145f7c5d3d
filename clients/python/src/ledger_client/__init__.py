"""A small client for ledger.v1.LedgerService.

It adds what every caller would otherwise write: an idempotency key per post,
retries of UNAVAILABLE and DEADLINE_EXCEEDED with that same key (so a retry
never posts twice) within a bound on the whole call, and streams that resume
from the last entry they yielded after a disconnect.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

__all__ = ["LedgerClient", "error_info"]

# Codes after which the same request may be sent again. A post carries its
# idempotency key, so a retry after an unknown outcome replays, never doubles.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Codes after which a stream reconnects from its position. A stream has no
# deadline of ours, so a DEADLINE_EXCEEDED on one is not a stall to retry.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

R = TypeVar("R")


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo of a failed call (reason, domain, metadata)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


class LedgerClient:
    """Blocking client. `with LedgerClient("127.0.0.1:50051") as c: ...`"""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        total_timeout: float | None = 30.0,
        max_attempts: int = 6,
        backoff: float = 0.1,
        max_backoff: float = 3.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        # gRPC backs off reconnecting up to 120 s by default and fails calls
        # fast meanwhile; cap it near our own backoff so a restarted server is
        # found again within a retry or two.
        self._channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", int(backoff * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(backoff * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
            ],
        )
        self._stub = ledger_pb2_grpc.LedgerServiceStub(self._channel)
        self.timeout = timeout  # each attempt's deadline (s)
        # The whole retried call's deadline (s), backoff included; None: only
        # max_attempts bounds it, at up to max_attempts * timeout plus backoff.
        self.total_timeout = total_timeout
        self.max_attempts = max_attempts
        self._backoff = backoff
        self._max_backoff = max_backoff

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _backoff_delay(self, attempt: int) -> float:
        # Full jitter: many clients retrying after one outage do not stampede.
        return random.uniform(0, min(self._max_backoff, self._backoff * 2**attempt))

    def _sleep(self, attempt: int) -> None:
        time.sleep(self._backoff_delay(attempt))

    def _unary_with_retries(self, method: Callable[..., R], request: Any) -> R:
        """Sends the same request again after a retryable failure, within
        max_attempts and total_timeout; only for calls that are idempotent
        (InitializeCounter, PostEntry with its key)."""
        deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        for attempt in range(self.max_attempts):
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            try:
                return method(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt + 1 == self.max_attempts:
                    raise
                delay = self._backoff_delay(attempt)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise  # no time left for another attempt
                time.sleep(delay)
        raise AssertionError("unreachable")

    def initialize_counter(self, ledger: str) -> ledger_pb2.InitializeCounterResponse:
        request = ledger_pb2.InitializeCounterRequest(ledger=ledger)
        # Idempotent by contract, so safe to retry.
        return self._unary_with_retries(self._stub.InitializeCounter, request)

    def post_entry(
        self,
        ledger: str,
        *,
        debit_account: str,
        credit_account: str,
        amount: int,
        asset: str,
        idempotency_key: str | None = None,
        entry_type: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ledger_pb2.PostEntryResponse:
        """Posts one entry. Without `idempotency_key` a fresh UUID is used; every
        retry of this call reuses it, so the entry is posted at most once. If an
        attempt committed but its answer was lost, the next one returns that
        entry with `replayed` true."""
        request = ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            debit_account=debit_account,
            credit_account=credit_account,
            amount=amount,
            asset=asset,
            entry_type=entry_type,
            description=description,
            metadata=dict(metadata or {}),
        )
        return self._unary_with_retries(self._stub.PostEntry, request)

    def get_account(self, ledger: str, account: str) -> ledger_pb2.GetAccountResponse:
        response: ledger_pb2.GetAccountResponse = self._stub.GetAccount(
            ledger_pb2.GetAccountRequest(ledger=ledger, account=account), timeout=self.timeout
        )
        return response

    def stream_messages(
        self, ledger: str, *, after_sequence: int = 0, follow: bool = False
    ) -> Iterator[ledger_pb2.StreamEntriesResponse]:
        """StreamEntries messages (entries, caught-up markers, heartbeats). After
        a retryable failure it reconnects from the last entry it yielded, so
        no entry is yielded twice or skipped."""
        position = after_sequence
        failures = 0
        while True:
            call = self._stub.StreamEntries(
                ledger_pb2.StreamEntriesRequest(
                    ledger=ledger, after_sequence=position, follow=follow
                )
            )
            try:
                for message in call:
                    failures = 0
                    if message.entries:
                        # A resumed stream starts right after `position`; this
                        # check guards the guarantee rather than trusting it.
                        first = message.entries[0].sequence
                        if first != position + 1:
                            raise RuntimeError(
                                f"stream out of order: expected {position + 1}, got {first}"
                            )
                        position = message.entries[-1].sequence
                    yield message
                return
            except grpc.RpcError as exc:
                if exc.code() not in RESUMABLE:
                    raise
                failures += 1
                if failures >= self.max_attempts:
                    raise
                self._sleep(failures)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

    def stream_entries(
        self, ledger: str, *, after_sequence: int = 0, follow: bool = False
    ) -> Iterator[ledger_pb2.Entry]:
        """Entries in order from after_sequence + 1, resuming after disconnects."""
        for message in self.stream_messages(ledger, after_sequence=after_sequence, follow=follow):
            yield from message.entries
