"""Named consumers (AckEntries, ListConsumers, StreamEntries.consumer) and
streams filtered by account (StreamEntries.account, through_sequence),
through real server processes on both stores."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2

from ledger_service.testing import ServerProcess

from .conftest import FAST, details, init, post_request, run_threads
from .test_metrics import scrape, value


def ack(stub: Any, ledger: str, consumer: str, sequence: int) -> ledger_pb2.AckEntriesResponse:
    request = ledger_pb2.AckEntriesRequest(ledger=ledger, consumer=consumer, sequence=sequence)
    response: ledger_pb2.AckEntriesResponse = stub.AckEntries(request, timeout=10)
    return response


def refusal(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str], list[str]]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    info, fields = details(error.value)
    return error.value.code(), info.reason, dict(info.metadata), fields


def stream(stub: Any, ledger: str, **fields: Any) -> list[ledger_pb2.StreamEntriesResponse]:
    request = ledger_pb2.StreamEntriesRequest(ledger=ledger, **fields)
    return list(stub.StreamEntries(request, timeout=30))


def sequences(messages: list[ledger_pb2.StreamEntriesResponse]) -> list[int]:
    return [e.sequence for m in messages for e in m.entries]


def post_n(stub: Any, ledger: str, n: int, prefix: str = "k", **overrides: Any) -> None:
    for i in range(n):
        stub.PostEntry(post_request(ledger, f"{prefix}{i}", **overrides), timeout=30)


# -- named consumers ---------------------------------------------------------
def test_a_position_only_moves_forward_and_never_past_the_head(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_n(stub, ledger, 10)
    first = ack(stub, ledger, "billing", 4)
    assert (first.sequence, first.head_sequence) == (4, 10)
    again = ack(stub, ledger, "billing", 4)  # the same again: fine, unchanged
    assert (again.sequence, again.acked_at) == (4, first.acked_at)
    assert ack(stub, ledger, "billing", 7).sequence == 7

    code, reason, meta, _ = refusal(lambda: ack(stub, ledger, "billing", 6))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CONSUMER_POSITION_BEHIND")
    assert (meta["consumer"], meta["sequence"]) == ("billing", "7")

    code, reason, meta, _ = refusal(lambda: ack(stub, ledger, "billing", 11))
    assert (code, reason, meta["head_sequence"]) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "POSITION_AHEAD_OF_LEDGER",
        "10",
    )
    listed = stub.ListConsumers(ledger_pb2.ListConsumersRequest(ledger=ledger), timeout=10)
    assert [(c.consumer, c.sequence, c.lag) for c in listed.consumers] == [("billing", 7, 3)]


def test_bad_acks_name_the_field_and_store_nothing(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_n(stub, ledger, 2)
    for consumer, sequence, field in (
        ("", 1, "consumer"),
        ("bad name", 1, "consumer"),
        ("ok", -1, "sequence"),
    ):
        code, reason, _, fields = refusal(lambda c=consumer, s=sequence: ack(stub, ledger, c, s))
        assert (code, reason, fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            [field],
        )
    code, reason, _, _ = refusal(lambda: ack(stub, f"{ledger}-none", "ok", 0))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUNTER_NOT_INITIALIZED")
    listed = stub.ListConsumers(ledger_pb2.ListConsumersRequest(ledger=ledger), timeout=10)
    assert list(listed.consumers) == []
    assert listed.head_sequence == 2


def test_concurrent_acks_keep_the_highest_position(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_n(stub, ledger, 50)
    rng = random.Random(7)
    wanted = [rng.randint(0, 50) for _ in range(32)]

    def one(i: int) -> int:
        try:
            return ack(stub, ledger, "racer", wanted[i]).sequence
        except grpc.RpcError as exc:
            info, _ = details(exc)
            assert info.reason == "CONSUMER_POSITION_BEHIND"
            return -1

    results = run_threads(len(wanted), one)
    assert not [r for r in results if isinstance(r, Exception)]
    listed = stub.ListConsumers(ledger_pb2.ListConsumersRequest(ledger=ledger), timeout=10)
    assert [(c.consumer, c.sequence) for c in listed.consumers] == [("racer", max(wanted))]
    # Whoever was told "stored" saw a position at or below the final one.
    assert all(r <= max(wanted) for r in results)
    assert max(wanted) in results


def test_a_named_stream_starts_after_the_stored_position(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_n(stub, ledger, 12)
    assert sequences(stream(stub, ledger, consumer="new")) == list(range(1, 13))
    ack(stub, ledger, "proj", 9)
    assert sequences(stream(stub, ledger, consumer="proj")) == [10, 11, 12]
    # A position given wins over the stored one.
    assert sequences(stream(stub, ledger, consumer="proj", after_sequence=3)) == list(range(4, 13))
    ack(stub, ledger, "proj", 12)
    at_end = stream(stub, ledger, consumer="proj")
    assert [(len(m.entries), m.caught_up, m.through_sequence) for m in at_end] == [(0, True, 12)]
    listed = stub.ListConsumers(ledger_pb2.ListConsumersRequest(ledger=ledger), timeout=10)
    assert [(c.consumer, c.lag) for c in listed.consumers] == [("proj", 0)]


def test_positions_survive_a_server_restart(fresh_pg_url: str, ledger: str) -> None:
    with ServerProcess(fresh_pg_url, extra_args=FAST) as server:
        init(server.stub, ledger)
        post_n(server.stub, ledger, 5)
        ack(server.stub, ledger, "etl", 3)
        server.kill()  # no drain: the ack was durable when answered
        server.start()
        assert sequences(stream(server.stub, ledger, consumer="etl")) == [4, 5]


def test_consumer_lag_is_a_gauge(pg_url: str, ledger: str) -> None:
    with ServerProcess(pg_url, extra_args=[*FAST, "--metrics-listen", "127.0.0.1:0"]) as server:
        init(server.stub, ledger)
        post_n(server.stub, ledger, 8)
        ack(server.stub, ledger, "a", 8)
        ack(server.stub, ledger, "b", 3)
        (port,) = [
            int(line.rsplit(":", 1)[1].split("/")[0])
            for line in server.lines
            if "metrics at http://" in line
        ]
        samples = scrape(port)
        lag = "ledger_consumer_lag_entries"
        assert value(samples, lag, ledger=ledger, consumer="a") == 0
        assert value(samples, lag, ledger=ledger, consumer="b") == 5
        post_n(server.stub, ledger, 2, prefix="more")
        assert value(scrape(port), lag, ledger=ledger, consumer="b") == 7


# -- filtered streams --------------------------------------------------------
def _post_mixed(stub: Any, ledger: str, n: int) -> dict[int, set[str]]:
    """n entries over a few accounts and assets, some of several postings;
    returns each number's accounts."""
    rng = random.Random(11)
    touched: dict[int, set[str]] = {}
    names = ["cash", "sales", "fees", "bank", "tax"]
    for i in range(n):
        if i % 5 == 4:
            a, b, c = rng.sample(names, 3)
            postings = [
                ledger_pb2.Posting(debit_account=a, credit_account=b, amount=3, asset="USD"),
                ledger_pb2.Posting(debit_account=b, credit_account=c, amount=2, asset="EUR"),
            ]
            request = ledger_pb2.PostEntryRequest(
                ledger=ledger, idempotency_key=f"m{i}", postings=postings
            )
            accounts = {a, b, c}
        else:
            a, b = rng.sample(names, 2)
            asset = "USD" if i % 2 else "EUR"
            request = post_request(ledger, f"m{i}", debit_account=a, credit_account=b, asset=asset)
            accounts = {a, b}
        response = stub.PostEntry(request, timeout=30)
        touched[response.entry.sequence] = accounts
    return touched


def test_a_filtered_stream_sends_exactly_the_accounts_entries(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    touched = _post_mixed(stub, ledger, 120)
    for account in ("cash", "tax", "nobody"):
        expected = [s for s, accounts in sorted(touched.items()) if account in accounts]
        messages = stream(stub, ledger, account=account)
        got = [e for m in messages for e in m.entries]
        assert [e.sequence for e in got] == expected
        assert all(
            account in {x for p in e.postings for x in (p.debit_account, p.credit_account)}
            for e in got
        )
        assert messages[-1].caught_up and messages[-1].through_sequence == 120
        assert sum(m.caught_up for m in messages) == 1
        # Resuming from any message's through_sequence misses nothing.
        for m in messages:
            rest = sequences(
                stream(stub, ledger, account=account, after_sequence=m.through_sequence)
            )
            assert rest == [s for s in expected if s > m.through_sequence]


def test_a_filtered_stream_pages_through_many_matches(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    # More matches than one read holds (4096), in batches.
    keys = [f"b{i}" for i in range(5000)]
    for start in range(0, len(keys), 1000):
        entries = [
            ledger_pb2.EntryInput(
                idempotency_key=k,
                debit_account="hot" if j % 5 else "cold",
                credit_account="other",
                amount=1,
                asset="USD",
            )
            for j, k in enumerate(keys[start : start + 1000], start)
        ]
        stub.PostEntries(ledger_pb2.PostEntriesRequest(ledger=ledger, entries=entries), timeout=60)
    messages = stream(stub, ledger, account="hot")
    expected = [j + 1 for j in range(5000) if j % 5]
    assert sequences(messages) == expected
    throughs = [m.through_sequence for m in messages]
    assert throughs == sorted(throughs) and throughs[-1] == 5000
    assert all(m.through_sequence >= m.entries[-1].sequence for m in messages if m.entries)


def test_a_filtered_follower_gets_live_entries_and_heartbeats_advance(
    server: ServerProcess, ledger: str
) -> None:
    stub = server.stub
    init(stub, ledger)
    post_n(stub, ledger, 3, debit_account="mine", credit_account="other")
    call = stub.StreamEntries(
        ledger_pb2.StreamEntriesRequest(ledger=ledger, account="mine", follow=True), timeout=60
    )
    got: list[ledger_pb2.StreamEntriesResponse] = []
    done = threading.Event()

    def read() -> None:
        try:
            for message in call:
                got.append(message)
                if sequences(got)[-1:] == [8]:
                    break
        except grpc.RpcError:
            pass
        finally:
            done.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        post_n(stub, ledger, 3, prefix="x", debit_account="a", credit_account="b")  # 4..6
        post_n(stub, ledger, 1, prefix="y", debit_account="other", credit_account="mine")  # 7
        post_n(stub, ledger, 1, prefix="z", debit_account="mine", credit_account="b")  # 8
        assert done.wait(30)
    finally:
        call.cancel()
        reader.join(10)
    assert sequences(got) == [1, 2, 3, 7, 8]
    assert got[-1].through_sequence >= 8


def test_filtered_heartbeats_carry_the_position_past_other_entries(
    fresh_pg_url: str, ledger: str
) -> None:
    args = [*FAST, "--heartbeat-interval", "0.3"]
    with ServerProcess(fresh_pg_url, extra_args=args) as server:
        stub = server.stub
        init(stub, ledger)
        post_n(stub, ledger, 2, debit_account="mine", credit_account="other")
        call = stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger, account="mine", follow=True),
            timeout=60,
        )
        messages: Iterator[ledger_pb2.StreamEntriesResponse] = iter(call)
        first = next(messages)
        assert sequences([first]) == [1, 2] and first.caught_up
        post_n(stub, ledger, 4, prefix="x", debit_account="a", credit_account="b")  # 3..6
        beats = (m for m in messages if m.heartbeat)
        for _ in range(50):  # bounded: heartbeats come every 0.3 s
            beat = next(beats)
            assert not beat.entries
            if beat.through_sequence == 6:
                break
        else:
            pytest.fail("heartbeats never reached entry 6")
        call.cancel()


def test_bad_stream_filters_name_the_field(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    for fields, name in (({"account": "x" * 129}, "account"), ({"consumer": "a b"}, "consumer")):
        code, reason, _, violations = refusal(lambda f=fields: stream(stub, ledger, **f))
        assert (code, reason, violations) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            [name],
        )
