"""The benchmark's gap-free baseline and its integrity check, against real
Postgres and a real server process: a baseline that lost the guarantee, or a
check that could not fail, would make `make bench`'s ratios meaningless."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2_grpc

from bench.database import check_gap_free
from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from .conftest import init, post_request


@pytest.fixture(scope="module")
def plain_server(pg_url: str) -> Iterator[ServerProcess]:
    command = [sys.executable, "-m", "bench.servers", "--mode", "plain", "--pool-size", "4"]
    with ServerProcess(pg_url, command=command) as server:
        yield server


def test_plain_baseline_numbers_concurrent_posts_one_to_n_and_replays_keys(
    plain_server: ServerProcess, pg_url: str
) -> None:
    stub = plain_server.stub
    init(stub, "bench-plain")

    def post(worker: int) -> list[int]:
        own = ledger_pb2_grpc.LedgerServiceStub(plain_server.channel)
        return [
            own.PostEntry(post_request("bench-plain", f"w{worker}-{i}"), timeout=30).entry.sequence
            for i in range(10)
        ]

    with ThreadPoolExecutor(8) as pool:
        numbers = [n for chunk in pool.map(post, range(8)) for n in chunk]
    assert sorted(numbers) == list(range(1, 81))

    again = stub.PostEntry(post_request("bench-plain", "w3-4"), timeout=30)
    assert again.replayed
    assert again.entry.sequence in numbers
    check_gap_free(pg_url, "bench-plain")  # the check the bench runs after each run


def test_the_gap_free_check_refuses_a_gap_and_a_counter_ahead_of_its_entries(
    plain_server: ServerProcess, pg_url: str
) -> None:
    stub = plain_server.stub
    init(stub, "bench-gap")
    for i in range(5):
        stub.PostEntry(post_request("bench-gap", f"k{i}"), timeout=30)
    check_gap_free(pg_url, "bench-gap")
    engine = create_engine(pg_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM ledger_entries WHERE ledger = 'bench-gap' AND sequence = 3")
            )
        with pytest.raises(RuntimeError, match=r"counter 5, 4 entries numbered 1\.\.5: not 1\.\.N"):
            check_gap_free(pg_url, "bench-gap")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "DELETE FROM ledger_entries WHERE ledger = 'bench-gap' AND sequence > 2;"
                    " UPDATE ledger_counters SET value = 3 WHERE ledger = 'bench-gap'"
                )
            )
        with pytest.raises(RuntimeError, match="counter 3, 2 entries"):
            check_gap_free(pg_url, "bench-gap")
    finally:
        engine.dispose()
