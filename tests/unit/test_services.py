"""The use cases (service/use_cases.py) over an in-memory unit of work
(tests/unit/fakes.py): which numbers entries get, what replays, what fails
alone, and which repository calls each path makes. No database: the real
stores are covered by tests/integration and tests/e2e."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from ledger_service.api import wire
from ledger_service.domain.accounts import AccountView, AssetTotals
from ledger_service.domain.entries import (
    Balance,
    Counter,
    Entry,
    NewEntry,
    PostResult,
    epoch_micros,
)
from ledger_service.domain.errors import (
    AccountTotalOverflow,
    CounterNotInitialized,
    IdempotencyConflict,
    PositionAhead,
)
from ledger_service.domain.limits import INT64_MAX
from ledger_service.service.ports import DuplicateIdempotencyKey, TotalsOutOfRange
from ledger_service.service.use_cases import (
    Outcome,
    get_account,
    initialize_counter,
    post_atomic,
    post_entry,
    post_group,
    post_new,
    read_rows,
    stream_start,
)

from .fakes import EPOCH, FakeNewEntryWriter, FakeUowFactory

LEDGER = "books"


def new(
    key: str,
    amount: int = 10,
    *,
    debit: str = "cash",
    credit: str = "sales",
    asset: str = "USD",
    description: str = "",
    metadata: Mapping[str, str] | None = None,
) -> NewEntry:
    return NewEntry(
        LEDGER, key, debit, credit, amount, asset, "", description, dict(metadata or {})
    )


def rent(key: str, amount: int = 10) -> NewEntry:
    """An entry that touches neither cash nor sales."""
    return new(key, amount, debit="rent", credit="bank")


def summary(outcomes: Sequence[Outcome]) -> list[tuple[int, bool] | str]:
    """(sequence, replayed) per result, the error's class name per error."""
    return [
        (o.entry.sequence, o.replayed) if isinstance(o, PostResult) else type(o).__name__
        for o in outcomes
    ]


def add(*keys: str) -> tuple[str, tuple[str, ...]]:
    return ("add_entries", keys)


def find(*keys: str) -> tuple[str, tuple[str, ...]]:
    return ("find_by_keys", tuple(sorted(keys)))


@pytest.fixture
def uows() -> FakeUowFactory:
    """A store whose ledger has its counter, at 0."""
    factory = FakeUowFactory()
    factory.store.counters[LEDGER] = 0
    return factory


def committed(uows: FakeUowFactory, *entries: NewEntry) -> list[Entry]:
    """Entries another caller committed before the test (not in the call log)."""
    return uows.store.commit_concurrently(LEDGER, entries)


def lose_race_to(uows: FakeUowFactory, *entries: NewEntry) -> list[Entry]:
    """Just before the first add_entries, another transaction commits
    `entries`; the list returned then holds the winners' entries."""
    winners: list[Entry] = []
    uows.store.before_add_entries[1] = lambda: winners.extend(committed(uows, *entries))
    return winners


# -- the optimistic write -------------------------------------------------


def test_new_keys_of_a_group_commit_with_the_next_numbers_without_a_lookup_first(
    uows: FakeUowFactory,
) -> None:
    outcomes = post_group(uows, [new("a"), new("b"), new("c")], timeout=0.25)

    assert summary(outcomes) == [(1, False), (2, False), (3, False)]
    assert uows.store.calls == [add("a", "b", "c")]
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b", 3: "c"}
    assert uows.store.counters == {LEDGER: 3}
    assert [(u.write, u.timeout, u.committed) for u in uows.opened] == [(True, 0.25, True)]


def test_post_entry_and_post_atomic_write_new_keys_at_once_with_one_created_at_per_transaction(
    uows: FakeUowFactory,
) -> None:
    first = post_entry(uows, new("a"))
    batch = post_atomic(uows, [new("b"), new("c")])

    assert (first.entry.sequence, first.replayed) == (1, False)
    assert first.entry.payload == new("a")
    assert summary(batch) == [(2, False), (3, False)]
    assert [r.entry.created_at for r in batch] == [batch[0].entry.created_at] * 2
    assert first.entry.created_at < batch[0].entry.created_at
    assert uows.store.calls == [add("a"), add("b", "c")]
    assert uows.store.totals == {
        (LEDGER, "cash", "USD"): (30, 0),
        (LEDGER, "sales", "USD"): (0, 30),
    }


# -- the lookup-first fallback ----------------------------------------------


def test_a_stored_key_makes_the_optimistic_write_redo_with_the_lookup_and_replay_it(
    uows: FakeUowFactory,
) -> None:
    [stored] = committed(uows, new("a"))

    outcomes = post_group(uows, [new("a"), new("b")])

    assert outcomes[0] == PostResult(stored, replayed=True)
    assert summary(outcomes) == [(1, True), (2, False)]
    assert uows.store.calls == [add("a", "b"), find("a", "b"), add("b")]
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b"}
    assert uows.store.totals[(LEDGER, "cash", "USD")] == (20, 0)  # a counted once


def test_a_replayed_post_returns_the_stored_entry_and_takes_no_number(
    uows: FakeUowFactory,
) -> None:
    original = post_entry(uows, new("a", metadata={"order": "7"}))
    replay = post_entry(uows, new("a", metadata={"order": "7"}))

    assert replay == PostResult(original.entry, replayed=True)
    assert replay.entry.created_at == original.entry.created_at
    assert uows.store.counters == {LEDGER: 1}
    assert uows.store.commits == 1  # the replay committed nothing


def test_a_stored_key_with_another_payload_is_a_conflict_naming_the_differing_fields(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"))

    with pytest.raises(IdempotencyConflict) as raised:
        post_entry(uows, new("a", 11, description="other", metadata={"x": "1"}))

    assert raised.value.fields == ["amount", "description", "metadata"]
    assert raised.value.metadata == {
        "ledger": LEDGER,
        "sequence": "1",
        "fields": "amount,description,metadata",
    }
    assert uows.store.calls == [add("a"), find("a")]
    assert uows.store.counters == {LEDGER: 1}
    assert uows.store.commits == 0


def test_a_conflicting_key_in_a_group_fails_alone_and_the_others_commit(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"))

    outcomes = post_group(uows, [new("b"), new("a", 99), new("c")])

    assert summary(outcomes) == [(2, False), "IdempotencyConflict", (3, False)]
    conflict = outcomes[1]
    assert isinstance(conflict, IdempotencyConflict)
    assert conflict.fields == ["amount"]
    assert "index" not in conflict.metadata  # a group's callers each sent one entry
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b", 3: "c"}


@pytest.mark.parametrize("use_case", ["post_group", "post_atomic"])
def test_look_up_first_skips_the_optimistic_write(uows: FakeUowFactory, use_case: str) -> None:
    committed(uows, new("a"))
    batch = [new("a"), new("b")]

    if use_case == "post_group":
        outcomes: Sequence[Outcome] = post_group(uows, batch, look_up_first=True)
    else:
        outcomes = post_atomic(uows, batch, look_up_first=True)

    assert summary(outcomes) == [(1, True), (2, False)]
    assert uows.store.calls == [find("a", "b"), add("b")]
    assert len(uows.opened) == 1


# -- a group's split batch --------------------------------------------------


def test_an_overflowing_entry_of_a_group_fails_alone_and_the_others_commit_without_a_gap(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("big", INT64_MAX))
    batch = [rent("a", 5), new("b", 1), rent("c", 7)]

    outcomes = post_group(uows, batch)

    assert summary(outcomes) == [(2, False), "AccountTotalOverflow", (3, False)]
    assert uows.store.sequences(LEDGER) == {1: "big", 2: "a", 3: "c"}
    assert uows.store.counters == {LEDGER: 3}
    # Tried whole (optimistic, then careful), then one by one: b alone fails.
    assert uows.store.calls == [
        add("a", "b", "c"),
        find("a", "b", "c"),
        add("a", "b", "c"),
        add("a"),
        add("b"),
        find("b"),
        add("b"),
        add("c"),
    ]
    assert uows.store.totals == {
        (LEDGER, "bank", "USD"): (0, 12),
        (LEDGER, "cash", "USD"): (INT64_MAX, 0),
        (LEDGER, "rent", "USD"): (12, 0),
        (LEDGER, "sales", "USD"): (0, INT64_MAX),
    }


@pytest.mark.parametrize("look_up_first", [False, True])
def test_a_replay_in_a_group_is_answered_when_the_groups_only_new_entry_overflows(
    uows: FakeUowFactory, look_up_first: bool
) -> None:
    [_, stored] = committed(uows, new("big", INT64_MAX), rent("a", 5))

    outcomes = post_group(uows, [rent("a", 5), new("b", 1)], look_up_first=look_up_first)

    assert outcomes[0] == PostResult(stored, replayed=True)
    assert summary(outcomes) == [(2, True), "AccountTotalOverflow"]


def test_an_overflowing_lone_post_is_account_total_overflow_and_writes_nothing(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("big", INT64_MAX))

    with pytest.raises(AccountTotalOverflow):
        post_entry(uows, new("b", 1))

    assert uows.store.calls == [add("b"), find("b"), add("b")]
    assert uows.store.sequences(LEDGER) == {1: "big"}
    assert uows.store.totals[(LEDGER, "cash", "USD")] == (INT64_MAX, 0)


# -- same-key races -----------------------------------------------------------


def test_a_post_that_loses_a_key_race_answers_with_the_winners_entry_as_a_replay(
    uows: FakeUowFactory,
) -> None:
    winner = lose_race_to(uows, new("a"))

    result = post_entry(uows, new("a"))

    assert result == PostResult(winner[0], replayed=True)
    assert result.entry.sequence == 1
    assert uows.store.calls == [add("a"), find("a")]
    assert uows.store.sequences(LEDGER) == {1: "a"}


def test_a_post_that_loses_a_key_race_to_another_payload_is_a_conflict(
    uows: FakeUowFactory,
) -> None:
    lose_race_to(uows, new("a", 3))

    with pytest.raises(IdempotencyConflict) as raised:
        post_entry(uows, new("a"))

    assert raised.value.fields == ["amount"]
    assert uows.store.sequences(LEDGER) == {1: "a"}


def test_a_post_that_loses_a_key_race_after_its_lookup_retries_and_replays_the_winner() -> None:
    uows = FakeUowFactory()  # no counter yet: the optimistic write is refused

    def another_process() -> None:  # initializes the ledger and posts the same key
        uows.store.counters[LEDGER] = 0
        committed(uows, new("a"))

    uows.store.before_add_entries[2] = another_process

    result = post_entry(uows, new("a"))

    assert (result.entry.sequence, result.replayed) == (1, True)
    assert uows.store.calls == [add("a"), find("a"), add("a"), add("a"), find("a")]
    assert uows.store.counters == {LEDGER: 1}


def test_a_group_whose_careful_write_loses_a_key_race_retries_its_entries_one_by_one(
    uows: FakeUowFactory,
) -> None:
    lose_race_to(uows, new("a"))

    outcomes = post_group(uows, [new("a"), new("b")], look_up_first=True)

    assert summary(outcomes) == [(1, True), (2, False)]
    assert uows.store.calls == [find("a", "b"), add("a", "b"), add("a"), find("a"), add("b")]
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b"}


@pytest.mark.parametrize(
    ("look_up_first", "calls"),
    [
        (False, [add("a", "b"), find("a", "b"), add("b")]),
        # The careful write lost the race: post_atomic looks again.
        (True, [find("a", "b"), add("a", "b"), find("a", "b"), add("b")]),
    ],
)
def test_an_atomic_batch_that_loses_a_key_race_retries_and_replays_the_winner(
    uows: FakeUowFactory, look_up_first: bool, calls: list[tuple[str, tuple[str, ...]]]
) -> None:
    winner = lose_race_to(uows, new("a"))

    results = post_atomic(uows, [new("a"), new("b")], look_up_first=look_up_first)

    assert results[0] == PostResult(winner[0], replayed=True)
    assert summary(results) == [(1, True), (2, False)]
    assert uows.store.calls == calls


@pytest.mark.parametrize("use_case", ["post_entry", "post_atomic"])
def test_a_key_that_keeps_racing_gives_up_after_three_attempts_having_written_nothing(
    uows: FakeUowFactory, use_case: str
) -> None:
    def lost_race() -> None:
        raise DuplicateIdempotencyKey(LEDGER)

    uows.store.before_add_entries = {n: lost_race for n in range(1, 10)}  # more than enough

    with pytest.raises(RuntimeError, match="kept racing"):
        if use_case == "post_entry":
            post_entry(uows, new("a"))
        else:
            post_atomic(uows, [new("a")])

    assert uows.store.calls == [add("a"), find("a"), add("a")] * 3
    assert uows.store.sequences(LEDGER) == {}
    assert uows.store.counters == {LEDGER: 0}


# -- post_atomic: all or nothing -----------------------------------------------


def test_an_atomic_batch_with_an_overflowing_entry_writes_nothing(uows: FakeUowFactory) -> None:
    committed(uows, new("big", INT64_MAX))

    with pytest.raises(AccountTotalOverflow):
        post_atomic(uows, [rent("a", 5), new("b", 1)])

    assert uows.store.sequences(LEDGER) == {1: "big"}
    assert uows.store.counters == {LEDGER: 1}
    assert (LEDGER, "rent", "USD") not in uows.store.totals
    assert uows.store.commits == 0


def test_an_atomic_batch_with_a_conflicting_key_writes_nothing_and_names_its_index(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"))

    with pytest.raises(IdempotencyConflict) as raised:
        post_atomic(uows, [new("b"), new("a", debit="bank")])

    assert raised.value.fields == ["debit_account"]
    assert raised.value.metadata["index"] == "1"
    assert raised.value.message.startswith("entries[1]: ")
    assert uows.store.sequences(LEDGER) == {1: "a"}
    assert uows.store.commits == 0


def test_an_atomic_batch_replays_known_keys_in_place_and_numbers_only_the_new_ones(
    uows: FakeUowFactory,
) -> None:
    [stored] = committed(uows, new("a"))

    results = post_atomic(uows, [new("b"), new("a"), new("c")])

    assert summary(results) == [(2, False), (1, True), (3, False)]
    assert results[1].entry == stored
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b", 3: "c"}


def test_an_atomic_batch_of_known_keys_only_replays_and_commits_nothing(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"), new("b"))

    results = post_atomic(uows, [new("b"), new("a")])

    assert summary(results) == [(2, True), (1, True)]
    assert uows.store.calls == [add("b", "a"), find("a", "b")]
    assert uows.store.commits == 0
    assert uows.store.counters == {LEDGER: 2}


# -- a key repeated within one group ----------------------------------------------


def test_a_key_repeated_within_a_group_replays_its_first_copy(uows: FakeUowFactory) -> None:
    outcomes = post_group(uows, [new("a"), new("b"), new("a")])

    assert summary(outcomes) == [(1, False), (2, False), (1, True)]
    first, second = outcomes[0], outcomes[1]
    assert isinstance(first, PostResult) and isinstance(second, PostResult)
    # The copy's balances are the first copy's, as of entry 1, not the
    # group's end (entry 2 moved the same accounts again).
    assert first.balances == (Balance("cash", "USD", 10, 0), Balance("sales", "USD", 0, 10))
    assert second.balances == (Balance("cash", "USD", 20, 0), Balance("sales", "USD", 0, 20))
    assert outcomes[2] == PostResult(first.entry, replayed=True, balances=first.balances)
    assert uows.store.calls == [add("a", "b")]
    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b"}


def test_a_key_repeated_within_a_group_with_another_payload_conflicts_with_its_first_copy(
    uows: FakeUowFactory,
) -> None:
    outcomes = post_group(uows, [new("a"), new("a", asset="EUR")])

    assert summary(outcomes) == [(1, False), "IdempotencyConflict"]
    conflict = outcomes[1]
    assert isinstance(conflict, IdempotencyConflict)
    assert (conflict.fields, conflict.metadata["sequence"]) == (["asset"], "1")
    assert uows.store.sequences(LEDGER) == {1: "a"}


# -- post_new: the event loop's write of new keys -----------------------------------


def test_post_new_refuses_repeated_keys_without_calling_the_writer(uows: FakeUowFactory) -> None:
    writer = FakeNewEntryWriter(uows.store)

    assert asyncio.run(post_new(writer, [new("a"), new("b"), new("a")], 1.0)) is None

    assert writer.calls == []
    assert uows.store.sequences(LEDGER) == {}


@pytest.mark.parametrize("why", ["a key is stored", "the writer declines"])
def test_post_new_passes_the_writers_refusal_through(uows: FakeUowFactory, why: str) -> None:
    if why == "a key is stored":
        committed(uows, new("a"))
    writer = FakeNewEntryWriter(uows.store, refuse=why == "the writer declines")

    assert asyncio.run(post_new(writer, [new("b"), new("a")], 0.5)) is None

    assert writer.calls == [(LEDGER, ("b", "a"), 0.5)]
    assert uows.store.sequences(LEDGER) == ({1: "a"} if why == "a key is stored" else {})


def test_post_new_returns_the_writers_entries_in_order_as_new_posts(
    uows: FakeUowFactory,
) -> None:
    writer = FakeNewEntryWriter(uows.store)
    batch = [new("c"), new("a"), new("b")]

    results = asyncio.run(post_new(writer, batch, None))

    assert results is not None
    assert summary(results) == [(1, False), (2, False), (3, False)]
    assert [r.entry.payload for r in results] == batch
    assert writer.calls == [(LEDGER, ("c", "a", "b"), None)]


# -- no counter ------------------------------------------------------------------


def test_a_post_without_a_counter_is_counter_not_initialized_and_writes_nothing() -> None:
    uows = FakeUowFactory()

    with pytest.raises(CounterNotInitialized) as raised:
        post_entry(uows, new("a"))

    assert raised.value.metadata == {"ledger": LEDGER}
    assert uows.store.calls == [add("a"), find("a"), add("a")]
    assert (uows.store.counters, uows.store.entries, uows.store.totals) == ({}, {}, {})


def test_a_group_without_a_counter_fails_each_entry_and_writes_nothing() -> None:
    uows = FakeUowFactory()

    outcomes = post_group(uows, [new("a"), new("b")])

    assert summary(outcomes) == ["CounterNotInitialized", "CounterNotInitialized"]
    assert (uows.store.counters, uows.store.entries, uows.store.totals) == ({}, {}, {})
    assert uows.store.commits == 0


def test_an_atomic_batch_without_a_counter_is_counter_not_initialized_and_writes_nothing() -> None:
    uows = FakeUowFactory()

    with pytest.raises(CounterNotInitialized):
        post_atomic(uows, [new("a"), new("b")])

    assert uows.store.calls == [add("a", "b"), find("a", "b"), add("a", "b")]
    assert (uows.store.counters, uows.store.entries, uows.store.totals) == ({}, {}, {})


# -- counters, streams and accounts -------------------------------------------------


def test_initialize_counter_creates_the_counter_then_finds_it_with_the_same_value() -> None:
    uows = FakeUowFactory()

    assert initialize_counter(uows, LEDGER) == Counter(LEDGER, 0, created=True)
    assert initialize_counter(uows, LEDGER) == Counter(LEDGER, 0, created=False)
    post_atomic(uows, [new("a"), new("b")])
    assert initialize_counter(uows, LEDGER) == Counter(LEDGER, 2, created=False)

    assert uows.store.counters == {LEDGER: 2}
    assert uows.store.commits == 2  # the creation and the batch


def test_stream_start_returns_the_head_and_refuses_a_position_beyond_it(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"), new("b"))

    assert [stream_start(uows, LEDGER, after) for after in (0, 1, 2)] == [2, 2, 2]
    with pytest.raises(PositionAhead) as raised:
        stream_start(uows, LEDGER, 3)

    assert raised.value.metadata == {"ledger": LEDGER, "head_sequence": "2"}
    assert {u.write for u in uows.opened} == {False}


def test_stream_start_and_get_account_without_a_counter_are_counter_not_initialized() -> None:
    uows = FakeUowFactory()

    with pytest.raises(CounterNotInitialized):
        stream_start(uows, LEDGER, 0)
    with pytest.raises(CounterNotInitialized):
        get_account(uows, LEDGER, "cash")


def test_get_account_gives_the_totals_of_exactly_the_committed_entries(
    uows: FakeUowFactory,
) -> None:
    post_group(
        uows, [new("a", 10), new("b", 5, asset="EUR"), new("c", 3, debit="bank", credit="cash")]
    )

    assert get_account(uows, LEDGER, "cash") == AccountView(
        LEDGER,
        "cash",
        [AssetTotals("EUR", 5, 0), AssetTotals("USD", 10, 3)],
        as_of_sequence=3,
    )
    assert get_account(uows, LEDGER, "nobody") == AccountView(LEDGER, "nobody", [], 3)


def test_read_rows_reads_consecutive_entries_after_a_position_with_the_head(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a"), new("b"), new("c"))

    page = read_rows(uows, LEDGER, 1, 1)

    # (sequence, created_at in epoch µs, the stored encoding), one transaction's clock
    assert page.rows == [(2, epoch_micros(EPOCH) + 1_000_000, wire.payload(new("b")))]
    assert page.head == 3


# -- the fakes themselves ------------------------------------------------------------


def test_the_fake_unit_of_work_discards_the_writes_it_did_not_commit(
    uows: FakeUowFactory,
) -> None:
    with uows(write=True) as uow, uows() as other:
        uow.ledger.add_entries(LEDGER, [new("a")])
        assert set(uow.ledger.find_by_keys(LEDGER, ["a"])) == {"a"}
        assert other.ledger.find_by_keys(LEDGER, ["a"]) == {}
        assert other.ledger.counter_value(LEDGER) == 0

    assert (uows.store.counters, uows.store.entries, uows.store.totals) == ({LEDGER: 0}, {}, {})


def test_the_fake_repository_refuses_as_the_database_does_having_written_nothing(
    uows: FakeUowFactory,
) -> None:
    committed(uows, new("a", INT64_MAX - 1))

    with uows(write=True) as uow:
        with pytest.raises(DuplicateIdempotencyKey):
            uow.ledger.add_entries(LEDGER, [rent("b"), rent("a")])
        with pytest.raises(DuplicateIdempotencyKey):
            uow.ledger.add_entries(LEDGER, [rent("b"), rent("b")])
        with pytest.raises(TotalsOutOfRange):
            uow.ledger.add_entries(LEDGER, [new("b", 1), new("c", 1)])
        other = dataclasses.replace(new("b"), ledger="other")
        assert uow.ledger.add_entries("other", [other]) is None
        assert uow.ledger.counter_value(LEDGER) == 1  # the refusals took no number
        numbered = uow.ledger.add_entries(LEDGER, [new("b", 1), rent("c")])
        assert numbered is not None
        assert [e.sequence for e in numbered.entries()] == [2, 3]
        uow.commit()

    assert uows.store.sequences(LEDGER) == {1: "a", 2: "b", 3: "c"}
    assert uows.store.totals[(LEDGER, "cash", "USD")] == (INT64_MAX, 0)
