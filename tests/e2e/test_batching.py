"""PostEntries and group commit through real server processes."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from ..conftest import hold_row_lock
from .conftest import (
    FAST,
    batch_request,
    collect_stream,
    details,
    init,
    post_request,
    run_threads,
)


def streamed(stub: Any, ledger: str) -> list[ledger_pb2.Entry]:
    return [e for m in collect_stream(stub, ledger) for e in m.entries]


def test_post_entries_commits_a_batch_in_order_and_replays_it(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    stub.PostEntry(post_request(ledger, "single"))
    keys = [f"b{i}" for i in range(1000)]
    first = stub.PostEntries(batch_request(ledger, keys), timeout=60)
    assert [(r.entry.sequence, r.replayed) for r in first.results] == [
        (i + 2, False) for i in range(1000)
    ]
    assert [r.entry.idempotency_key for r in first.results] == keys
    again = stub.PostEntries(batch_request(ledger, ["new", "b5", "b0"]), timeout=60)
    assert [(r.entry.sequence, r.replayed) for r in again.results] == [
        (1002, False),
        (7, True),
        (2, True),
    ]
    assert [e.sequence for e in streamed(stub, ledger)] == list(range(1, 1003))


def test_an_invalid_entry_rejects_the_whole_batch_naming_its_index(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    request = batch_request(ledger, ["a", "b", "c", "d"])
    request.entries[2].amount = 0
    request.entries[3].debit_account = ""
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntries(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = details(error.value)
    assert info.reason == "INVALID_FIELD"
    assert fields == ["entries[2].amount", "entries[3].debit_account"]
    assert streamed(stub, ledger) == []
    assert stub.PostEntry(post_request(ledger, "after")).entry.sequence == 1


@pytest.mark.parametrize(
    ("shape", "keys", "field"),
    [
        ("empty batch", [], "entries"),
        ("over 1000 entries", [f"k{i}" for i in range(1001)], "entries"),
        ("a key twice", ["a", "b", "a"], "entries[2].idempotency_key"),
    ],
)
def test_malformed_batches_are_invalid(
    stub: Any, ledger: str, shape: str, keys: list[str], field: str
) -> None:
    init(stub, ledger)
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntries(batch_request(ledger, keys), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape
    assert details(error.value)[1] == [field]
    assert stub.PostEntry(post_request(ledger, "after")).entry.sequence == 1


def test_a_conflicting_key_rejects_the_whole_batch_naming_its_index(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    stub.PostEntry(post_request(ledger, "taken"))
    request = batch_request(ledger, ["x", "taken", "y"])
    request.entries[1].amount = 999
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntries(request)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert str(error.value.details()).startswith("entries[1]: ")
    info, _ = details(error.value)
    assert (info.reason, info.metadata["index"]) == ("IDEMPOTENCY_KEY_REUSED", "1")
    assert [e.idempotency_key for e in streamed(stub, ledger)] == ["taken"]


def test_post_entries_before_initialize_is_failed_precondition(stub: Any, ledger: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntries(batch_request(ledger, ["a"]))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error.value)[0].reason == "COUNTER_NOT_INITIALIZED"


def test_concurrent_posts_are_grouped_and_each_caller_gets_its_own_answer(
    pg_url: str, ledger: str
) -> None:
    """48 callers on one process; a third of them resend a key already posted
    (replay), a few reuse a key with another payload (conflict). The debug log
    shows the transactions were shared, and the numbers are exactly 1..N."""
    with ServerProcess(pg_url, extra_args=[*FAST, "--log-level", "DEBUG"]) as server:
        init(server.stub, ledger)
        server.stub.PostEntry(post_request(ledger, "shared"))
        callers, per_caller = 48, 10

        def caller(i: int) -> list[tuple[str, int]]:
            out = []
            with grpc.insecure_channel(server.address) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                for j in range(per_caller):
                    if i % 3 == 0 and j == 0:
                        r = stub.PostEntry(post_request(ledger, "shared"), timeout=60)
                        out.append(("replay", r.entry.sequence if r.replayed else -1))
                    elif i % 8 == 1 and j == 0:
                        try:
                            stub.PostEntry(post_request(ledger, "shared", amount=5), timeout=60)
                            out.append(("conflict", -1))
                        except grpc.RpcError as exc:
                            out.append(
                                ("conflict", 0 if exc.code().name == "ALREADY_EXISTS" else -1)
                            )
                    else:
                        r = stub.PostEntry(
                            post_request(ledger, f"c{i}-{j}", debit_account=f"d{i}"), timeout=60
                        )
                        out.append(("new", r.entry.sequence if not r.replayed else -1))
            return out

        results = run_threads(callers, caller)
        assert all(isinstance(r, list) for r in results), results
        flat = [x for r in results for x in r]
        assert {seq for kind, seq in flat if kind == "replay"} == {1}
        assert {seq for kind, seq in flat if kind == "conflict"} == {0}
        new = sorted(seq for kind, seq in flat if kind == "new")
        assert new == list(range(2, len(new) + 2))
        assert [e.sequence for e in streamed(server.stub, ledger)] == list(range(1, len(new) + 2))
        sizes = [
            int(m.group(1))
            for line in server.lines
            if (m := re.search(rf"group commit: ledger {ledger}, batch of (\d+)", line))
        ]
    assert sum(sizes) == 1 + len(flat)
    assert len(sizes) < len(flat)  # transactions were shared
    assert max(sizes) > 1


def test_a_full_queue_answers_resource_exhausted_and_the_rest_commit(
    pg_url: str, ledger: str
) -> None:
    with ServerProcess(pg_url, extra_args=[*FAST, "--max-pending-posts", "3"]) as server:
        init(server.stub, ledger)
        engine = create_engine(pg_url, pool_size=1)
        outcomes: list[Any] = []
        with engine.connect() as conn:
            # Hold the counter so the first batch stays in flight.
            hold_row_lock(conn, ledger)

            def post(key: str) -> None:
                try:
                    outcomes.append(server.stub.PostEntry(post_request(ledger, key), timeout=60))
                except grpc.RpcError as exc:
                    outcomes.append(exc)

            threads = [threading.Thread(target=post, args=("first",))]
            threads[0].start()
            time.sleep(1.0)  # "first" is now waiting on the lock in the database
            for i in range(8):
                threads.append(threading.Thread(target=post, args=(f"k{i}",)))
                threads[-1].start()
            for _ in range(200):
                if len(outcomes) >= 5:
                    break
                time.sleep(0.05)
            conn.rollback()
        engine.dispose()
        for t in threads:
            t.join(60)
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        accepted = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
        assert len(refused) == 5 and len(accepted) == 4
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(exc)[0].reason == "TOO_MANY_PENDING_POSTS"
        assert sorted(o.entry.sequence for o in accepted) == [1, 2, 3, 4]
