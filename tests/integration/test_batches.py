"""Group commit (independent outcomes in one transaction) and atomic batches,
on real Postgres and SQLite."""

from __future__ import annotations

import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger_service.domain.entries import PostResult
from ledger_service.domain.errors import (
    AccountTotalOverflow,
    CounterNotInitialized,
    IdempotencyConflict,
    LedgerError,
)
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service import use_cases
from ledger_service.storage.numbering import as_utc
from ledger_service.storage.schema import entries

from .helpers import counter_value, make_entry, run_concurrently, sequences


def test_group_gives_each_entry_its_own_outcome_and_contiguous_numbers(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "old"))
    use_cases.post_entry(uow, make_entry(ledger, "old-2"))
    outcomes = use_cases.post_group(
        uow,
        [
            make_entry(ledger, "a"),
            make_entry(ledger, "old"),  # replay
            make_entry(ledger, "old-2", amount=5),  # conflict
            make_entry(ledger, "b", debit_account="big", credit_account="bigger", amount=INT64_MAX),
            make_entry(ledger, "a"),  # replay of the first, within the group
            make_entry(ledger, "a", amount=7),  # conflict with the first
            make_entry(ledger, "c"),
        ],
    )
    kinds = [
        (o.entry.sequence, o.replayed) if isinstance(o, PostResult) else type(o).__name__
        for o in outcomes
    ]
    assert kinds == [
        (3, False),
        (1, True),
        "IdempotencyConflict",
        (4, False),
        (3, True),
        "IdempotencyConflict",
        (5, False),
    ]
    assert sequences(engine, ledger) == [1, 2, 3, 4, 5]


def test_an_overflowing_entry_fails_alone_and_the_rest_commit_without_gap(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(
        uow,
        make_entry(ledger, "max", debit_account="full", credit_account="source", amount=INT64_MAX),
    )
    outcomes = use_cases.post_group(
        uow,
        [
            make_entry(ledger, "x"),
            make_entry(ledger, "over", debit_account="full", amount=1),
            make_entry(ledger, "y"),
        ],
    )
    assert isinstance(outcomes[1], AccountTotalOverflow)
    assert [o.entry.sequence for o in outcomes if isinstance(o, PostResult)] == [2, 3]
    assert sequences(engine, ledger) == [1, 2, 3]


def test_a_replay_is_answered_when_the_groups_only_new_entry_overflows(
    uow: Any, engine: Engine, ledger: str
) -> None:
    """The overflowing entry fails alone even when it is the group's only new
    one: the replay beside it still replays (it once failed with it)."""
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(
        uow,
        make_entry(ledger, "max", debit_account="full", credit_account="source", amount=INT64_MAX),
    )
    first = use_cases.post_entry(uow, make_entry(ledger, "x"))
    for look_up_first in (False, True):  # the careful path, and after the loop writer
        outcomes = use_cases.post_group(
            uow,
            [make_entry(ledger, "x"), make_entry(ledger, "over", debit_account="full", amount=1)],
            look_up_first=look_up_first,
        )
        assert outcomes[0] == PostResult(first.entry, replayed=True, balances=first.balances)
        assert isinstance(outcomes[1], AccountTotalOverflow)
    assert sequences(engine, ledger) == [1, 2]


def test_group_on_a_ledger_without_counter_writes_nothing(
    uow: Any, engine: Engine, ledger: str
) -> None:
    outcomes = use_cases.post_group(uow, [make_entry(ledger, "a"), make_entry(ledger, "b")])
    assert all(isinstance(o, CounterNotInitialized) for o in outcomes)
    assert sequences(engine, ledger) == []


def test_atomic_batch_commits_in_request_order_and_replays_known_keys(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "known"))
    results = use_cases.post_atomic(
        uow, [make_entry(ledger, "n1"), make_entry(ledger, "known"), make_entry(ledger, "n2")]
    )
    assert [(r.entry.sequence, r.replayed) for r in results] == [(2, False), (1, True), (3, False)]
    again = use_cases.post_atomic(uow, [make_entry(ledger, "n1"), make_entry(ledger, "n2")])
    assert [(r.entry.sequence, r.replayed) for r in again] == [(2, True), (3, True)]
    assert sequences(engine, ledger) == [1, 2, 3]


def test_a_transactions_entries_share_their_commit_time_which_never_decreases(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    first = use_cases.post_atomic(uow, [make_entry(ledger, f"a{i}") for i in range(3)])
    second = use_cases.post_group(uow, [make_entry(ledger, f"b{i}") for i in range(2)])
    times = [o.entry.created_at for o in [*first, *second] if isinstance(o, PostResult)]
    assert len(times) == 5
    assert len(set(times[:3])) == 1 and len(set(times[3:])) == 1
    assert times[0] <= times[3]
    # The callers were told what is stored.
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(entries.c.created_at)
            .where(entries.c.ledger == ledger)
            .order_by(entries.c.sequence)
        ).scalars()
        assert [as_utc(t) for t in stored] == times


@pytest.mark.parametrize("failure", ["conflict", "overflow", "no counter"])
def test_a_failing_atomic_batch_writes_nothing(
    uow: Any, engine: Engine, ledger: str, failure: str
) -> None:
    if failure != "no counter":
        use_cases.initialize_counter(uow, ledger)
        use_cases.post_entry(
            uow,
            make_entry(
                ledger, "known", debit_account="full", credit_account="source", amount=INT64_MAX
            ),
        )
    batch = [make_entry(ledger, "n1"), make_entry(ledger, "n2")]
    if failure == "conflict":
        batch.append(make_entry(ledger, "known", amount=1))
        expected: type[LedgerError] = IdempotencyConflict
    elif failure == "overflow":
        batch.append(make_entry(ledger, "n3", debit_account="full", amount=1))
        expected = AccountTotalOverflow
    else:
        expected = CounterNotInitialized
    with pytest.raises(expected) as error:
        use_cases.post_atomic(uow, batch)
    if failure == "conflict":
        assert error.value.message.startswith("entries[2]: ")
        assert error.value.metadata["index"] == "2"
    assert sequences(engine, ledger) == ([] if failure == "no counter" else [1])
    assert counter_value(engine, ledger) == (None if failure == "no counter" else 1)


def test_batches_and_single_posts_mixed_under_concurrency_give_one_to_n(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)

    def worker(i: int) -> int:
        if i % 3 == 0:
            batch = [make_entry(ledger, f"atomic{i}-{j}", debit_account=f"d{i}") for j in range(25)]
            return len(use_cases.post_atomic(uow, batch))
        if i % 3 == 1:
            batch = [make_entry(ledger, f"group{i}-{j}", debit_account=f"d{i}") for j in range(10)]
            return len(use_cases.post_group(uow, batch))
        for j in range(5):
            use_cases.post_entry(uow, make_entry(ledger, f"single{i}-{j}", debit_account=f"d{i}"))
        return 5

    counts = run_concurrently(24, worker)
    assert all(isinstance(c, int) for c in counts), counts
    n = sum(counts)
    assert sequences(engine, ledger) == list(range(1, n + 1))
    assert counter_value(engine, ledger) == n


def test_groups_racing_on_the_same_keys_store_each_key_once(
    uow: Any, engine: Engine, ledger: str
) -> None:
    """Like several server processes each batching posts of the same keys."""
    use_cases.initialize_counter(uow, ledger)
    keys = [f"k{i}" for i in range(20)]

    def worker(i: int) -> dict[str, int]:
        mine = keys[:]
        random.Random(i).shuffle(mine)
        outcomes = use_cases.post_group(uow, [make_entry(ledger, k) for k in mine])
        results = [o for o in outcomes if isinstance(o, PostResult)]
        assert len(results) == len(mine), outcomes
        return {k: r.entry.sequence for k, r in zip(mine, results, strict=True)}

    results = run_concurrently(8, worker)
    assert all(isinstance(r, dict) for r in results), results
    assert all(r == results[0] for r in results)  # everyone agrees on each key's number
    assert sorted(results[0].values()) == list(range(1, 21))
    assert sequences(engine, ledger) == list(range(1, 21))


def test_optional_columns_are_stored_per_entry_in_a_mixed_batch(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_atomic(
        uow,
        [
            make_entry(ledger, "plain"),
            make_entry(ledger, "rich", entry_type="fee", description="d", metadata={"k": "v"}),
            make_entry(ledger, "plain-2"),
            # Control characters where they are allowed, the unit separator
            # included (Postgres splits some columns on it: numbering.py).
            make_entry(
                ledger,
                "ctl",
                description="a\x1fb\tc\n",
                metadata={"x\u00e9": "v\x1f\x07w", "k": ""},
            ),
            make_entry(ledger, "ünï", debit_account="käse", credit_account="🧾", asset="EUR"),
        ],
    )
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                entries.c.idempotency_key,
                entries.c.entry_type,
                entries.c.description,
                entries.c.metadata,
            )
            .where(entries.c.ledger == ledger)
            .order_by(entries.c.sequence)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("plain", "", "", {}),
        ("rich", "fee", "d", {"k": "v"}),
        ("plain-2", "", "", {}),
        ("ctl", "", "a\x1fb\tc\n", {"x\u00e9": "v\x1f\x07w", "k": ""}),
        ("ünï", "", "", {}),
    ]
    with engine.connect() as conn:
        accounts = conn.execute(
            sa.select(entries.c.debit_account, entries.c.credit_account, entries.c.asset).where(
                entries.c.ledger == ledger, entries.c.idempotency_key == "ünï"
            )
        ).one()
    assert tuple(accounts) == ("käse", "🧾", "EUR")
