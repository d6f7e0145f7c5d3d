"""The numbering, idempotency and totals guarantees, on real Postgres and SQLite,
with real threads, separate connections and real commits."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2
from sqlalchemy.engine import Engine

from ledger_service.api import wire
from ledger_service.domain.entries import PostResult
from ledger_service.domain.errors import (
    AccountTotalOverflow,
    CounterNotInitialized,
    IdempotencyConflict,
)
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service import use_cases
from ledger_service.storage.schema import account_totals, counters, entries

from .helpers import counter_value, make_entry, run_concurrently, sequences


def test_initialize_counter_is_idempotent_and_never_resets(
    uow: Any, engine: Engine, ledger: str
) -> None:
    first = use_cases.initialize_counter(uow, ledger)
    assert (first.value, first.created) == (0, True)
    use_cases.post_entry(uow, make_entry(ledger, "k1"))
    again = use_cases.initialize_counter(uow, ledger)
    assert (again.value, again.created) == (1, False)
    assert counter_value(engine, ledger) == 1


def test_sixteen_concurrent_initializations_create_exactly_one_counter(
    uow: Any, engine: Engine, ledger: str
) -> None:
    results = run_concurrently(16, lambda _: use_cases.initialize_counter(uow, ledger))
    assert all(not isinstance(r, Exception) for r in results), results
    assert sum(r.created for r in results) == 1
    assert {r.value for r in results} == {0}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(sa.func.count()).select_from(counters).where(counters.c.ledger == ledger)
        ).scalar()
    assert rows == 1


def test_counter_is_seeded_from_existing_entries(uow: Any, engine: Engine, ledger: str) -> None:
    # Entries restored from elsewhere, without their counter row.
    with engine.begin() as conn:
        for seq in (1, 2, 3, 7):
            conn.execute(
                sa.insert(entries).values(
                    ledger=ledger,
                    sequence=seq,
                    idempotency_key=f"restored-{seq}",
                    debit_account="a",
                    credit_account="b",
                    amount=1,
                    asset="USD",
                    entry_type="",
                    description="",
                    metadata={},
                    created_at=sa.func.current_timestamp(),
                    hash=bytes(32),  # restored rows carry theirs (Postgres requires one)
                )
            )
    counter = use_cases.initialize_counter(uow, ledger)
    assert (counter.value, counter.created) == (7, True)
    posted = use_cases.post_entry(uow, make_entry(ledger, "new"))
    assert posted.entry.sequence == 8
    # Restored rows have no stored encoding; streams encode them from columns.
    page = use_cases.read_rows(uow, ledger, 0, 10)
    assert page.sequences == [1, 2, 3, 7, 8]
    decoded = wire.stream_message(page.rows).entries
    assert [(e.sequence, e.idempotency_key, e.amount) for e in decoded] == [
        (1, "restored-1", 1),
        (2, "restored-2", 1),
        (3, "restored-3", 1),
        (7, "restored-7", 1),
        (8, "new", 100),
    ]


def test_post_before_initialize_is_rejected_and_writes_nothing(
    uow: Any, engine: Engine, ledger: str
) -> None:
    with pytest.raises(CounterNotInitialized, match="InitializeCounter"):
        use_cases.post_entry(uow, make_entry(ledger, "k1"))
    assert sequences(engine, ledger) == []
    assert counter_value(engine, ledger) is None
    with engine.connect() as conn:
        totals = conn.execute(
            sa.select(account_totals).where(account_totals.c.ledger == ledger)
        ).all()
    assert totals == []


def test_replay_returns_the_original_entry_and_consumes_no_number(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    first = use_cases.post_entry(uow, make_entry(ledger, "k1", metadata={"order": "42"}))
    replay = use_cases.post_entry(uow, make_entry(ledger, "k1", metadata={"order": "42"}))
    assert not first.replayed and replay.replayed
    assert replay.entry == first.entry
    assert use_cases.post_entry(uow, make_entry(ledger, "k2")).entry.sequence == 2
    assert sequences(engine, ledger) == [1, 2]


def test_same_key_with_other_payload_names_the_differing_fields(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "k1"))
    with pytest.raises(IdempotencyConflict) as info:
        use_cases.post_entry(uow, make_entry(ledger, "k1", amount=101, description="other"))
    assert info.value.fields == ["amount", "description"]
    assert "amount, description" in info.value.message
    assert sequences(engine, ledger) == [1]
    assert counter_value(engine, ledger) == 1


def test_sixteen_concurrent_posts_of_one_key_store_one_entry(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    results = run_concurrently(16, lambda _: use_cases.post_entry(uow, make_entry(ledger, "same")))
    assert all(isinstance(r, PostResult) for r in results), results
    assert sum(not r.replayed for r in results) == 1
    assert {r.entry.sequence for r in results} == {1}
    assert sequences(engine, ledger) == [1]
    assert counter_value(engine, ledger) == 1
    # The losers' rolled-back increments left no gap.
    assert use_cases.post_entry(uow, make_entry(ledger, "next")).entry.sequence == 2


@pytest.mark.parametrize("accounts", ["own", "crossing"])
def test_concurrent_posts_get_exactly_one_to_n(
    uow: Any, engine: Engine, ledger: str, accounts: str
) -> None:
    """ "own": every thread posts between its own accounts, so only the counter
    row serializes them. "crossing": all threads post a->b and b->a, which
    would deadlock if account rows were locked in arbitrary order."""
    use_cases.initialize_counter(uow, ledger)
    per_thread, threads = 10, 32

    def worker(i: int) -> list[int]:
        out = []
        for j in range(per_thread):
            if accounts == "own":
                debit, credit = f"debit-{i}", f"credit-{i}"
            else:
                debit, credit = ("a", "b") if (i + j) % 2 else ("b", "a")
            result = use_cases.post_entry(
                uow, make_entry(ledger, f"t{i}-{j}", debit_account=debit, credit_account=credit)
            )
            out.append(result.entry.sequence)
        return out

    results = run_concurrently(threads, worker)
    assert all(isinstance(r, list) for r in results), results
    got = sorted(s for r in results for s in r)
    n = per_thread * threads
    assert got == list(range(1, n + 1))
    assert sequences(engine, ledger) == list(range(1, n + 1))
    assert counter_value(engine, ledger) == n


def test_overflowing_total_is_rejected_and_writes_nothing(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "big", amount=INT64_MAX))
    with pytest.raises(AccountTotalOverflow):
        use_cases.post_entry(uow, make_entry(ledger, "one-more", amount=1))
    assert sequences(engine, ledger) == [1]
    view = use_cases.get_account(uow, ledger, "cash")
    assert [(b.debits, b.credits) for b in view.balances] == [(INT64_MAX, 0)]
    assert view.as_of_sequence == 1
    # Another asset is another total: still fine.
    ok = use_cases.post_entry(uow, make_entry(ledger, "eur", amount=1, asset="EUR/2"))
    assert ok.entry.sequence == 2


def test_account_totals_equal_the_sums_of_entries(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    posts = [
        ("cash", "revenue", 500, "USD"),
        ("cash", "loan", 1000, "USD"),
        ("rent", "cash", 300, "USD"),
        ("cash", "revenue", 7, "EUR/2"),
    ]
    for i, (debit, credit, amount, asset) in enumerate(posts):
        use_cases.post_entry(
            uow,
            make_entry(
                ledger,
                f"k{i}",
                debit_account=debit,
                credit_account=credit,
                amount=amount,
                asset=asset,
            ),
        )
    view = use_cases.get_account(uow, ledger, "cash")
    assert view.as_of_sequence == 4
    got = {b.asset: (b.debits, b.credits, b.balance) for b in view.balances}
    for asset in ("USD", "EUR/2"):
        debits = sum(a for d, _, a, s in posts if d == "cash" and s == asset)
        credits = sum(a for _, c, a, s in posts if c == "cash" and s == asset)
        assert got[asset] == (debits, credits, debits - credits)
    assert use_cases.get_account(uow, ledger, "nobody").balances == []


def test_get_account_of_unknown_ledger_is_rejected(uow: Any, ledger: str) -> None:
    with pytest.raises(CounterNotInitialized):
        use_cases.get_account(uow, ledger, "cash")


def test_pages_are_keyset_ordered_and_bounded(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    for i in range(7):
        use_cases.post_entry(uow, make_entry(ledger, f"k{i}"))
    page = use_cases.read_rows(uow, ledger, 2, 3)
    assert page.sequences == [3, 4, 5]
    assert page.head == 7
    assert use_cases.read_rows(uow, ledger, 7, 3).sequences == []


def test_who_posted_each_entry_and_who_created_the_counter_are_stored(
    uow: Any, engine: Engine, ledger: str
) -> None:
    created = use_cases.initialize_counter(uow, ledger, "admin")
    assert (created.created, created.initialized_by) == (True, "admin")
    assert created.initialized_at is not None
    again = use_cases.initialize_counter(uow, ledger, "someone-else")
    assert (again.created, again.initialized_by, again.initialized_at) == (
        False,
        "admin",
        created.initialized_at,
    )
    use_cases.post_entry(uow, make_entry(ledger, "k1", posted_by="alice"))
    use_cases.post_group(
        uow, [make_entry(ledger, "k2", posted_by="bob"), make_entry(ledger, "k3", posted_by="")]
    )
    with uow() as u:
        stored = u.ledger.find_by_keys(ledger, ["k1", "k2", "k3"])
    assert {k: e.payload.posted_by for k, e in stored.items()} == {
        "k1": "alice",
        "k2": "bob",
        "k3": "",
    }
    read = use_cases.read_rows(uow, ledger, 0, 10)
    encoded = [ledger_pb2.Entry.FromString(payload).posted_by for _, _, payload in read.rows]
    assert encoded == ["alice", "bob", ""]  # the stored encoding says the same
