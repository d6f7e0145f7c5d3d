"""Reads from a real hot standby (`--read-database-url`): a primary and a
streaming replica built by the test itself (tests/standby.py), a real server
writing to the one and reading from the other."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
from ledger.v1 import ledger_pb2

from ledger_service.testing import ServerProcess

from .. import standby
from ..standby import ReplicatedPair
from .conftest import FAST, details, init, post_request

standby_pair = standby.standby_pair


def serve(pair: ReplicatedPair, replay_wait: float) -> ServerProcess:
    return ServerProcess(
        pair.primary_url,
        extra_args=[
            *FAST,
            "--read-database-url",
            pair.standby_url,
            "--read-replay-wait",
            str(replay_wait),
        ],
    )


@pytest.fixture(scope="module")
def server(standby_pair: ReplicatedPair) -> Iterator[ServerProcess]:
    with serve(standby_pair, replay_wait=1.0) as running:
        yield running


@pytest.fixture
def paused(standby_pair: ReplicatedPair) -> Iterator[ReplicatedPair]:
    """Replay paused for the test; resumed (and caught up) after it."""
    standby_pair.wait_caught_up()
    standby_pair.pause_replay()
    standby_pair.wait_replay_paused()
    try:
        yield standby_pair
    finally:
        standby_pair.resume_replay()
        standby_pair.wait_caught_up()


def post(stub: Any, ledger: str, first: int, last: int) -> None:
    for i in range(first, last + 1):
        stub.PostEntry(post_request(ledger, f"k{i}"), timeout=30)


def head_on(url: str, ledger: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT value FROM ledger_counters WHERE ledger = %s", (ledger,)
        ).fetchone()
    return None if row is None else int(row[0])


class Follower:
    """A following stream read by a thread into a queue of sequences."""

    def __init__(self, stub: Any, ledger: str, after: int = 0) -> None:
        request = ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=after, follow=True)
        self.call = stub.StreamEntries(request, timeout=120)
        self.got: queue.Queue[int] = queue.Queue()
        self.heads: list[int] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.heads.append(message.head_sequence)
                for entry in message.entries:
                    self.got.put(entry.sequence)
        except grpc.RpcError:
            pass

    def take(self, n: int, timeout: float = 30) -> list[int]:
        return [self.got.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def test_a_follower_on_the_standby_waits_for_replay_and_never_skips(
    server: ServerProcess, standby_pair: ReplicatedPair, ledger: str
) -> None:
    stub = server.stub
    init(stub, ledger)
    standby_pair.wait_caught_up()
    post(stub, ledger, 1, 40)
    follower = Follower(stub, ledger)
    try:
        assert follower.take(40) == list(range(1, 41))
        standby_pair.pause_replay()
        standby_pair.wait_replay_paused()
        post(stub, ledger, 41, 55)  # committed on the primary, not replayed
        assert head_on(standby_pair.primary_url, ledger) == 55
        assert head_on(standby_pair.standby_url, ledger) == 40
        # The notifications came from the primary; the standby has nothing
        # new, and the stream must not conclude anything from it.
        with pytest.raises(queue.Empty):
            follower.got.get(timeout=1.5)
        got = stub.GetLedger(ledger_pb2.GetLedgerRequest(ledger=ledger), timeout=10)
        assert got.head_sequence == 40  # reads mean the standby's replay point
        standby_pair.resume_replay()
        assert follower.take(15) == list(range(41, 56))
        assert max(follower.heads) == 55
    finally:
        standby_pair.resume_replay()
        follower.close()


def test_a_counter_not_yet_replayed_is_standby_behind_then_found(
    server: ServerProcess, paused: ReplicatedPair, ledger: str
) -> None:
    stub = server.stub
    init(stub, ledger)  # a write: on the primary
    request = ledger_pb2.GetLedgerRequest(ledger=ledger)
    with pytest.raises(grpc.RpcError) as error:
        stub.GetLedger(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    info, _ = details(error.value)
    assert (info.reason, info.metadata["ledger"]) == ("STANDBY_BEHIND", ledger)
    # A ledger the primary does not have either is answered at once.
    with pytest.raises(grpc.RpcError) as error:
        stub.GetLedger(ledger_pb2.GetLedgerRequest(ledger=f"{ledger}-none"), timeout=30)
    assert details(error.value)[0].reason == "COUNTER_NOT_INITIALIZED"
    paused.resume_replay()
    paused.wait_caught_up()
    assert stub.GetLedger(request, timeout=30).head_sequence == 0


def test_reads_wait_for_replay_within_the_bound(
    standby_pair: ReplicatedPair, paused: ReplicatedPair, ledger: str
) -> None:
    with serve(standby_pair, replay_wait=60.0) as patient:
        stub = patient.stub
        init(stub, ledger)
        post(stub, ledger, 1, 5)
        answers: queue.Queue[Any] = queue.Queue()

        def call(name: str, fn: Any) -> None:
            try:
                answers.put((name, fn()))
            except grpc.RpcError as exc:
                answers.put((name, exc))

        calls = {
            "entry": lambda: (
                stub.GetEntry(
                    ledger_pb2.GetEntryRequest(ledger=ledger, idempotency_key="k5"), timeout=90
                ).entry.sequence
            ),
            "stream": lambda: [
                e.sequence
                for m in stub.StreamEntries(
                    ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=3), timeout=90
                )
                for e in m.entries
            ],
            "account": lambda: (
                stub.GetAccount(
                    ledger_pb2.GetAccountRequest(ledger=ledger, account="cash", as_of_sequence=5),
                    timeout=90,
                ).as_of_sequence
            ),
        }
        threads = [threading.Thread(target=call, args=item) for item in calls.items()]
        for t in threads:
            t.start()
        time.sleep(0.5)  # let them reach the wait (not asserted: either way they must succeed)
        assert answers.empty()  # replay is paused: nobody could have answered yet
        paused.resume_replay()
        for t in threads:
            t.join(90)
        results = dict(answers.get_nowait() for _ in calls)
        assert results == {"entry": 5, "stream": [4, 5], "account": 5}
