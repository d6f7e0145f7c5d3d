"""Faults of the database itself, through real server processes: too many
connections, a shutdown and restart, a terminated backend mid-batch, and a
statement failing for a reason of the database's own. Each gets a clear
status, burns no number, and recovers by itself; health says so meanwhile.

The shutdown and max_connections tests run on a cluster of their own
(tests/pgcluster.py), so the shared server never suffers them."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.testing import ServerProcess

from ..conftest import hold_row_lock, lock_waiters_when, migrated, missing_requirement
from ..pgcluster import PgCluster, cluster_unavailable
from .conftest import FAST, batch_request, details, init, post_request
from .traffic import Callers, Follower, check_books, stored_entries

SERVICE = "ledger.v1.LedgerService"
BOUNDS = ["--db-timeout", "2", "--db-tcp-timeout", "2"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    reason = cluster_unavailable()
    if reason is not None:
        missing_requirement(reason)
    with PgCluster(max_connections=20) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(cluster: PgCluster, ledger: str) -> str:
    name = ledger.replace("-", "_")
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return migrated(cluster.url(name))


def health(server: ServerProcess, service: str = SERVICE) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    return status


def wait_for_health(server: ServerProcess, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while health(server) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.05)


@contextlib.contextmanager
def all_connections_taken(cluster: PgCluster, database: str) -> Iterator[None]:
    """Holds every free connection slot of the cluster until the block ends."""
    held: list[psycopg.Connection[Any]] = []
    while True:
        try:
            held.append(psycopg.connect(cluster.url(database), autocommit=True))
        except psycopg.OperationalError as exc:
            assert "too many clients" in str(exc), exc
            break
    try:
        yield
    finally:
        for conn in held:
            conn.close()


def end_server_backends(cluster: PgCluster) -> None:
    """Ends the server's connections (as a restart would) and waits until
    their slots are free."""
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        while conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name LIKE 'ledger-service%'"
        ).fetchone() != (0,):
            time.sleep(0.05)


def test_max_connections_at_start_refuses_calls_clearly_until_a_slot_frees(
    cluster: PgCluster, cluster_url: str, ledger: str
) -> None:
    server = ServerProcess(cluster_url, extra_args=[*FAST, *BOUNDS])
    try:
        with all_connections_taken(cluster, sa.make_url(cluster_url).database or ""):
            server.start()  # anyway: it does not know the schema yet
            assert health(server, "") == SERVING  # the process lives
            assert health(server) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as error:
                init(server.stub, ledger)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(error.value)[0].reason == "STORAGE_UNAVAILABLE"
            assert "too many clients" in (error.value.details() or "")
        wait_for_health(server, SERVING)
        init(server.stub, ledger)
        assert server.stub.PostEntry(post_request(ledger, "k1"), timeout=10).entry.sequence == 1
    finally:
        server.close()


def test_a_database_reached_late_but_not_migrated_is_never_written_and_the_server_exits(
    cluster: PgCluster, ledger: str
) -> None:
    name = ledger.replace("-", "_")
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # and no migration
    server = ServerProcess(cluster.url(name), extra_args=[*FAST, *BOUNDS])
    try:
        with all_connections_taken(cluster, name):
            server.start()
        # Reachable now, schema not yet checked: refused, not tried.
        with pytest.raises(grpc.RpcError) as error:
            init(server.stub, ledger)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc is not None
        assert server.proc.wait(30) == 1
        assert "is not migrated: run `ledger-service migrate`" in "".join(server.lines)
    finally:
        server.close()


def test_max_connections_under_load_is_unavailable_and_nothing_is_lost(
    cluster: PgCluster, cluster_url: str, ledger: str
) -> None:
    """The server holds a few connections and needs more: with every slot
    taken, what cannot get one is UNAVAILABLE; nothing is lost."""
    with ServerProcess(cluster_url, extra_args=[*FAST, *BOUNDS]) as server:
        init(server.stub, ledger)
        with Callers(server.address, ledger, n=8) as callers:
            callers.wait_for_acks(40)
            assert server.proc is not None
            # Frozen, the server cannot take back the slots its connections free.
            server.proc.send_signal(signal.SIGSTOP)
            try:
                end_server_backends(cluster)
                database = sa.make_url(cluster_url).database or ""
                with all_connections_taken(cluster, database):
                    server.proc.send_signal(signal.SIGCONT)
                    before = callers.errors[grpc.StatusCode.UNAVAILABLE]
                    time.sleep(2)
                    assert callers.errors[grpc.StatusCode.UNAVAILABLE] > before
            finally:
                server.proc.send_signal(signal.SIGCONT)
            callers.wait_for_acks(callers.acked() + 40)
        assert not callers.failures, callers.failures
        check_books(cluster_url, server.stub, ledger, callers.acks)
        assert "Traceback" not in "".join(server.lines)


def test_a_database_restart_is_unavailable_then_recovers_and_health_follows(
    cluster: PgCluster, cluster_url: str, ledger: str
) -> None:
    with ServerProcess(cluster_url, extra_args=[*FAST, *BOUNDS]) as server:
        init(server.stub, ledger)
        assert health(server) == SERVING
        with Follower(server.address, ledger) as follower:
            with Callers(server.address, ledger, n=8) as callers:
                callers.wait_for_acks(40)
                cluster.stop("fast")
                try:
                    wait_for_health(server, NOT_SERVING)
                    assert health(server, "") == SERVING  # alive, just not ready
                    before = callers.acked()
                    time.sleep(1)
                    assert callers.acked() == before  # nothing gets in meanwhile
                finally:
                    cluster.start()
                wait_for_health(server, SERVING)
                callers.wait_for_acks(callers.acked() + 40)
            assert callers.errors[grpc.StatusCode.UNAVAILABLE] > 0
            assert not callers.failures, callers.failures
            n = check_books(cluster_url, server.stub, ledger, callers.acks)
            assert follower.wait_for(n) == list(range(1, n + 1))


@pytest.mark.parametrize("path", ["PostEntries", "PostEntry without group commit"])
def test_a_writer_terminated_mid_batch_is_unavailable_and_burns_no_number(
    pg_url: str, ledger: str, path: str
) -> None:
    args = [*FAST, *BOUNDS] + (["--no-group-commit"] if path != "PostEntries" else [])
    with ServerProcess(pg_url, extra_args=args) as server:
        init(server.stub, ledger)
        server.stub.PostEntry(post_request(ledger, "k0"), timeout=10)
        engine = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg"))
        keys = [f"k{i}" for i in range(1, 51)] if path == "PostEntries" else ["k1"]

        def post() -> Any:
            if path == "PostEntries":
                return server.stub.PostEntries.future(batch_request(ledger, keys), timeout=30)
            return server.stub.PostEntry.future(post_request(ledger, "k1"), timeout=30)

        try:
            with engine.connect() as conn:
                hold_row_lock(conn, ledger)
                call = post()
                assert lock_waiters_when(engine, 1, timeout=10) == 1
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND application_name = 'ledger-service'"
                )
                with pytest.raises(grpc.RpcError) as error:
                    call.result()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert details(error.value)[0].reason == "STORAGE_UNAVAILABLE"
                conn.rollback()
        finally:
            engine.dispose()
        assert stored_entries(pg_url, ledger) == (1, {"k0": 1})  # no number taken
        if path == "PostEntries":
            retried = server.stub.PostEntries(batch_request(ledger, keys), timeout=30).results
            assert [r.entry.sequence for r in retried] == list(range(2, 52))
        else:
            assert server.stub.PostEntry(post_request(ledger, "k1")).entry.sequence == 2


@pytest.mark.parametrize(
    ("fault", "code", "shown"),
    [
        # A full disk, as the write's insert would meet it.
        ("disk_full", grpc.StatusCode.UNAVAILABLE, "SQLSTATE 53100"),
        # Something nobody planned for: a bug somewhere, or a trigger's doing.
        ("raise_exception", grpc.StatusCode.INTERNAL, "see the server log"),
    ],
)
@pytest.mark.parametrize("path", ["group commit", "no group commit"])
def test_a_statement_failing_for_the_databases_own_reason_is_clear_and_burns_no_number(
    fresh_pg_url: str, ledger: str, fault: str, code: grpc.StatusCode, shown: str, path: str
) -> None:
    args = [*FAST, *BOUNDS] + (["--no-group-commit"] if path == "no group commit" else [])
    conninfo = libpq_conninfo(sa.make_url(fresh_pg_url))
    with ServerProcess(fresh_pg_url, extra_args=args) as server:
        init(server.stub, ledger)
        server.stub.PostEntry(post_request(ledger, "k0"), timeout=10)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN RAISE EXCEPTION 'simulated {fault}' USING ERRCODE = '{fault}'; END $$"
            )
            conn.execute(
                "CREATE TRIGGER fail_insert BEFORE INSERT ON ledger_entries"
                " FOR EACH ROW EXECUTE FUNCTION fail_insert()"
            )
            for key in ("k1", "k1"):  # the retry meets it too
                with pytest.raises(grpc.RpcError) as error:
                    server.stub.PostEntry(post_request(ledger, key), timeout=10)
                assert error.value.code() == code
                assert shown in (error.value.details() or "")
            conn.execute("DROP TRIGGER fail_insert ON ledger_entries")
        assert stored_entries(fresh_pg_url, ledger) == (1, {"k0": 1})  # no number taken
        assert server.stub.PostEntry(post_request(ledger, "k1")).entry.sequence == 2
        assert f"simulated {fault}" in "".join(server.lines)  # the reason, in the log


def test_a_read_only_database_is_unavailable_and_recovers(fresh_pg_url: str, ledger: str) -> None:
    """As after a failover to a standby, or a database set read-only."""
    name = sa.make_url(fresh_pg_url).database
    admin = libpq_conninfo(sa.make_url(fresh_pg_url).set(database="postgres"))

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {on}')
            conn.execute(  # sessions take the setting when they start
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )

    with ServerProcess(fresh_pg_url, extra_args=[*FAST, *BOUNDS]) as server:
        init(server.stub, ledger)
        server.stub.PostEntry(post_request(ledger, "k0"), timeout=10)
        read_only(True)
        try:
            shown = []
            for _ in range(3):  # a terminated pooled connection first, then read-only
                with pytest.raises(grpc.RpcError) as error:
                    server.stub.PostEntry(post_request(ledger, "k1"), timeout=10)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                shown.append(error.value.details() or "")
            assert "SQLSTATE 25006" in shown[-1], shown
        finally:
            read_only(False)
        assert stored_entries(fresh_pg_url, ledger) == (1, {"k0": 1})  # no number taken
        # Its connections were ended with the setting: a retry reconnects.
        sequence = None
        for _ in range(3):
            with contextlib.suppress(grpc.RpcError):
                sequence = server.stub.PostEntry(post_request(ledger, "k1"), timeout=10)
                break
        assert sequence is not None and sequence.entry.sequence == 2
