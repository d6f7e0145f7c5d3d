"""PostEntry, InitializeCounter and GetAccount through real server processes."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from ..conftest import hold_row_lock, lock_waiters_when
from .conftest import (
    FAST,
    assert_books_hold,
    collect_stream,
    details,
    init,
    post_request,
    run_threads,
)


def test_every_rpc_answers_through_a_real_server(stub: Any, ledger: str) -> None:
    created = stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=ledger))
    assert (created.ledger, created.value, created.created) == (ledger, 0, True)
    again = stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=ledger))
    assert (again.value, again.created) == (0, False)

    request = post_request(
        ledger, "order-1", amount=2**62, entry_type="sale", description="first", metadata={"a": "1"}
    )
    posted = stub.PostEntry(request)
    assert not posted.replayed
    entry = posted.entry
    assert (entry.ledger, entry.sequence, entry.amount, entry.asset) == (ledger, 1, 2**62, "USD")
    assert (entry.entry_type, entry.description, dict(entry.metadata)) == (
        "sale",
        "first",
        {"a": "1"},
    )
    assert entry.created_at.seconds > 0

    replay = stub.PostEntry(request)
    assert replay.replayed and replay.entry == entry

    account = stub.GetAccount(ledger_pb2.GetAccountRequest(ledger=ledger, account="cash"))
    assert account.as_of_sequence == 1
    assert [(b.asset, b.total_debits, b.total_credits, b.balance) for b in account.balances] == [
        ("USD", 2**62, 0, 2**62)
    ]

    messages = collect_stream(stub, ledger)
    assert [e for m in messages for e in m.entries] == [entry]
    assert messages[-1].caught_up and messages[-1].head_sequence == 1


def test_post_before_initialize_is_failed_precondition(stub: Any, ledger: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntry(post_request(ledger, "k"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "InitializeCounter" in str(error.value.details())
    info, _ = details(error.value)
    assert info.reason == "COUNTER_NOT_INITIALIZED"
    assert info.metadata["ledger"] == ledger


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty ledger", {"ledger": ""}, "ledger"),
    ("oversized ledger", {"ledger": "l" * 65}, "ledger"),
    ("ledger with spaces", {"ledger": "my ledger"}, "ledger"),
    ("empty key", {"idempotency_key": ""}, "idempotency_key"),
    ("oversized key", {"idempotency_key": "k" * 129}, "idempotency_key"),
    ("key with NUL", {"idempotency_key": "a\x00b"}, "idempotency_key"),
    ("empty debit account", {"debit_account": ""}, "debit_account"),
    ("oversized debit account", {"debit_account": "d" * 129}, "debit_account"),
    ("empty credit account", {"credit_account": ""}, "credit_account"),
    ("oversized credit account", {"credit_account": "c" * 129}, "credit_account"),
    ("debit equals credit", {"debit_account": "cash", "credit_account": "cash"}, "credit_account"),
    ("zero amount", {"amount": 0}, "amount"),
    ("negative amount", {"amount": -5}, "amount"),
    ("empty asset", {"asset": ""}, "asset"),
    ("oversized asset", {"asset": "A" * 33}, "asset"),
    ("asset with spaces", {"asset": "US D"}, "asset"),
    ("oversized entry type", {"entry_type": "t" * 65}, "entry_type"),
    ("oversized description", {"description": "x" * 1025}, "description"),
    ("too many metadata pairs", {"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
    ("metadata too large", {"metadata": {f"k{i}": "v" * 200 for i in range(25)}}, "metadata"),
    ("empty metadata key", {"metadata": {"": "v"}}, "metadata"),
]


@pytest.mark.parametrize(
    ("shape", "overrides", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_rejected_naming_the_field_and_burns_no_number(
    stub: Any, ledger: str, shape: str, overrides: dict[str, Any], field: str
) -> None:
    init(stub, ledger)
    stub.PostEntry(post_request(ledger, "before"))
    bad = post_request(ledger, "bad")
    for name, value in overrides.items():
        if name == "metadata":
            bad.metadata.update(value)
        else:
            setattr(bad, name, value)
    target_ledger = bad.ledger
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntry(bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape
    assert field in str(error.value.details())
    info, fields = details(error.value)
    assert info.reason == "INVALID_FIELD"
    assert field in fields or any(f.startswith(field) for f in fields)
    # Nothing written, no number consumed: the next good post is number 2.
    after = stub.PostEntry(post_request(ledger, "after"))
    assert after.entry.sequence == 2
    if target_ledger == ledger:
        keys = [e.idempotency_key for m in collect_stream(stub, ledger) for e in m.entries]
        assert keys == ["before", "after"]


def test_reused_key_with_other_payload_is_already_exists(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    stub.PostEntry(post_request(ledger, "k1"))
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntry(post_request(ledger, "k1", amount=999, credit_account="other"))
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "credit_account" in str(error.value.details()) and "amount" in str(error.value.details())
    info, _ = details(error.value)
    assert info.reason == "IDEMPOTENCY_KEY_REUSED"
    assert info.metadata["sequence"] == "1"
    assert stub.PostEntry(post_request(ledger, "k2")).entry.sequence == 2


def test_overflowing_account_total_is_rejected(stub: Any, ledger: str) -> None:
    init(stub, ledger)
    stub.PostEntry(post_request(ledger, "max", amount=2**63 - 1))
    with pytest.raises(grpc.RpcError) as error:
        stub.PostEntry(post_request(ledger, "over", amount=1))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(error.value)[0].reason == "ACCOUNT_TOTAL_OVERFLOW"
    assert stub.PostEntry(post_request(ledger, "ok", asset="EUR")).entry.sequence == 2


def test_get_account_of_uninitialized_ledger_is_failed_precondition(stub: Any, ledger: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.GetAccount(ledger_pb2.GetAccountRequest(ledger=ledger, account="cash"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_initialize_counter_rejects_a_bad_name(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=""))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error.value)[1] == ["ledger"]


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_32_callers_over_two_server_processes_get_exactly_one_to_n(
    request: pytest.FixtureRequest, store: str, ledger: str
) -> None:
    url = request.getfixturevalue("pg_url" if store == "postgres" else "sqlite_url")
    callers, per_caller = 32, 8
    with ServerProcess(url, extra_args=FAST) as a, ServerProcess(url, extra_args=FAST) as b:
        init(a.stub, ledger)

        def caller(i: int) -> list[int]:
            # Each caller has its own channel, half on each process.
            with grpc.insecure_channel((a, b)[i % 2].address) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                # Own accounts per caller: only the counter row serializes them.
                return [
                    stub.PostEntry(
                        post_request(
                            ledger, f"c{i}-{j}", debit_account=f"d{i}", credit_account=f"c{i}"
                        ),
                        timeout=60,
                    ).entry.sequence
                    for j in range(per_caller)
                ]

        results = run_threads(callers, caller)
        assert all(isinstance(r, list) for r in results), results
        n = callers * per_caller
        assert sorted(s for r in results for s in r) == list(range(1, n + 1))
        streamed = [e.sequence for m in collect_stream(b.stub, ledger) for e in m.entries]
        assert streamed == list(range(1, n + 1))
    # Two processes chained one ledger: every hash links, every total adds up.
    assert_books_hold(url, ledger)


def test_sixteen_posts_of_one_key_over_two_processes_store_one_entry(
    pg_url: str, ledger: str
) -> None:
    with ServerProcess(pg_url, extra_args=FAST) as a, ServerProcess(pg_url, extra_args=FAST) as b:
        init(a.stub, ledger)
        results = run_threads(
            16, lambda i: (a, b)[i % 2].stub.PostEntry(post_request(ledger, "same"), timeout=30)
        )
        assert all(isinstance(r, ledger_pb2.PostEntryResponse) for r in results), results
        assert sum(not r.replayed for r in results) == 1
        assert {r.entry.sequence for r in results} == {1}
        assert stub_next(a, ledger) == 2


def stub_next(server: ServerProcess, ledger: str) -> int:
    seq: int = server.stub.PostEntry(post_request(ledger, f"next-{uuid.uuid4()}")).entry.sequence
    return seq


def test_unreachable_database_is_unavailable_and_a_retry_posts_once(
    fresh_pg_url: str, ledger: str
) -> None:
    name = sa.make_url(fresh_pg_url).database
    admin = create_engine(
        sa.make_url(fresh_pg_url).set(database="postgres").render_as_string(hide_password=False),
        pool_size=1,
    )

    def set_connections(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'
            )
            if not allowed:
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                )
            conn.commit()

    with ServerProcess(fresh_pg_url, extra_args=FAST) as server:
        init(server.stub, ledger)
        server.stub.PostEntry(post_request(ledger, "k1"))
        set_connections(False)
        try:
            for _ in range(2):  # a dead pooled connection, then a refused new one
                with pytest.raises(grpc.RpcError) as error:
                    server.stub.PostEntry(post_request(ledger, "k2"), timeout=10)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert details(error.value)[0].reason == "STORAGE_UNAVAILABLE"
        finally:
            set_connections(True)
        retried = server.stub.PostEntry(post_request(ledger, "k2"), timeout=10)
        assert (retried.replayed, retried.entry.sequence) == (False, 2)
        assert server.stub.PostEntry(post_request(ledger, "k2")).replayed
    admin.dispose()


@pytest.mark.parametrize("locked", ["counter", "account"])
def test_deadline_is_honoured_while_a_row_it_needs_is_locked(
    pg_url: str, pg_server: Any, ledger: str, locked: str
) -> None:
    stub = pg_server.stub
    init(stub, ledger)
    before = 0
    if locked == "account":
        stub.PostEntry(post_request(ledger, "k0"), timeout=10)  # the account row exists
        before = 1
    engine = create_engine(pg_url, pool_size=1)
    with engine.connect() as conn:
        # Another transaction holds the counter row, or an account row, lock.
        hold_row_lock(conn, ledger, locked)
        with pytest.raises(grpc.RpcError) as error:
            stub.PostEntry(post_request(ledger, "k1"), timeout=1.0)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server gives up its lock wait by itself (the write's lock_timeout
        # is the caller's deadline); a server ignoring deadlines would wait forever.
        assert lock_waiters_when(engine, 0, timeout=10) == 0
        conn.rollback()
    with engine.connect() as conn:
        value = conn.exec_driver_sql(
            "SELECT value FROM ledger_counters WHERE ledger = %(l)s", {"l": ledger}
        ).scalar_one()
    engine.dispose()
    assert value == before
    # Nothing was written, so the retry with the same key takes the next number.
    retried = stub.PostEntry(post_request(ledger, "k1"), timeout=10)
    assert (retried.replayed, retried.entry.sequence) == (False, before + 1)


def test_killed_servers_leave_no_gap_and_retries_post_each_key_once(
    fresh_pg_url: str, ledger: str
) -> None:
    """SIGKILL a server while 16 callers post through it; they fail over to
    the other process with the same keys. Every key lands exactly once and the
    numbers are exactly 1..N: in-flight transactions of the dead process were
    rolled back with their counter increments."""
    a = ServerProcess(fresh_pg_url, extra_args=FAST).start()
    b = ServerProcess(fresh_pg_url, extra_args=FAST).start()
    try:
        init(b.stub, ledger)
        stop = threading.Event()
        keys_per_caller = 40

        def caller(i: int) -> list[str]:
            done = []
            for j in range(keys_per_caller):
                key = f"c{i}-{j}"
                for target in (a, b, b, b):
                    try:
                        with grpc.insecure_channel(target.address) as channel:
                            ledger_pb2_grpc.LedgerServiceStub(channel).PostEntry(
                                post_request(ledger, key), timeout=10
                            )
                        done.append(key)
                        break
                    except grpc.RpcError as exc:
                        if exc.code() not in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                        ):
                            raise
                if j == keys_per_caller // 4 and i == 0:
                    stop.set()
            return done

        def kill_a_mid_load() -> None:
            stop.wait(60)
            a.kill()

        killer = threading.Thread(target=kill_a_mid_load)
        killer.start()
        results = run_threads(16, caller)
        killer.join()
        assert all(isinstance(r, list) for r in results), results
        keys = sorted(k for r in results for k in r)
        assert len(keys) == 16 * keys_per_caller
        entries = [e for m in collect_stream(b.stub, ledger) for e in m.entries]
        assert [e.sequence for e in entries] == list(range(1, len(keys) + 1))
        assert sorted(e.idempotency_key for e in entries) == keys
    finally:
        a.kill()
        b.kill()
    # What the killed process had in flight left no broken link behind.
    assert_books_hold(fresh_pg_url, ledger)


def test_sigterm_lets_an_in_flight_post_finish(pg_url: str, ledger: str) -> None:
    """The post is waiting on the counter lock when SIGTERM arrives; it still
    completes (drained within the grace period, not cancelled)."""
    server = ServerProcess(pg_url, extra_args=["--shutdown-grace", "20"]).start()
    try:
        init(server.stub, ledger)
        engine = create_engine(pg_url, pool_size=1)
        with engine.connect() as conn:
            hold_row_lock(conn, ledger)
            future = server.stub.PostEntry.future(post_request(ledger, "in-flight"), timeout=30)
            # Wait until the post is blocked on our lock.
            assert lock_waiters_when(engine, 1, timeout=10) == 1
            assert server.proc is not None
            server.proc.send_signal(15)
            time.sleep(0.5)  # the server is now draining
            conn.rollback()  # release the lock
        engine.dispose()
        response = future.result(timeout=30)
        assert (response.replayed, response.entry.sequence) == (False, 1)
        assert server.proc.wait(30) == 0
    finally:
        server.kill()
