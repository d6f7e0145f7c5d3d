"""StreamEntries through real server processes: catch-up, resume, live
followers across processes, heartbeats, slow consumers, shutdown."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_client import LedgerClient, error_info

from ledger_service.domain.limits import STREAM_MESSAGE_MAX_ENTRIES
from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from .conftest import FAST, collect_stream, details, init, post_request, run_threads


def post_many(stub: Any, ledger: str, n: int, prefix: str = "k", **overrides: Any) -> None:
    for i in range(n):
        stub.PostEntry(post_request(ledger, f"{prefix}{i}", **overrides), timeout=30)


def test_catch_up_sends_bounded_batches_in_order_then_ends(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    n = STREAM_MESSAGE_MAX_ENTRIES * 2 + 10
    post_many(stub, ledger, n)
    messages = collect_stream(stub, ledger)
    sequences = [e.sequence for m in messages for e in m.entries]
    assert sequences == list(range(1, n + 1))
    assert all(len(m.entries) <= STREAM_MESSAGE_MAX_ENTRIES for m in messages)
    assert len(messages) == 3  # many entries per message, not one each
    assert [m.caught_up for m in messages] == [False, False, True]
    assert all(m.head_sequence >= m.entries[-1].sequence for m in messages if m.entries)


def test_stream_resumes_after_a_position(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_many(stub, ledger, 30)
    sequences = [e.sequence for m in collect_stream(stub, ledger, after=17) for e in m.entries]
    assert sequences == list(range(18, 31))
    at_end = collect_stream(stub, ledger, after=30)
    assert [(len(m.entries), m.caught_up, m.head_sequence) for m in at_end] == [(0, True, 30)]


def test_position_beyond_the_ledger_is_out_of_range(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    post_many(stub, ledger, 3)
    with pytest.raises(grpc.RpcError) as error:
        collect_stream(stub, ledger, after=4)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info, _ = details(error.value)
    assert (info.reason, info.metadata["head_sequence"]) == ("POSITION_AHEAD_OF_LEDGER", "3")


def test_bad_stream_requests_are_rejected(stub: Any, ledger: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        collect_stream(stub, ledger)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error.value)[0].reason == "COUNTER_NOT_INITIALIZED"
    init(stub, ledger)
    with pytest.raises(grpc.RpcError) as error:
        collect_stream(stub, ledger, after=-1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error.value)[1] == ["after_sequence"]


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_followers_on_two_processes_each_see_one_to_n_in_order_while_writers_run(
    request: pytest.FixtureRequest, store: str, ledger: str
) -> None:
    url = request.getfixturevalue("pg_url" if store == "postgres" else "sqlite_url")
    writers, per_writer, followers = 4, 40, 4
    n = writers * per_writer
    with ServerProcess(url, extra_args=FAST) as a, ServerProcess(url, extra_args=FAST) as b:
        servers = (a, b)
        init(a.stub, ledger)
        post_many(a.stub, ledger, 5, prefix="early")  # followers start mid-history
        total = n + 5
        started = threading.Barrier(followers + 1)

        def follow(i: int) -> list[int]:
            with grpc.insecure_channel(servers[i % 2].address) as channel:
                call = ledger_pb2_grpc.LedgerServiceStub(channel).StreamEntries(
                    ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=0, follow=True),
                    timeout=120,
                )
                seen: list[int] = []
                first = True
                for message in call:
                    if first:
                        started.wait()
                        first = False
                    seen.extend(e.sequence for e in message.entries)
                    if seen and seen[-1] >= total:
                        call.cancel()
                        break
                return seen

        results: list[Any] = [None] * followers
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, follow(i)))
            for i in range(followers)
        ]
        for t in threads:
            t.start()
        started.wait()  # every follower is live before writing starts
        run_threads(
            writers,
            lambda w: post_many(servers[w % 2].stub, ledger, per_writer, prefix=f"w{w}-"),
        )
        for t in threads:
            t.join(150)
        for seen in results:
            assert seen == list(range(1, total + 1))


def listen_pids(engine: Any, server_pid: int) -> list[int]:
    """Backends of the server process's LISTEN connection."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                    "AND query LIKE 'LISTEN%'"
                ),
                {"name": f"ledger-service-listen {server_pid}"},
            ).scalars()
        )


def wait_for_listener(engine: Any, server_pid: int, replacing: int | None = None) -> list[int]:
    """The server's LISTEN backends once there is one (other than `replacing`)."""
    deadline = time.monotonic() + 30
    while True:
        pids = listen_pids(engine, server_pid)
        if pids and replacing not in pids:
            return pids
        assert time.monotonic() < deadline, "the server did not (re)start listening"
        time.sleep(0.05)


def test_one_listen_connection_per_following_process_wakes_followers_without_polling(
    pg_url: str, ledger: str
) -> None:
    """Polling is effectively off (1 hour), so entries written through process
    A reach followers on process B only through LISTEN/NOTIFY. A, which has no
    followers, does not listen at all."""
    no_poll = ["--poll-interval", "3600", "--shutdown-grace", "5"]
    with (
        ServerProcess(pg_url, extra_args=no_poll) as a,
        ServerProcess(pg_url, extra_args=no_poll) as b,
    ):
        init(a.stub, ledger)
        calls = [
            b.stub.StreamEntries(
                ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
            )
            for _ in range(5)
        ]
        for call in calls:
            assert next(iter(call)).caught_up
        assert a.proc is not None and b.proc is not None
        engine = create_engine(pg_url, pool_size=1)
        try:
            # One per following process, not one per stream (B starts
            # listening once its followers are live); none where nothing follows.
            assert len(wait_for_listener(engine, b.proc.pid)) == 1
            assert listen_pids(engine, a.proc.pid) == []
        finally:
            engine.dispose()
        post_many(a.stub, ledger, 3)
        for call in calls:
            got: list[int] = []
            while len(got) < 3:
                got.extend(e.sequence for e in next(iter(call)).entries)
            assert got == [1, 2, 3]
            call.cancel()


def test_followers_are_woken_again_after_the_listen_connection_is_lost(
    pg_url: str, ledger: str
) -> None:
    """Polling is off: after B's LISTEN connection is killed, only B's
    reconnected listener can tell its follower about entries posted via A."""
    no_poll = ["--poll-interval", "3600", "--shutdown-grace", "5"]
    with (
        ServerProcess(pg_url, extra_args=no_poll) as a,
        ServerProcess(pg_url, extra_args=no_poll) as b,
    ):
        assert b.proc is not None
        init(a.stub, ledger)
        call = b.stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
        )
        assert next(iter(call)).caught_up
        engine = create_engine(pg_url, pool_size=1)
        try:
            (old,) = wait_for_listener(engine, b.proc.pid)
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": old})
            wait_for_listener(engine, b.proc.pid, replacing=old)
        finally:
            engine.dispose()
        post_many(a.stub, ledger, 3)
        got: list[int] = []
        while len(got) < 3:
            got.extend(e.sequence for e in next(iter(call)).entries)
        assert got == [1, 2, 3]
        call.cancel()


def test_idle_follower_gets_heartbeats(sqlite_url: str, ledger: str) -> None:
    with ServerProcess(sqlite_url, extra_args=[*FAST, "--heartbeat-interval", "0.3"]) as server:
        init(server.stub, ledger)
        post_many(server.stub, ledger, 2)
        call = server.stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
        )
        first = next(iter(call))
        assert [e.sequence for e in first.entries] == [1, 2] and first.caught_up
        beats = [next(iter(call)), next(iter(call))]
        assert all(m.heartbeat and not m.entries and m.head_sequence == 2 for m in beats)
        call.cancel()


def test_a_consumer_that_stops_reading_blocks_neither_writers_nor_other_consumers(
    pg_server: ServerProcess, ledger: str
) -> None:
    stub = pg_server.stub
    init(stub, ledger)
    stalled = stub.StreamEntries(
        ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=120
    )
    next(iter(stalled))  # connected, then never read again
    n = 1500  # ~1.5 MB of entries: far beyond the HTTP/2 flow-control window
    post_many(stub, ledger, n, description="x" * 1000)
    sequences = [e.sequence for m in collect_stream(stub, ledger) for e in m.entries]
    assert sequences == list(range(1, n + 1))
    stalled.cancel()


def test_client_stream_resumes_across_a_server_restart(sqlite_url: str, ledger: str) -> None:
    server = ServerProcess(sqlite_url, extra_args=FAST).start()
    try:
        init(server.stub, ledger)
        post_many(server.stub, ledger, 10, prefix="before")
        seen: list[int] = []
        client = LedgerClient(server.address, max_attempts=50, max_backoff=0.5)

        def consume() -> None:
            for entry in client.stream_entries(ledger, follow=True):
                seen.append(entry.sequence)
                if entry.sequence >= 20:
                    return

        consumer = threading.Thread(target=consume)
        consumer.start()
        for _ in range(200):
            if len(seen) >= 10:
                break
            time.sleep(0.05)
        assert seen == list(range(1, 11))
        server.kill()  # the stream breaks mid-follow
        server.start()  # same port
        post_many(server.stub, ledger, 10, prefix="after")
        consumer.join(60)
        client.close()
        assert seen == list(range(1, 21))
    finally:
        server.kill()


def test_client_post_retries_unavailable_with_the_same_key(sqlite_url: str, ledger: str) -> None:
    server = ServerProcess(sqlite_url, extra_args=FAST).start()
    init(server.stub, ledger)
    server.kill()
    results: list[Any] = []
    client = LedgerClient(server.address, max_attempts=100, max_backoff=0.3, timeout=5)
    poster = threading.Thread(
        target=lambda: results.append(
            client.post_entry(ledger, debit_account="a", credit_account="b", amount=5, asset="USD")
        )
    )
    poster.start()  # retries while the server is down
    time.sleep(0.5)
    server.start()
    try:
        poster.join(60)
        assert len(results) == 1 and results[0].entry.sequence == 1
        key = results[0].entry.idempotency_key
        assert len(key) == 36  # the client made up a UUID key
        entries = [e for m in collect_stream(server.stub, ledger) for e in m.entries]
        assert [(e.sequence, e.idempotency_key) for e in entries] == [(1, key)]
    finally:
        client.close()
        server.kill()


def test_sigterm_ends_following_streams_resumably_and_exits_cleanly(
    sqlite_url: str, ledger: str
) -> None:
    server = ServerProcess(sqlite_url, extra_args=FAST).start()
    init(server.stub, ledger)
    call = server.stub.StreamEntries(
        ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
    )
    assert next(iter(call)).caught_up
    assert server.proc is not None
    server.proc.send_signal(15)
    with pytest.raises(grpc.RpcError) as error:
        next(iter(call))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error.value)
    assert info is not None and info.reason == "SERVER_SHUTTING_DOWN"
    assert server.proc.wait(30) == 0
    assert any("stopped" in line for line in server.lines)


def test_many_followers_of_one_process_share_the_tail_and_see_one_to_n(
    pg_server: ServerProcess, ledger: str
) -> None:
    """24 followers on one process (one shared reader) and one joining late
    from position 0 while 4 writers post: each sees exactly 1..N in order."""
    stub = pg_server.stub
    init(stub, ledger)
    writers, per_writer = 4, 30
    total = writers * per_writer

    def follow(after: int) -> list[int]:
        seen: list[int] = []
        call = stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=after, follow=True),
            timeout=120,
        )
        for message in call:
            seen.extend(e.sequence for e in message.entries)
            if seen and seen[-1] >= total:
                call.cancel()
                break
        return seen

    results: list[Any] = [None] * 25
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, follow(0))) for i in range(24)
    ]
    for t in threads:
        t.start()
    run_threads(writers, lambda w: post_many(stub, ledger, per_writer // 2, prefix=f"a{w}-"))
    late = threading.Thread(target=lambda: results.__setitem__(24, follow(0)))
    late.start()
    run_threads(writers, lambda w: post_many(stub, ledger, per_writer // 2, prefix=f"b{w}-"))
    for t in [*threads, late]:
        t.join(150)
    for seen in results:
        assert seen == list(range(1, total + 1))
