"""`verify` on a ledger with multi-posting entries and reversals, on real
Postgres and SQLite: it says nothing about the books the service wrote, and
names each kind of damage made behind its back to what migration 0004 added
(the postings JSON, reverses_sequence, the account history)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ledger_service.domain.chain import GENESIS
from ledger_service.domain.entries import NewEntry, Posting
from ledger_service.integrity import verify as verify_module
from ledger_service.integrity.verify import HISTORY_SHOWN, verify
from ledger_service.service import use_cases
from ledger_service.storage.schema import account_history, counters, entries
from ledger_service.storage.uow import SqlUnitOfWork, create_engine

from .helpers import make_entry


def _problems(engine: Engine, ledger: str, **kwargs: Any) -> list[str]:
    return [p.what for p in verify(engine, [ledger], **kwargs)]


def _multi(ledger: str, key: str, *postings: Posting, **overrides: Any) -> NewEntry:
    """A multi-posting entry: its single-pair fields empty."""
    return make_entry(
        ledger,
        key,
        debit_account="",
        credit_account="",
        amount=0,
        asset="",
        postings=postings,
        **overrides,
    )


def _post_books(uow: Any, ledger: str) -> None:
    """Seven entries (amounts in each account's totals, USD unless said):
    1 one posting; 2 three postings in two assets, cash debited twice;
    3-4 one batch, 4 moving `fees` both ways; 5 reverses 2 (several
    postings), 6 reverses 1 (one posting); 7 one posting."""
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_entry(
        uow, make_entry(ledger, "e1", debit_account="cash", credit_account="sales")
    )
    use_cases.post_entry(
        uow,
        _multi(
            ledger,
            "e2",
            Posting("cash", "sales", 1000, "USD"),
            Posting("cash", "tax", 200, "USD"),
            Posting("fx", "cash", 50, "EUR"),
            entry_type="sale",
            metadata={"order": "2", "by": "x"},
        ),
    )
    use_cases.post_atomic(
        uow,
        [
            make_entry(ledger, "e3", debit_account="bank", credit_account="cash", amount=300),
            _multi(
                ledger,
                "e4",
                Posting("cash", "fees", 5, "USD"),
                Posting("fees", "bank", 5, "USD"),
            ),
        ],
    )
    assert use_cases.reverse_entry(uow, ledger, 2, "r2", "refund").entry.sequence == 5
    assert use_cases.reverse_entry(uow, ledger, 1, "r1", "").entry.sequence == 6
    use_cases.post_entry(uow, make_entry(ledger, "e7", amount=7, posted_by="ops"))


@pytest.fixture
def books(uow: Any, engine: Engine, ledger: str) -> str:
    _post_books(uow, ledger)
    assert _problems(engine, ledger) == []
    return ledger


def _entry(ledger: str, sequence: int) -> Any:
    return sa.and_(entries.c.ledger == ledger, entries.c.sequence == sequence)


def _history_row(ledger: str, account: str, asset: str, sequence: int) -> Any:
    h = account_history.c
    return sa.and_(
        h.ledger == ledger, h.account == account, h.asset == asset, h.sequence == sequence
    )


def _execute(engine: Engine, statement: Any) -> None:
    with engine.begin() as conn:
        conn.execute(statement)


def _edit_postings(
    engine: Engine, ledger: str, sequence: int, edit: Callable[[list[Any]], None]
) -> None:
    """Edits an entry's postings JSON in place, as a hand-written UPDATE would."""
    with engine.begin() as conn:
        postings = conn.execute(sa.select(entries.c.postings).where(_entry(ledger, sequence)))
        value = postings.scalar_one()
        edit(value)
        conn.execute(sa.update(entries).where(_entry(ledger, sequence)).values(postings=value))


def test_the_books_as_written_hold_and_are_stored_as_the_migration_says(
    engine: Engine, books: str
) -> None:
    with engine.connect() as conn:
        rows = {
            r.sequence: r for r in conn.execute(sa.select(entries).where(entries.c.ledger == books))
        }
        history = conn.execute(
            sa.select(account_history.c.account, account_history.c.asset)
            .where(account_history.c.ledger == books, account_history.c.sequence == 4)
            .order_by(account_history.c.account)
        ).all()
    assert rows[2].postings == [
        ["cash", "sales", 1000, "USD"],
        ["cash", "tax", 200, "USD"],
        ["fx", "cash", 50, "EUR"],
    ]
    assert (rows[2].debit_account, rows[2].amount, rows[2].reverses_sequence) == ("", 0, None)
    assert rows[1].postings is None and rows[5].reverses_sequence == 2
    assert (rows[6].debit_account, rows[6].postings, rows[6].reverses_sequence) == (
        "sales",
        None,
        1,
    )
    # Entry 4's two postings on fees are one history row.
    assert [tuple(r) for r in history] == [("bank", "USD"), ("cash", "USD"), ("fees", "USD")]


def test_verify_names_an_edited_posting_amount(engine: Engine, books: str) -> None:
    def edit(postings: list[Any]) -> None:
        postings[1][2] = 250  # cash <- tax: 200 -> 250

    _edit_postings(engine, books, 2, edit)
    assert _problems(engine, books) == [
        "entry 2: hash mismatch",
        "account cash USD: debits 1312 != 1362 summed from entries",
        "account tax USD: credits 200 != 250 summed from entries",
        # Every later history row of cash USD differs: a few, then a count.
        "account cash USD: history at entry 2: debits 1300 != 1350 summed from entries",
        "account cash USD: history at entry 3: debits 1300 != 1350 summed from entries",
        "account cash USD: history at entry 4: debits 1305 != 1355 summed from entries",
        "account cash USD: history wrong at 3 more entries",
        "account tax USD: history at entry 2: credits 200 != 250 summed from entries",
        "account tax USD: history at entry 5: credits 200 != 250 summed from entries",
    ]


def test_verify_names_an_edited_or_cleared_reverses_sequence(engine: Engine, books: str) -> None:
    _execute(engine, sa.update(entries).where(_entry(books, 5)).values(reverses_sequence=3))
    assert _problems(engine, books) == ["entry 5: hash mismatch"]
    _execute(engine, sa.update(entries).where(_entry(books, 5)).values(reverses_sequence=2))
    assert _problems(engine, books) == []
    # Without it, entry 6 would be a version 1 entry: not what was chained.
    _execute(engine, sa.update(entries).where(_entry(books, 6)).values(reverses_sequence=None))
    assert _problems(engine, books) == ["entry 6: hash mismatch"]


def test_verify_names_a_doctored_history_row(engine: Engine, books: str) -> None:
    _execute(
        engine,
        sa.update(account_history)
        .where(_history_row(books, "cash", "USD", 3))
        .values(debits=account_history.c.debits + 1),
    )
    assert _problems(engine, books) == [
        "account cash USD: history at entry 3: debits 1301 != 1300 summed from entries"
    ]


def test_verify_names_a_deleted_history_row(engine: Engine, books: str) -> None:
    _execute(engine, sa.delete(account_history).where(_history_row(books, "fees", "USD", 4)))
    assert _problems(engine, books) == [
        "account fees USD: no history at entry 4, entries sum to debits 5, credits 5"
    ]


def test_verify_names_a_history_row_without_an_entry(engine: Engine, books: str) -> None:
    # Entry 2 exists but does not touch bank.
    _execute(
        engine,
        sa.insert(account_history).values(
            ledger=books, account="bank", asset="USD", sequence=2, debits=0, credits=0
        ),
    )
    assert _problems(engine, books) == ["account bank USD: history row at entry 2 without an entry"]


def test_verify_names_single_pair_columns_filled_in_on_a_multi_posting_entry(
    engine: Engine, books: str
) -> None:
    # The hash covers a multi-posting entry's postings, not those columns:
    # they must be empty, as written.
    _execute(
        engine,
        sa.update(entries)
        .where(_entry(books, 4))
        .values(debit_account="cash", credit_account="fees", amount=5, asset="USD"),
    )
    assert _problems(engine, books) == ["entry 4: hash mismatch"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p[0].__setitem__(2, "5"),  # the amount as a string
        lambda p: p[0].__setitem__(2, 5.5),  # not a whole number
        lambda p: p[0].__setitem__(2, 2**63),  # beyond int64
        lambda p: p[0].pop(),  # three fields
        lambda p: p.__setitem__(1, "fees"),  # not a posting at all
    ],
    ids=["string-amount", "fraction", "beyond-int64", "three-fields", "not-a-list"],
)
def test_verify_names_a_malformed_posting_without_failing(
    engine: Engine, books: str, damage: Callable[[list[Any]], None]
) -> None:
    _edit_postings(engine, books, 4, damage)
    problems = _problems(engine, books)
    assert problems[0] == "entry 4: hash mismatch"
    assert all(not p.startswith("entry") for p in problems[1:]), problems


def test_the_history_lines_per_account_are_bounded(uow: Any, engine: Engine, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    use_cases.post_atomic(
        uow,
        [
            _multi(
                ledger, f"k{i}", Posting("cash", "sales", 1, "USD"), Posting("cash", "x", i, "EUR")
            )
            for i in range(1, 61)
        ],
    )
    assert _problems(engine, ledger) == []

    def edit(postings: list[Any]) -> None:
        postings[0][2] = 2

    _edit_postings(engine, ledger, 1, edit)  # every later cash and sales USD row differs
    history = [p for p in _problems(engine, ledger) if "history" in p]
    assert history == [
        *(
            f"account cash USD: history at entry {s}: debits {s} != {s + 1} summed from entries"
            for s in range(1, HISTORY_SHOWN + 1)
        ),
        f"account cash USD: history wrong at {60 - HISTORY_SHOWN} more entries",
        *(
            f"account sales USD: history at entry {s}: credits {s} != {s + 1} summed from entries"
            for s in range(1, HISTORY_SHOWN + 1)
        ),
        f"account sales USD: history wrong at {60 - HISTORY_SHOWN} more entries",
    ]


def test_verify_from_an_entry_skips_the_history_as_the_totals(engine: Engine, books: str) -> None:
    _execute(engine, sa.delete(account_history).where(_history_row(books, "fees", "USD", 4)))
    assert _problems(engine, books, from_sequence=2) == []
    assert _problems(engine, books, from_sequence=1) != []


# -- Postgres: the ranges and the sums at once; both page checkers agree ----


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, pool_size=8)
    yield engine
    engine.dispose()


def test_the_history_runs_beside_the_ranges_and_the_totals(
    pg_engine: Engine, ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _post_books(functools.partial(SqlUnitOfWork, pg_engine), ledger)
    _execute(pg_engine, sa.delete(account_history).where(_history_row(ledger, "fees", "USD", 4)))
    _execute(pg_engine, sa.update(entries).where(_entry(ledger, 5)).values(reverses_sequence=3))
    # Small pages: the seven entries are checked in three ranges at once,
    # the totals and the history each on a connection of its own beside them.
    monkeypatch.setattr(verify_module, "PAGE", 2)
    assert [p.what for p in verify(pg_engine, [ledger], workers=3)] == [
        "entry 5: hash mismatch",
        "account fees USD: no history at entry 4, entries sum to debits 5, credits 5",
    ]


@pytest.mark.parametrize(
    ("sequence", "damage"),
    [
        (0, {}),
        (5, {"reverses_sequence": 3}),
        (5, {"reverses_sequence": None}),
        (6, {"reverses_sequence": 0}),  # 0: no reversal, as a reader sees it
        (3, {"reverses_sequence": 0}),  # and so the same as NULL: it holds
        (7, {"reverses_sequence": 4}),
        (2, {"postings": [["cash", "sales", 1000, "USD"], ["fx", "cash", 50, "EUR"]]}),
        (2, {"postings": [["cash", "sales", 1000, "USD"], ["cash", "tax", "200", "USD"]]}),
        (2, {"postings": [["cash", "sales", 1000.0, "USD"]]}),
        (2, {"postings": []}),
        (2, {"postings": {"cash": "sales"}}),
        (2, {"debit_account": "cash"}),
        (5, {"metadata": {"order": "3", "by": "x"}}),
        (1, {"postings": [["cash", "sales", 100, "USD"]]}),  # the same, as a list: it holds
    ],
    ids=lambda v: str(v) if isinstance(v, int) else "-".join(map(str, v)) or "none",
)
def test_the_sql_and_the_python_checks_agree_on_postgres(
    pg_engine: Engine, ledger: str, sequence: int, damage: dict[str, Any]
) -> None:
    """The Python page checker (SQLite's, or a non-UTF-8 Postgres's) and the
    SQL one, on the same rows."""
    _post_books(functools.partial(SqlUnitOfWork, pg_engine), ledger)
    if damage:
        if "postings" in damage and sequence == 1:
            damage = {**damage, "debit_account": "", "credit_account": "", "amount": 0, "asset": ""}
        _execute(pg_engine, sa.update(entries).where(_entry(ledger, sequence)).values(damage))
    with pg_engine.connect() as conn:
        head = conn.execute(sa.select(counters.c.value).where(counters.c.ledger == ledger))
        through = head.scalar_one()

    def checked(pages: verify_module.PageChecker) -> list[str]:
        with pg_engine.connect() as conn:
            return [
                p for problems, _, _ in pages(conn, ledger, 0, GENESIS, through) for p in problems
            ]

    in_sql = checked(verify_module._pages_pg)
    assert in_sql == checked(verify_module._pages_python)
    holds = sequence in (0, 1, 3)
    assert in_sql == ([] if holds else [f"entry {sequence}: hash mismatch"])


_HISTORY_DAMAGE: dict[str, Callable[[str], Any]] = {
    "doctored": lambda ledger: (
        sa.update(account_history).where(_history_row(ledger, "tax", "USD", 5)).values(debits=199)
    ),
    "deleted": lambda ledger: sa.delete(account_history).where(
        _history_row(ledger, "fx", "EUR", 5)
    ),
    "without-an-entry": lambda ledger: sa.insert(account_history).values(
        ledger=ledger, account="fx", asset="EUR", sequence=3, debits=50, credits=0
    ),
    "moved": lambda ledger: (
        sa.update(account_history).where(_history_row(ledger, "sales", "USD", 6)).values(sequence=7)
    ),
    "beyond-int64-arithmetic": lambda ledger: (
        sa.update(account_history)
        .where(_history_row(ledger, "cash", "USD", 2))
        .values(debits=-(2**63))
    ),
    "entry-deleted": lambda ledger: sa.delete(entries).where(_entry(ledger, 3)),
    "posting-account": lambda ledger: (
        sa.update(entries)
        .where(_entry(ledger, 4))
        .values(postings=[["cash", "fees", 5, "USD"], ["fees", "cash", 5, "USD"]])
    ),
    "single-pair-account": lambda ledger: (
        sa.update(entries).where(_entry(ledger, 7)).values(credit_account="sales")
    ),
}


@pytest.mark.parametrize("damage", [None, *_HISTORY_DAMAGE], ids=str)
def test_the_history_screen_on_postgres_holds_only_when_the_full_check_finds_nothing(
    pg_engine: Engine, ledger: str, damage: str | None
) -> None:
    _post_books(functools.partial(SqlUnitOfWork, pg_engine), ledger)
    if damage is not None:
        _execute(pg_engine, _HISTORY_DAMAGE[damage](ledger))
    with pg_engine.connect() as conn:
        holds = verify_module._history_holds_pg(conn, ledger)
        found = list(verify_module._history_problems(conn, ledger))
        assert list(verify_module._history(conn, ledger)) == found
    assert (holds, bool(found)) == ((True, False) if damage is None else (False, True)), found


def test_an_entry_debiting_the_account_it_credits_is_left_to_the_full_check(
    engine: Engine, books: str
) -> None:
    # Entry 7 now debits and credits cash (and moves nothing on revenue): a
    # history made to match says nothing; the chain names the entry.
    with engine.begin() as conn:
        conn.execute(sa.update(entries).where(_entry(books, 7)).values(credit_account="cash"))
        conn.execute(sa.delete(account_history).where(_history_row(books, "revenue", "USD", 7)))
        conn.execute(
            sa.update(account_history)
            .where(_history_row(books, "cash", "USD", 7))
            .values(credits=account_history.c.credits + 7)
        )
    assert [p for p in _problems(engine, books) if "history" in p] == []
    assert _problems(engine, books)[0] == "entry 7: hash mismatch"
