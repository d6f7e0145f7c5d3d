"""What a ledger refuses and answers, against real databases (Postgres and
SQLite): balance limits, multi-posting entries, reversals, lookups,
listings, balances as of a number, and the balances each write returns."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine

from ledger_service.domain.balances import Limits
from ledger_service.domain.entries import EntryFields, Posting, PostResult
from ledger_service.domain.errors import (
    AlreadyReversed,
    BalanceLimitExceeded,
    CounterNotInitialized,
    EntryNotFound,
    IdempotencyConflict,
    InvalidArgument,
    PositionAhead,
)
from ledger_service.domain.validation import validate_batch, validate_new_entry
from ledger_service.service import use_cases

from .helpers import counter_value, make_entry, run_concurrently, sequences


def multi(ledger: str, key: str, *postings: tuple[str, str, int, str], **kw: Any) -> Any:
    return validate_new_entry(
        ledger=ledger,
        idempotency_key=key,
        debit_account="",
        credit_account="",
        amount=0,
        asset="",
        postings=[Posting(*p) for p in postings],
        **kw,
    )


def fund(uow: Any, ledger: str, account: str, amount: int, key: str = "fund") -> None:
    use_cases.post_entry(
        uow, make_entry(ledger, key, debit_account="bank", credit_account=account, amount=amount)
    )


def spend(ledger: str, key: str, account: str = "wallet", amount: int = 10) -> Any:
    return make_entry(ledger, key, debit_account=account, credit_account="shop", amount=amount)


def totals(uow: Any, ledger: str, account: str, as_of: int = 0) -> dict[str, tuple[int, int]]:
    view = use_cases.get_account(uow, ledger, account, as_of)
    return {b.asset: (b.debits, b.credits) for b in view.balances}


# -- balance limits -----------------------------------------------------------


def test_a_post_beyond_a_limit_writes_nothing_and_takes_no_number(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    fund(uow, ledger, "wallet", 15)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    use_cases.post_entry(uow, spend(ledger, "a"))
    with pytest.raises(BalanceLimitExceeded) as refused:
        use_cases.post_entry(uow, spend(ledger, "b"))
    assert refused.value.metadata == {
        "ledger": ledger,
        "account": "wallet",
        "asset": "USD",
        "max_net_debit": "0",
        "limit": "max_net_debit",
        "would_reach": "5",
    }
    assert "'wallet' USD" in refused.value.message and "would reach 5" in refused.value.message
    assert sequences(engine, ledger) == [1, 2] and counter_value(engine, ledger) == 2
    assert totals(uow, ledger, "wallet") == {"USD": (10, 15)}
    assert totals(uow, ledger, "shop") == {"USD": (0, 10)}
    # The next post that fits takes number 3: none was consumed.
    assert use_cases.post_entry(uow, spend(ledger, "c", amount=5)).entry.sequence == 3


def test_limits_show_on_the_account_and_can_be_lifted(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    shown, as_of = use_cases.set_account_limits(
        uow, ledger, "wallet", "USD", Limits(max_net_debit=0, max_net_credit=100)
    )
    assert (shown.debits, shown.credits, shown.max_net_debit, shown.max_net_credit) == (
        0,
        0,
        0,
        100,
    )
    assert as_of == 0
    with pytest.raises(BalanceLimitExceeded, match="max_net_credit 100"):
        fund(uow, ledger, "wallet", 101)
    fund(uow, ledger, "wallet", 100)
    (balance,) = use_cases.get_account(uow, ledger, "wallet").balances
    assert (balance.max_net_debit, balance.max_net_credit) == (0, 100)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits())
    fund(uow, ledger, "wallet", 1, key="more")
    (balance,) = use_cases.get_account(uow, ledger, "wallet").balances
    assert (balance.credits, balance.max_net_debit, balance.max_net_credit) == (101, None, None)


def test_a_limit_the_balance_already_breaks_is_refused(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, spend(ledger, "overdrawn", amount=30))
    with pytest.raises(BalanceLimitExceeded) as refused:
        use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    assert "is 30 now, which already breaks the new max_net_debit 0" in refused.value.message
    (balance,) = use_cases.get_account(uow, ledger, "wallet").balances
    assert balance.max_net_debit is None  # nothing was changed
    # A negative floor on an account never posted to: 0 already breaks it.
    with pytest.raises(BalanceLimitExceeded):
        use_cases.set_account_limits(uow, ledger, "new", "USD", Limits(max_net_debit=-1))


def test_limits_need_a_counter(uow: Any, ledger: str) -> None:
    with pytest.raises(CounterNotInitialized):
        use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))


def test_in_a_group_only_the_post_that_crosses_fails(uow: Any, engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    fund(uow, ledger, "wallet", 25)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    for look_up_first in (False, True):
        batch = [spend(ledger, f"{look_up_first}-{i}") for i in range(3)] + [
            make_entry(ledger, f"{look_up_first}-other", debit_account="x", credit_account="y")
        ]
        outcomes = use_cases.post_group(uow, batch, look_up_first=look_up_first)
        if not look_up_first:
            assert [type(o).__name__ for o in outcomes] == [
                "PostResult",
                "PostResult",
                "BalanceLimitExceeded",
                "PostResult",
            ]
            assert [o.entry.sequence for o in outcomes if isinstance(o, PostResult)] == [2, 3, 4]
        else:  # the wallet is spent: its three fail, the other post does not
            assert [type(o).__name__ for o in outcomes] == [
                "BalanceLimitExceeded",
                "BalanceLimitExceeded",
                "BalanceLimitExceeded",
                "PostResult",
            ]
    assert sequences(engine, ledger) == [1, 2, 3, 4, 5]
    assert totals(uow, ledger, "wallet") == {"USD": (20, 25)}


def test_an_atomic_batch_beyond_a_limit_fails_whole_naming_the_entry(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    fund(uow, ledger, "wallet", 25)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    batch = [make_entry(ledger, "other", debit_account="x", credit_account="y")] + [
        spend(ledger, f"s{i}") for i in range(3)
    ]
    with pytest.raises(BalanceLimitExceeded) as refused:
        use_cases.post_atomic(uow, batch)
    assert refused.value.index == 3 and refused.value.message.startswith("entries[3]: ")
    assert refused.value.metadata["index"] == "3"
    assert sequences(engine, ledger) == [1]


def test_a_batch_may_not_dip_below_a_limit_and_come_back(
    uow: Any, engine: Engine, ledger: str
) -> None:
    """Checked after every entry, not on the batch's net: a spend before the
    deposit that would cover it crosses the limit in between."""
    use_cases.initialize_counter(uow, ledger)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    deposit = make_entry(ledger, "deposit", debit_account="bank", credit_account="wallet")
    with pytest.raises(BalanceLimitExceeded) as refused:
        use_cases.post_atomic(uow, [spend(ledger, "early", amount=50), deposit])
    assert refused.value.index == 0 and refused.value.metadata["would_reach"] == "50"
    assert sequences(engine, ledger) == []
    posted = use_cases.post_atomic(uow, [deposit, spend(ledger, "late", amount=50)])
    assert [r.entry.sequence for r in posted] == [1, 2]
    assert totals(uow, ledger, "wallet") == {"USD": (50, 100)}


def test_limits_are_checked_on_an_entrys_net_effect(uow: Any, ledger: str) -> None:
    """Within one entry, postings apply together: only the net counts."""
    use_cases.initialize_counter(uow, ledger)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    posted = use_cases.post_entry(
        uow,
        multi(ledger, "swap", ("wallet", "shop", 30, "USD"), ("bank", "wallet", 30, "USD")),
    )
    assert totals(uow, ledger, "wallet") == {"USD": (30, 30)}
    assert posted.entry.sequence == 1
    with pytest.raises(BalanceLimitExceeded, match="would reach 1"):
        use_cases.post_entry(
            uow,
            multi(ledger, "short", ("wallet", "shop", 31, "USD"), ("bank", "wallet", 30, "USD")),
        )


def test_concurrent_spends_never_overdraw(uow: Any, engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    fund(uow, ledger, "wallet", 370)
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_debit=0))
    outcomes = run_concurrently(
        48, lambda i: use_cases.post_group(uow, [spend(ledger, f"s{i}a"), spend(ledger, f"s{i}b")])
    )
    flat = [o for group in outcomes for o in group]
    posted = [o for o in flat if isinstance(o, PostResult)]
    assert len(posted) == 37
    assert all(isinstance(o, BalanceLimitExceeded) for o in flat if not isinstance(o, PostResult))
    assert sequences(engine, ledger) == list(range(1, 39))
    assert totals(uow, ledger, "wallet") == {"USD": (370, 370)}


# -- multi-posting entries ------------------------------------------------------


def test_a_multi_posting_entry_takes_one_number_and_moves_every_account(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    entry = multi(
        ledger,
        "split",
        ("cash", "sales", 1000, "USD"),
        ("cash", "tax", 200, "USD"),
        ("fx", "cash", 50, "EUR"),
    )
    result = use_cases.post_entry(uow, entry)
    assert result.entry.sequence == 1 and sequences(engine, ledger) == [1]
    assert totals(uow, ledger, "cash") == {"EUR": (0, 50), "USD": (1200, 0)}
    assert totals(uow, ledger, "tax") == {"USD": (0, 200)}
    assert [(b.account, b.asset, b.debits, b.credits) for b in result.balances] == [
        ("cash", "EUR", 0, 50),
        ("cash", "USD", 1200, 0),
        ("fx", "EUR", 50, 0),
        ("sales", "USD", 0, 1000),
        ("tax", "USD", 0, 200),
    ]
    stored = use_cases.get_entry(uow, ledger, sequence=1)
    assert stored.payload.postings == entry.postings
    assert (stored.payload.debit_account, stored.payload.amount) == ("", 0)


def test_the_same_postings_in_the_same_order_replay_and_others_conflict(
    uow: Any, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)
    a, b = ("cash", "sales", 10, "USD"), ("cash", "tax", 2, "USD")
    first = use_cases.post_entry(uow, multi(ledger, "k", a, b))
    again = use_cases.post_entry(uow, multi(ledger, "k", a, b))
    assert again.replayed and again.entry == first.entry and again.balances == first.balances
    with pytest.raises(IdempotencyConflict) as conflict:
        use_cases.post_entry(uow, multi(ledger, "k", b, a))
    assert conflict.value.fields == ["postings"]
    with pytest.raises(IdempotencyConflict):  # the single-pair form is another payload
        use_cases.post_entry(uow, make_entry(ledger, "k"))


def test_a_batch_may_mix_both_forms(uow: Any, engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    results = use_cases.post_atomic(
        uow,
        [
            make_entry(ledger, "one", debit_account="cash", credit_account="sales", amount=5),
            multi(ledger, "two", ("cash", "sales", 7, "USD"), ("cash", "tax", 1, "USD")),
            make_entry(ledger, "three", debit_account="cash", credit_account="sales", amount=3),
        ],
    )
    assert [r.entry.sequence for r in results] == [1, 2, 3]
    assert [next(b.debits for b in r.balances if b.account == "cash") for r in results] == [
        5,
        13,
        16,
    ]
    assert totals(uow, ledger, "sales") == {"USD": (0, 15)}


def test_both_forms_at_once_or_too_many_postings_are_refused() -> None:
    with pytest.raises(InvalidArgument) as both:
        validate_new_entry(
            ledger="l",
            idempotency_key="k",
            debit_account="cash",
            credit_account="",
            amount=5,
            asset="",
            postings=[Posting("a", "b", 1, "USD")],
        )
    assert [v.field for v in both.value.violations] == ["debit_account", "amount"]
    with pytest.raises(InvalidArgument) as many:
        validate_new_entry(
            ledger="l",
            idempotency_key="k",
            debit_account="",
            credit_account="",
            amount=0,
            asset="",
            postings=[Posting("a", "b", 1, "USD")] * 65,
        )
    assert [v.field for v in many.value.violations] == ["postings"]
    with pytest.raises(InvalidArgument) as bad:
        validate_new_entry(
            ledger="l",
            idempotency_key="k",
            debit_account="",
            credit_account="",
            amount=0,
            asset="",
            postings=[Posting("a", "b", 1, "USD"), Posting("a", "a", 0, "")],
        )
    assert [v.field for v in bad.value.violations] == [
        "postings[1].credit_account",
        "postings[1].amount",
        "postings[1].asset",
    ]


def test_a_batch_holds_at_most_4000_postings() -> None:
    many = [Posting(f"d{j}", f"c{j}", 1, "USD") for j in range(64)]
    rows: list[EntryFields] = [(f"k{i}", "", "", 0, "", "", "", {}, None) for i in range(63)]
    with pytest.raises(InvalidArgument) as refused:
        validate_batch("l", rows, "", [many] * 63)  # 4032 postings
    assert [v.field for v in refused.value.violations] == ["entries"]
    assert len(validate_batch("l", rows[:62], "", [many] * 62)) == 62  # 3968


# -- reversals ----------------------------------------------------------------


def test_a_reversal_swaps_every_posting_and_happens_once(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(
        uow, multi(ledger, "sale", ("cash", "sales", 9, "USD"), ("cash", "tax", 1, "USD"))
    )
    reversal = use_cases.reverse_entry(uow, ledger, 1, "refund", "customer returned it")
    assert reversal.entry.sequence == 2 and not reversal.replayed
    assert reversal.entry.payload.reverses_sequence == 1
    assert reversal.entry.payload.postings == (
        Posting("sales", "cash", 9, "USD"),
        Posting("tax", "cash", 1, "USD"),
    )
    assert reversal.entry.payload.description == "customer returned it"
    assert totals(uow, ledger, "cash") == {"USD": (10, 10)}
    again = use_cases.reverse_entry(uow, ledger, 1, "refund", "customer returned it")
    assert again.replayed and again.entry == reversal.entry
    with pytest.raises(AlreadyReversed) as twice:
        use_cases.reverse_entry(uow, ledger, 1, "refund-2")
    assert twice.value.metadata["reversed_by"] == "2"
    with pytest.raises(EntryNotFound):
        use_cases.reverse_entry(uow, ledger, 99, "nope")
    # A one-posting entry is reversed in its own form.
    use_cases.post_entry(uow, make_entry(ledger, "plain", debit_account="a", credit_account="b"))
    plain = use_cases.reverse_entry(uow, ledger, 3, "undo-plain")
    assert (plain.entry.payload.debit_account, plain.entry.payload.credit_account) == ("b", "a")


def test_concurrent_reversals_make_exactly_one_entry(uow: Any, engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "sale"))
    outcomes = run_concurrently(16, lambda i: use_cases.reverse_entry(uow, ledger, 1, f"r{i}"))
    won = [o for o in outcomes if isinstance(o, PostResult)]
    lost = [o for o in outcomes if isinstance(o, AlreadyReversed)]
    assert len(won) == 1 and len(lost) == 15, outcomes
    assert {o.metadata["reversed_by"] for o in lost} == {"2"}
    assert sequences(engine, ledger) == [1, 2]


def test_limits_apply_to_reversals(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    fund(uow, ledger, "wallet", 10)
    use_cases.post_entry(uow, spend(ledger, "spent"))
    use_cases.set_account_limits(uow, ledger, "wallet", "USD", Limits(max_net_credit=0))
    with pytest.raises(BalanceLimitExceeded, match="max_net_credit 0"):
        use_cases.reverse_entry(uow, ledger, 2, "refund")  # would credit the wallet back


# -- lookups, listings, as of a number -------------------------------------------


def test_an_entry_is_found_by_number_or_key(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    posted = use_cases.post_entry(uow, make_entry(ledger, "k1")).entry
    assert use_cases.get_entry(uow, ledger, sequence=1) == posted
    assert use_cases.get_entry(uow, ledger, idempotency_key="k1") == posted
    with pytest.raises(EntryNotFound):
        use_cases.get_entry(uow, ledger, sequence=2)
    with pytest.raises(EntryNotFound):
        use_cases.get_entry(uow, ledger, idempotency_key="k2")
    with pytest.raises(CounterNotInitialized):
        use_cases.get_entry(uow, ledger + "x", sequence=1)


def test_accounts_are_listed_by_name_a_page_at_a_time(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    names = [f"acct-{i:02d}" for i in range(7)]
    for i, name in enumerate(names):
        use_cases.post_entry(
            uow, make_entry(ledger, f"k{i}", debit_account=name, credit_account="zz-source")
        )
    use_cases.post_entry(
        uow,
        make_entry(ledger, "eur", debit_account="acct-03", credit_account="zz-source", asset="EUR"),
    )
    seen: list[str] = []
    after = ""
    while True:
        page, as_of, more = use_cases.list_accounts(uow, ledger, after, 3)
        assert as_of == 8 and len(page) <= 3
        seen += [name for name, _ in page]
        if not more:
            break
        after = page[-1][0]
    assert seen == [*names, "zz-source"]
    page, _, _ = use_cases.list_accounts(uow, ledger, "acct-02", 1)
    assert [(b.asset, b.debits) for b in page[0][1]] == [("EUR", 100), ("USD", 100)]
    assert use_cases.list_accounts(uow, ledger, "zz-source", 3) == ([], 8, False)


def test_balances_as_of_a_number_are_exact(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    expected: dict[int, tuple[int, int]] = {0: (0, 0)}
    debits = credits = 0
    for n in range(1, 41):
        if n % 3 == 0:
            use_cases.post_entry(
                uow,
                make_entry(
                    ledger, f"k{n}", debit_account="bank", credit_account="wallet", amount=n
                ),
            )
            credits += n
        elif n % 3 == 1:
            use_cases.post_entry(
                uow,
                make_entry(
                    ledger, f"k{n}", debit_account="wallet", credit_account="shop", amount=n
                ),
            )
            debits += n
        else:
            use_cases.post_entry(
                uow, make_entry(ledger, f"k{n}", debit_account="x", credit_account="y", amount=n)
            )
        expected[n] = (debits, credits)
    for n in range(1, 41):
        view = use_cases.get_account(uow, ledger, "wallet", n)
        assert view.as_of_sequence == n
        assert totals(uow, ledger, "wallet", n) == {"USD": expected[n]}
    assert totals(uow, ledger, "shop", 0) == {"USD": (0, expected[40][0])}
    with pytest.raises(PositionAhead):
        use_cases.get_account(uow, ledger, "wallet", 41)


def test_an_asset_first_posted_after_n_is_absent_as_of_n(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(uow, make_entry(ledger, "usd"))
    use_cases.post_entry(uow, make_entry(ledger, "eur", asset="EUR"))
    assert set(totals(uow, ledger, "cash", 1)) == {"USD"}
    assert set(totals(uow, ledger, "cash", 2)) == {"EUR", "USD"}


def test_every_post_of_a_group_reports_its_own_totals(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    outcomes = use_cases.post_group(
        uow, [make_entry(ledger, f"k{i}", debit_account="hot", amount=1) for i in range(50)]
    )
    for o in outcomes:
        assert isinstance(o, PostResult)
        hot = next(b for b in o.balances if b.account == "hot")
        assert hot.debits == o.entry.sequence


def test_the_posts_refused_are_those_that_cross_in_order_across_accounts(
    uow: Any, engine: Engine, ledger: str
) -> None:
    """Two limited accounts: the first post crosses z's limit, the second
    would cross a's only if the first had been written. Taken in order,
    only the first fails, whichever account the database names first."""
    use_cases.initialize_counter(uow, ledger)
    use_cases.set_account_limits(uow, ledger, "a", "USD", Limits(max_net_credit=10))
    use_cases.set_account_limits(uow, ledger, "z", "USD", Limits(max_net_debit=0))
    first = make_entry(ledger, "first", debit_account="z", credit_account="a", amount=5)
    second = make_entry(ledger, "second", debit_account="m", credit_account="a", amount=6)
    with pytest.raises(BalanceLimitExceeded) as refused:
        use_cases.post_atomic(uow, [first, second])
    assert refused.value.index == 0 and refused.value.metadata["account"] == "z"
    for look_up_first in (False, True):
        outcomes = use_cases.post_group(
            uow,
            [
                make_entry(
                    ledger, f"{look_up_first}-1", debit_account="z", credit_account="a", amount=5
                ),
                make_entry(
                    ledger,
                    f"{look_up_first}-2",
                    debit_account="m",
                    credit_account="a",
                    amount=6 - 2 * look_up_first,
                ),
            ],
            look_up_first=look_up_first,
        )
        assert isinstance(outcomes[0], BalanceLimitExceeded)
        assert outcomes[0].metadata["account"] == "z"
        assert isinstance(outcomes[1], PostResult), outcomes[1]
    assert sequences(engine, ledger) == [1, 2]
    assert totals(uow, ledger, "a") == {"USD": (0, 10)}


def test_replays_of_a_batch_report_the_totals_of_their_own_entries(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    batch = [make_entry(ledger, f"k{i}", debit_account="hot", amount=1) for i in range(3)]
    first = use_cases.post_atomic(uow, batch)
    use_cases.post_entry(uow, make_entry(ledger, "later", debit_account="hot", amount=1))
    again = use_cases.post_atomic(uow, batch)
    assert [r.replayed for r in again] == [True, True, True]
    assert [r.balances for r in again] == [r.balances for r in first]
    assert [next(b.debits for b in r.balances if b.account == "hot") for r in again] == [1, 2, 3]
