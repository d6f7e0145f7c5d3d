"""Load for fault tests: callers that post and retry each key until it is
acknowledged, a follower that resumes its stream, and the check of what the
database holds afterwards."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.storage.timeouts import libpq_conninfo

from .conftest import batch_request, post_request

# What a well-behaved client retries with the same idempotency key.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True)
class Ack:
    key: str
    sequence: int
    started: float  # time.monotonic() of the attempt that was acknowledged
    finished: float


class Callers:
    """`n` threads, each posting keys one after another to `ledger` through
    its own channel, retrying a key (same request) after a retryable status
    until it is acknowledged. `errors` counts the statuses seen; anything
    else non-retryable ends that caller and lands in `failures`.
    `separate_connections`: each channel opens a TCP connection of its own
    (gRPC otherwise shares one between channels to one address), so that a
    kernel spreading connections over processes (`serve --workers`) sees them."""

    def __init__(
        self,
        address: str,
        ledger: str,
        *,
        n: int = 8,
        deadline: float = 2.0,
        separate_connections: bool = False,
    ) -> None:
        self.address = address
        self._options = [("grpc.use_local_subchannel_pool", 1)] if separate_connections else []
        self.ledger = ledger
        self.deadline = deadline
        self.acks: list[Ack] = []
        self.errors: Counter[grpc.StatusCode] = Counter()
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, give_up_after: float = 60.0) -> None:
        """Each caller finishes (acknowledges) the key it is on, then stops."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=give_up_after + 10)
        assert not any(t.is_alive() for t in self._threads), "a caller never got its key in"

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address, options=self._options) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            j = 0
            while not self._stop.is_set():
                j += 1
                try:
                    self._post_until_acknowledged(stub, f"c{i}-{j}")
                except BaseException as exc:
                    with self._lock:
                        self.failures.append(exc)
                    return

    def _post_until_acknowledged(self, stub: ledger_pb2_grpc.LedgerServiceStub, key: str) -> None:
        request = post_request(self.ledger, key)
        give_up = None
        while True:
            started = time.monotonic()
            try:
                response = stub.PostEntry(request, timeout=self.deadline)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                with self._lock:
                    self.errors[exc.code()] += 1
                if self._stop.is_set():
                    give_up = give_up or time.monotonic() + 60
                    if time.monotonic() > give_up:
                        raise
                time.sleep(0.05)
                continue
            with self._lock:
                self.acks.append(Ack(key, response.entry.sequence, started, time.monotonic()))
            return

    def acked(self) -> int:
        with self._lock:
            return len(self.acks)

    def wait_for_acks(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked() < count:
            assert time.monotonic() < deadline, f"only {self.acked()} of {count} posts acknowledged"
            assert not self.failures, self.failures
            time.sleep(0.05)

    def first_ack_started_after(self, moment: float, timeout: float = 60.0) -> Ack:
        """The first acknowledged post that began after `moment` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                later = [a for a in self.acks if a.started >= moment]
            if later:
                return min(later, key=lambda a: a.finished)
            assert time.monotonic() < deadline, "no post succeeded after the fault"
            assert not self.failures, self.failures
            time.sleep(0.05)


class Follower:
    """Follows `ledger` from the start, resuming from its last entry after
    a retryable error, as clients are told to; records every sequence."""

    def __init__(self, address: str, ledger: str) -> None:
        self.sequences: list[int] = []
        self.resumed = 0
        self.failure: BaseException | None = None
        self._address = address
        self._ledger = ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._call: Any = None  # the stream in progress, to cancel

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            while not self._stop.is_set():
                after = self.sequences[-1] if self.sequences else 0
                call = stub.StreamEntries(
                    ledger_pb2.StreamEntriesRequest(
                        ledger=self._ledger, after_sequence=after, follow=True
                    ),
                    timeout=300,
                )
                self._call = call
                try:
                    for message in call:
                        self.sequences.extend(e.sequence for e in message.entries)
                except grpc.RpcError as exc:
                    if self._stop.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                        return
                    if exc.code() not in RETRYABLE:
                        self.failure = exc
                        return
                    self.resumed += 1
                    time.sleep(0.1)

    def wait_for(self, last: int, timeout: float = 60.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while not self.sequences or self.sequences[-1] < last:
            assert self.failure is None, self.failure
            assert time.monotonic() < deadline, (
                f"the follower got to {self.sequences[-1:] or 0}, not {last}"
            )
            time.sleep(0.05)
        return list(self.sequences)


def stored_entries(database_url: str, ledger: str) -> tuple[int, dict[str, int]]:
    """(the counter's value, key -> sequence) read from the database itself."""
    with psycopg.connect(libpq_conninfo(sa.make_url(database_url))) as conn:
        row = conn.execute("SELECT value FROM ledger_counters WHERE ledger = %s", (ledger,))
        value = row.fetchone()
        assert value is not None, "no counter"
        rows = conn.execute(
            "SELECT idempotency_key, sequence FROM ledger_entries WHERE ledger = %s"
            " ORDER BY sequence",
            (ledger,),
        ).fetchall()
    keys = [key for key, _ in rows]
    assert len(set(keys)) == len(keys), "a key stored twice"
    assert [seq for _, seq in rows] == list(range(1, value[0] + 1)), "not exactly 1..N"
    return value[0], dict(rows)


def check_books(
    database_url: str, stub: ledger_pb2_grpc.LedgerServiceStub, ledger: str, acks: list[Ack]
) -> int:
    """The ledger holds exactly 1..N, each key once; every acknowledged key
    is stored with the number it was acknowledged with, and posting it again
    replays that entry. Returns N."""
    n, stored = stored_entries(database_url, ledger)
    assert stored == {a.key: a.sequence for a in acks}  # every key was retried until acked
    for start in range(0, len(acks), 1000):
        chunk = acks[start : start + 1000]
        again = stub.PostEntries(batch_request(ledger, [a.key for a in chunk]), timeout=30)
        assert [(r.replayed, r.entry.sequence) for r in again.results] == [
            (True, a.sequence) for a in chunk
        ]
    return n
