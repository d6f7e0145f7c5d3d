"""The benchmark's gap-free baseline and its integrity check, against real
Postgres and a real server process: a baseline that lost the guarantee, or a
check that could not fail, would make `make bench`'s ratios meaningless."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from bench.database import (
    HOT,
    RARE,
    check_gap_free,
    hot_debits,
    rare_entries,
    seed,
    seeded_amount,
    seeded_debit,
)
from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from .conftest import assert_books_hold, init, post_request


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


def test_the_unchained_baseline_posts_one_to_n_without_hashes(pg_url: str, ledger: str) -> None:
    """bench/unchained.py rewrites the real write statement; if that rewrite
    stopped matching, the chain's A/B pair would compare nothing real."""
    command = [sys.executable, "-m", "bench.unchained", "serve"]
    with ServerProcess(pg_url, command=command) as server:
        init(server.stub, ledger)
        posted = [
            server.stub.PostEntry(post_request(ledger, f"k{i}"), timeout=30) for i in range(5)
        ]
        assert [p.entry.sequence for p in posted] == [1, 2, 3, 4, 5]
        assert {p.entry.hash for p in posted} == {b""}
        assert [b.total_debits for b in posted[-1].balances if b.account == "cash"] == [500]
    check_gap_free(pg_url, ledger)


def test_the_seed_writes_the_totals_and_history_the_server_writes(
    pg_server: ServerProcess, pg_url: str
) -> None:
    """The bench's seeded ledger (bench/database.py) must be what posting
    the same entries through the server leaves: `verify` runs on it, and
    GetAccount as of an earlier entry reads its history."""
    n = 35
    seed(pg_url, "bench-seeded", n)
    stub = pg_server.stub
    init(stub, "bench-posted")
    for s in range(1, n + 1):
        stub.PostEntry(
            post_request(
                "bench-posted",
                f"seed-{s}",
                debit_account=seeded_debit(s),
                credit_account="sales",
                amount=seeded_amount(s),
                asset="USD",
            ),
            timeout=30,
        )
    engine = create_engine(pg_url, pool_size=1)
    try:
        with engine.connect() as conn:

            def read(ledger: str, table: str, columns: str) -> list[tuple[object, ...]]:
                return [
                    tuple(r)
                    for r in conn.execute(
                        sa.text(
                            f"SELECT account, asset, {columns} FROM {table}"
                            " WHERE ledger = :l ORDER BY 1, 2, 3"
                        ),
                        {"l": ledger},
                    )
                ]

            for table, columns in (
                ("ledger_account_history", "sequence, debits, credits"),
                ("ledger_account_totals", "debits, credits"),
            ):
                seeded = read("bench-seeded", table, columns)
                assert seeded == read("bench-posted", table, columns), table
                assert seeded
    finally:
        engine.dispose()
    hot = hot_debits(n)
    for as_of in (9, 10, 11, 30, n):
        r = stub.GetAccount(
            ledger_pb2.GetAccountRequest(ledger="bench-seeded", account=HOT, as_of_sequence=as_of),
            timeout=30,
        )
        assert [(b.total_debits, b.total_credits) for b in r.balances] == (
            [(hot[as_of // 10], 0)] if as_of >= 10 else []
        )
    # The filtered catch-up's account: exactly its entries, through the head.
    messages = list(
        stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger="bench-seeded", account=RARE), timeout=30
        )
    )
    assert [e.sequence for m in messages for e in m.entries] == rare_entries(n) == [5]
    assert messages[-1].caught_up
    assert messages[-1].through_sequence == n
    assert_books_hold(pg_url, "bench-seeded")
