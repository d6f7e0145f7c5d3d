"""A failing network between a real server process and Postgres
(tests/faultproxy.py), under load from 8 callers that retry each key until
it is acknowledged, with a follower: posts recover by themselves, every
acknowledged key is stored once with its number, the ledger holds exactly
1..N, and the follower sees 1..N in order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2

from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.testing import ServerProcess

from ..conftest import missing_requirement
from ..faultproxy import FaultProxy, kernel_drop_unavailable
from .conftest import FAST, init, post_request
from .traffic import Callers, Follower, check_books

# Short bounds keep the tests quick. Recovery is asserted only against a
# generous bound, many times the configured one.
BOUNDS = ["--db-timeout", "2", "--db-tcp-timeout", "2"]
RECOVERY = 20.0
PATHS = {"group commit": [], "one transaction per call": ["--no-group-commit"]}


@pytest.fixture
def proxy(fresh_pg_url: str) -> Iterator[FaultProxy]:
    upstream = sa.make_url(fresh_pg_url)
    with FaultProxy((upstream.host or "127.0.0.1", upstream.port or 5432)) as proxy:
        yield proxy


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", ["stall", "reset", "black hole", "drop"])
def test_posts_recover_from_a_network_fault_and_nothing_is_lost_or_doubled(
    proxy: FaultProxy, fresh_pg_url: str, ledger: str, fault: str, path: str
) -> None:
    """stall: every connection, new ones too, holds its bytes for 3 s.
    reset: every connection gets an RST. black hole: the open connections
    go silent (the proxy still acknowledges them: only the server's own
    bounds notice) while new ones pass. drop: the kernel drops the open
    connections' packets (here the answer bound is far off, so the follower's
    reads, which have no deadline, recover through TCP keepalives)."""
    bounds = BOUNDS
    if fault == "drop":
        reason = kernel_drop_unavailable()
        if reason is not None:
            missing_requirement(reason)
        bounds = ["--db-timeout", "60", "--db-tcp-timeout", "2"]
    args = [*FAST, *bounds, *PATHS[path]]
    with ServerProcess(proxy.url(fresh_pg_url), extra_args=args) as server:
        init(server.stub, ledger)
        with Follower(server.address, ledger) as follower:
            with Callers(server.address, ledger, n=8) as callers:
                callers.wait_for_acks(40)
                faults: dict[str, Callable[[], object]] = {
                    "stall": proxy.stall,
                    "reset": proxy.reset,
                    "black hole": proxy.black_hole,
                    "drop": proxy.drop,
                }
                faults[fault]()
                if fault == "stall":
                    time.sleep(3)
                    proxy.resume()
                healed = time.monotonic()
                first = callers.first_ack_started_after(healed, timeout=2 * RECOVERY)
                assert first.finished - healed <= RECOVERY
                callers.wait_for_acks(callers.acked() + 40)
            assert not callers.failures, callers.failures
            n = check_books(fresh_pg_url, server.stub, ledger, callers.acks)
            assert follower.wait_for(n) == list(range(1, n + 1))
        if fault != "reset":  # a reset fails only the few calls in flight
            assert callers.errors[grpc.StatusCode.DEADLINE_EXCEEDED] > 0
        server_log = "".join(server.lines)
        assert "query cancellation failed" not in server_log
        assert "Traceback" not in server_log


def test_followers_keep_every_entry_while_the_listen_connection_is_silent(
    proxy: FaultProxy, fresh_pg_url: str, ledger: str
) -> None:
    """Only the LISTEN connection goes silent: followers get every entry by
    polling, without their stream breaking, and the connection is replaced."""
    conninfo = libpq_conninfo(sa.make_url(fresh_pg_url))

    def listen_backends() -> dict[int, int]:
        with psycopg.connect(conninfo) as conn:
            rows = conn.execute(
                "SELECT pid, client_port FROM pg_stat_activity"
                " WHERE application_name LIKE 'ledger-service-listen %'"
            ).fetchall()
        return dict(rows)

    with ServerProcess(proxy.url(fresh_pg_url), extra_args=[*FAST, *BOUNDS]) as server:
        init(server.stub, ledger)
        stream = server.stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=120
        )
        seen: list[int] = []

        def post_and_read(first: int, last: int) -> None:
            for i in range(first, last + 1):
                server.stub.PostEntry(post_request(ledger, f"k{i}"), timeout=10)
            for message in stream:  # a broken stream would raise here
                seen.extend(e.sequence for e in message.entries)
                if seen and seen[-1] == last:
                    return

        post_and_read(1, 1)
        deadline = time.monotonic() + 30
        while not listen_backends():
            assert time.monotonic() < deadline, "no LISTEN connection"
            time.sleep(0.05)
        ((silent_pid, port),) = listen_backends().items()
        assert proxy.black_hole(upstream_port=port)
        post_and_read(2, 10)  # by polling
        # Replaced: a new LISTEN backend beside the silent one, which lives on.
        while set(listen_backends()) <= {silent_pid}:
            assert time.monotonic() < deadline + 30, "the LISTEN connection was not replaced"
            post_and_read(len(seen) + 1, len(seen) + 1)
            time.sleep(0.1)
        post_and_read(len(seen) + 1, len(seen) + 10)
        stream.cancel()
        assert seen == list(range(1, len(seen) + 1))
        logged = "".join(server.lines)
        assert "LISTEN connection lost (the database gave no answer within 2s" in logged
