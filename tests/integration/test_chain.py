"""The hash chain on real Postgres and SQLite: written in number order by
every write path, recomputable from the rows, filled in by the migration for
older entries, and checked by `verify`, which names each kind of damage."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2
from ledger_client import integrity
from sqlalchemy.engine import Engine

from ledger_service.domain.entries import PostResult
from ledger_service.integrity.verify import run, verify
from ledger_service.service import use_cases
from ledger_service.storage import migrate
from ledger_service.storage.numbering import as_utc
from ledger_service.storage.schema import account_history, account_totals, counters, entries
from ledger_service.storage.uow import create_engine

from ..conftest import throwaway_pg_database
from ..vectors import VECTORS, entry_of
from .helpers import make_entry, run_concurrently

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _rows(engine: Engine, ledger: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(entries).where(entries.c.ledger == ledger).order_by(entries.c.sequence)
            )
        )


def _recomputed(row: Any, previous: bytes) -> bytes:
    micros = (as_utc(row.created_at) - _EPOCH) // timedelta(microseconds=1)
    body = integrity.entry_body(
        row.ledger,
        row.idempotency_key,
        [(row.debit_account, row.credit_account, row.amount, row.asset)],
        row.entry_type,
        row.description,
        dict(row.metadata),
        row.posted_by,
    )
    return integrity.chain_hash(previous, row.sequence, micros, body)


def _problems(engine: Engine, ledger: str, **kwargs: Any) -> list[str]:
    return [p.what for p in verify(engine, [ledger], **kwargs)]


def test_every_write_path_chains_in_number_order_under_concurrency(
    uow: Any, engine: Engine, ledger: str
) -> None:
    use_cases.initialize_counter(uow, ledger)

    def post(i: int) -> None:
        if i % 3 == 0:  # a batch
            use_cases.post_atomic(
                uow,
                [make_entry(ledger, f"b{i}-{j}", amount=j + 1, posted_by="p") for j in range(5)],
            )
        elif i % 3 == 1:  # a group of independent posts
            use_cases.post_group(
                uow, [make_entry(ledger, f"g{i}-{j}", metadata={"j": str(j)}) for j in range(3)]
            )
        else:
            use_cases.post_entry(uow, make_entry(ledger, f"e{i}", description="é"))

    assert not [r for r in run_concurrently(12, post) if isinstance(r, Exception)]
    rows = _rows(engine, ledger)
    assert [r.sequence for r in rows] == list(range(1, 4 * 5 + 4 * 3 + 4 + 1))
    previous = integrity.GENESIS
    for row in rows:
        assert row.hash == _recomputed(row, previous), row.sequence
        # What a stream serves carries the same hash (the stored encoding).
        assert ledger_pb2.Entry.FromString(row.wire).hash == row.hash
        previous = row.hash
    with engine.connect() as conn:
        head = conn.execute(sa.select(counters.c.head_hash).where(counters.c.ledger == ledger))
        assert head.scalar_one() == previous
    assert _problems(engine, ledger) == []


def test_a_post_returns_its_hash_and_a_replay_the_original(uow: Any, ledger: str) -> None:
    use_cases.initialize_counter(uow, ledger)
    first = use_cases.post_entry(uow, make_entry(ledger, "k")).entry
    assert len(first.hash) == 32
    replay = use_cases.post_entry(uow, make_entry(ledger, "k"))
    assert replay.replayed and replay.entry.hash == first.hash
    assert use_cases.get_ledger(uow, ledger).head_hash == first.hash


# -- verify names each kind of damage made behind the service's back -----


@pytest.fixture
def books(uow: Any, engine: Engine, ledger: str) -> str:
    use_cases.initialize_counter(uow, ledger)
    for i in range(1, 11):
        use_cases.post_entry(
            uow,
            make_entry(ledger, f"k{i}", amount=i, debit_account=f"a{i % 3}", credit_account="z"),
        )
    assert _problems(engine, ledger) == []
    return ledger


def _execute(engine: Engine, statement: Any) -> None:
    with engine.begin() as conn:
        conn.execute(statement)


def _entry(ledger: str, sequence: int) -> Any:
    return sa.and_(entries.c.ledger == ledger, entries.c.sequence == sequence)


def test_verify_names_an_edited_amount(engine: Engine, books: str) -> None:
    _execute(engine, sa.update(entries).where(_entry(books, 4)).values(amount=400))
    # The totals no longer add up either, nor the history from entry 4 on:
    # all are named, the history a few rows per account, then a count.
    assert _problems(engine, books) == [
        "entry 4: hash mismatch",
        "account a1 USD: debits 22 != 418 summed from entries",
        "account z USD: credits 55 != 451 summed from entries",
        "account a1 USD: history at entry 4: debits 5 != 401 summed from entries",
        "account a1 USD: history at entry 7: debits 12 != 408 summed from entries",
        "account a1 USD: history at entry 10: debits 22 != 418 summed from entries",
        "account z USD: history at entry 4: credits 10 != 406 summed from entries",
        "account z USD: history at entry 5: credits 15 != 411 summed from entries",
        "account z USD: history at entry 6: credits 21 != 417 summed from entries",
        "account z USD: history wrong at 4 more entries",
    ]


def test_verify_names_deleted_entries(engine: Engine, books: str) -> None:
    _execute(
        engine,
        sa.delete(entries).where(entries.c.ledger == books, entries.c.sequence.in_([5, 6, 10])),
    )
    assert _problems(engine, books) == [
        "entries 5-6 missing",
        "entry 10 missing",
        # Entry i debits a<i % 3> and credits z with i.
        "account a0 USD: debits 18 != 12 summed from entries",
        "account a1 USD: debits 22 != 12 summed from entries",
        "account a2 USD: debits 15 != 10 summed from entries",
        "account z USD: credits 55 != 34 summed from entries",
        # The history rows of the deleted entries have no entry now, and the
        # accounts' later rows no longer add up.
        "account a0 USD: history row at entry 6 without an entry",
        "account a0 USD: history at entry 9: debits 18 != 12 summed from entries",
        "account a1 USD: history row at entry 10 without an entry",
        "account a2 USD: history row at entry 5 without an entry",
        "account a2 USD: history at entry 8: debits 15 != 10 summed from entries",
        "account z USD: history row at entry 5 without an entry",
        "account z USD: history row at entry 6 without an entry",
        "account z USD: history at entry 7: credits 28 != 17 summed from entries",
        "account z USD: history wrong at 3 more entries",
    ]


def test_verify_names_doctored_totals(engine: Engine, books: str) -> None:
    _execute(
        engine,
        sa.update(account_totals)
        .where(account_totals.c.ledger == books, account_totals.c.account == "a2")
        .values(debits=1),
    )
    assert _problems(engine, books) == ["account a2 USD: debits 1 != 15 summed from entries"]


def test_verify_names_two_rows_whose_contents_were_swapped(engine: Engine, books: str) -> None:
    # The entries trade places; their numbers and the chain's hashes stay.
    # (Swapping the hashes too would also break the links of entries 3 and 8.)
    columns = [c for c in entries.c if c.name not in ("ledger", "sequence", "hash")]
    with engine.begin() as conn:
        two, seven = (
            conn.execute(sa.select(*columns).where(_entry(books, s))).one() for s in (2, 7)
        )
        conn.execute(sa.update(entries).where(_entry(books, 2)).values(idempotency_key="tmp"))
        conn.execute(sa.update(entries).where(_entry(books, 7)).values(**two._asdict()))
        conn.execute(sa.update(entries).where(_entry(books, 2)).values(**seven._asdict()))
    # Totals still add up (same entries, other places); the chain tells, and
    # the history: entries 2 and 7 now touch each other's accounts.
    assert _problems(engine, books) == [
        "entry 2: hash mismatch",
        "entry 7: hash mismatch",
        "account a1 USD: no history at entry 2, entries sum to debits 8, credits 0",
        "account a1 USD: history at entry 4: debits 5 != 12 summed from entries",
        "account a1 USD: history row at entry 7 without an entry",
        "account a2 USD: history row at entry 2 without an entry",
        "account a2 USD: history at entry 5: debits 7 != 5 summed from entries",
        "account a2 USD: no history at entry 7, entries sum to debits 7, credits 0",
        "account z USD: history at entry 2: credits 3 != 8 summed from entries",
        "account z USD: history at entry 3: credits 6 != 11 summed from entries",
        "account z USD: history at entry 4: credits 10 != 15 summed from entries",
        "account z USD: history wrong at 2 more entries",
    ]


def test_verify_names_a_counter_ahead_of_its_entries_and_a_wrong_head(
    engine: Engine, books: str
) -> None:
    _execute(
        engine,
        sa.update(counters).where(counters.c.ledger == books).values(value=13),
    )
    assert _problems(engine, books) == ["entries 11-13 missing"]
    _execute(
        engine,
        sa.update(counters).where(counters.c.ledger == books).values(value=10, head_hash=bytes(32)),
    )
    assert _problems(engine, books) == ["head hash differs from entry 10's hash"]


def test_verify_from_an_entry_checks_the_chain_from_there(engine: Engine, books: str) -> None:
    _execute(engine, sa.update(entries).where(_entry(books, 3)).values(description="edited"))
    assert _problems(engine, books, from_sequence=4) == []
    assert _problems(engine, books, from_sequence=3) == ["entry 3: hash mismatch"]


# -- the encoding: the shared vectors, the SQL implementations, the migration --


def test_the_python_encoding_matches_the_vectors_and_its_own_definition() -> None:
    previous = bytes.fromhex(VECTORS["genesis"])
    for vector in VECTORS["entries"]:
        message = entry_of(vector)
        canonical = integrity.message_canonical(message)
        assert canonical.hex() == vector["canonical"]
        assert integrity.chain_hash(
            previous,
            message.sequence,
            int(vector["created_at_micros"]),
            canonical[17:],
            integrity.format_version(message.reverses_sequence),
        ) == bytes.fromhex(vector["hash"])
        previous = bytes.fromhex(vector["hash"])

    # The first vector, byte for byte as docs/integrity.md lays it out.
    def text(s: str) -> bytes:
        return len(s.encode()).to_bytes(4, "big") + s.encode()

    expected = (
        b"\x01"
        + (1).to_bytes(8, "big")
        + (1764633600000000).to_bytes(8, "big")
        + text("books")
        + text("order-1001")
        + (1).to_bytes(4, "big")
        + text("cash")
        + text("sales")
        + (1250).to_bytes(8, "big")
        + text("USD")
        + text("sale")
        + text("")
        + (1).to_bytes(4, "big")
        + text("order")
        + text("1001")
        + text("")
    )
    assert VECTORS["entries"][0]["canonical"] == expected.hex()


def _store_vectors(engine: Engine) -> None:
    """The vectors' entries as rows, with their hashes, the totals and the
    history that match them (as the write statements store them: a
    multi-posting entry's postings as JSON, its single-pair columns empty)."""
    totals: dict[tuple[str, str], list[int]] = {}
    with engine.begin() as conn:
        for v in VECTORS["entries"]:
            postings = [
                [p["debit_account"], p["credit_account"], int(p["amount"]), p["asset"]]
                for p in v["postings"]
            ]
            conn.execute(
                sa.insert(entries).values(
                    ledger=v["ledger"],
                    sequence=v["sequence"],
                    idempotency_key=v["idempotency_key"],
                    debit_account=v["debit_account"],
                    credit_account=v["credit_account"],
                    amount=int(v["amount"]),
                    asset=v["asset"],
                    entry_type=v["entry_type"],
                    description=v["description"],
                    metadata=v["metadata"],
                    created_at=_EPOCH + timedelta(microseconds=int(v["created_at_micros"])),
                    posted_by=v["posted_by"],
                    hash=bytes.fromhex(v["hash"]),
                    postings=postings if v["debit_account"] == "" else sa.null(),
                    reverses_sequence=int(v["reverses_sequence"]) or None,
                )
            )
            touched: dict[tuple[str, str], None] = {}
            for debit, credit, amount, asset in postings:
                totals.setdefault((debit, asset), [0, 0])[0] += amount
                totals.setdefault((credit, asset), [0, 0])[1] += amount
                touched |= {(debit, asset): None, (credit, asset): None}
            for account, asset in touched:
                debits, credits = totals[(account, asset)]
                conn.execute(
                    sa.insert(account_history).values(
                        ledger="books",
                        account=account,
                        asset=asset,
                        sequence=v["sequence"],
                        debits=debits,
                        credits=credits,
                    )
                )
        for (account, asset), (debits, credits) in totals.items():
            conn.execute(
                sa.insert(account_totals).values(
                    ledger="books", account=account, asset=asset, debits=debits, credits=credits
                )
            )
        conn.execute(
            sa.insert(counters).values(
                ledger="books",
                value=len(VECTORS["entries"]),
                created_at=datetime.now(UTC),
                head_hash=bytes.fromhex(VECTORS["entries"][-1]["hash"]),
            )
        )


@pytest.fixture
def fresh_db(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty migrated database of the store under test (the vectors use
    the ledger name "books", so not the shared one)."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        engine = create_engine(url, pool_size=2)
        migrate.upgrade(engine)
        yield engine
        engine.dispose()
        return
    with throwaway_pg_database("chain") as url:
        engine = create_engine(url, pool_size=2)
        yield engine
        engine.dispose()


def test_verify_recomputes_the_vectors_and_catches_a_changed_metadata_value(
    fresh_db: Engine,
) -> None:
    # On Postgres verify builds the canonical bytes in SQL: a second
    # implementation, held to the same vectors (both versions, one and
    # several postings, an int64 maximum amount inside the postings JSON).
    _store_vectors(fresh_db)
    assert _problems(fresh_db, "books") == []
    assert [v["sequence"] for v in VECTORS["entries"]] == [1, 2, 3, 4, 5]
    assert VECTORS["entries"][4]["reverses_sequence"] == "4"
    with fresh_db.begin() as conn:
        conn.execute(
            sa.update(entries)
            .where(_entry("books", 2))
            .values(metadata={**VECTORS["entries"][1]["metadata"], "z": "changed"})
        )
    assert _problems(fresh_db, "books") == ["entry 2: hash mismatch"]


def test_the_write_statements_sql_chain_matches_the_vectors(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=1)
    previous = bytes.fromhex(VECTORS["genesis"])
    with engine.connect() as conn:
        for vector in VECTORS["entries"]:
            canonical = integrity.message_canonical(entry_of(vector))
            (hashes,) = conn.exec_driver_sql(
                "SELECT ledger_chain(%(p)s, %(s)s, %(t)s, ARRAY[%(b)s], %(v)s)",
                {
                    "p": previous,
                    "s": vector["sequence"],
                    "t": int(vector["created_at_micros"]),
                    "b": canonical[17:],
                    "v": canonical[:1],  # the format version byte
                },
            ).one()
            assert [bytes(h) for h in hashes] == [bytes.fromhex(vector["hash"])]
            previous = bytes(hashes[0])
    engine.dispose()


def test_the_migration_chains_the_entries_written_before_it(db_url: str, tmp_path: Path) -> None:
    ledger = f"old-{uuid.uuid4().hex[:8]}"

    def at_0002(url: str) -> None:
        engine = create_engine(url, pool_size=2)
        migrate.upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_counters (ledger, value, created_at, initialized_by)"
                    " VALUES (:l, 3, :t, '')"
                ),
                {"l": ledger, "t": datetime.now(UTC)},
            )
            for i in (1, 2, 3):
                message = ledger_pb2.Entry(ledger=ledger, idempotency_key=f"k{i}", amount=i)
                conn.execute(
                    sa.text(
                        "INSERT INTO ledger_entries (ledger, sequence, idempotency_key,"
                        " debit_account, credit_account, amount, asset, entry_type,"
                        " description, metadata, created_at, wire, posted_by) VALUES"
                        " (:l, :s, :k, 'cash', 'sales', :s, 'USD', '', '', :m, :t, :w, '')"
                    ).bindparams(sa.bindparam("m", type_=sa.JSON)),
                    {
                        "l": ledger,
                        "s": i,
                        "k": f"k{i}",
                        "m": {"n": str(i)},
                        "t": datetime(2026, 1, 1, 0, 0, i, 123456, UTC),
                        # Entry 3 as a restored row: no stored encoding.
                        "w": message.SerializeToString() if i < 3 else None,
                    },
                )
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_account_totals VALUES"
                    " (:l, 'cash', 'USD', 6, 0), (:l, 'sales', 'USD', 0, 6)"
                ),
                {"l": ledger},
            )
        migrate.upgrade(engine)
        rows = _rows(engine, ledger)
        previous = integrity.GENESIS
        for row in rows:
            assert row.hash == _recomputed(row, previous)
            previous = row.hash
        assert ledger_pb2.Entry.FromString(rows[0].wire).hash == rows[0].hash
        assert rows[2].wire is None
        assert _problems(engine, ledger) == []
        engine.dispose()

    if db_url.startswith("sqlite"):
        at_0002(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    else:
        with throwaway_pg_database("old", migrate_it=False) as url:
            at_0002(url)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_command_prints_problems_and_shows_progress_on_a_terminal(
    engine: Engine, books: str
) -> None:
    out, err = io.StringIO(), _Terminal()
    assert run(engine, [books], out=out, err=err) == 0
    assert out.getvalue() == ""
    assert f"\r{books}: 10 of 10 (100%) entries" in err.getvalue()
    assert err.getvalue().endswith("verify: the books hold\n")
    _execute(engine, sa.update(entries).where(_entry(books, 5)).values(entry_type="edited"))
    out, quiet = io.StringIO(), io.StringIO()  # not a terminal: no progress
    assert run(engine, [books], out=out, err=quiet) == 1
    assert out.getvalue() == f"{books}: entry 5: hash mismatch\n"
    assert quiet.getvalue() == "verify: 1 problem(s)\n"


def test_verify_while_entries_are_posted_finds_nothing(
    uow: Any, engine: Engine, ledger: str
) -> None:
    """Entries committed while verify runs are above the counter it read:
    they are not "beyond the counter", and the chain up to it holds."""
    use_cases.initialize_counter(uow, ledger)
    for i in range(20):
        use_cases.post_entry(uow, make_entry(ledger, f"before-{i}"))
    stop = threading.Event()
    posted: list[PostResult] = []

    def post() -> None:
        while not stop.is_set() and len(posted) < 5000:
            posted.append(use_cases.post_entry(uow, make_entry(ledger, f"during-{len(posted)}")))

    writer = threading.Thread(target=post)
    writer.start()
    try:
        runs = [_problems(engine, ledger) for _ in range(8)]
    finally:
        stop.set()
        writer.join(60)
    assert posted, "the writer posted nothing while verify ran"
    assert runs == [[]] * 8
    assert _problems(engine, ledger) == []


def test_a_write_without_a_hash_is_refused_on_postgres(pg_url: str, ledger: str) -> None:
    """What a server older than the chain would write after the migration."""
    engine = create_engine(pg_url, pool_size=1)
    try:
        refused = pytest.raises(sa.exc.IntegrityError, match="ck_ledger_entries_hash_present")
        with refused, engine.begin() as conn:
            conn.execute(
                sa.insert(entries).values(
                    ledger=ledger,
                    sequence=1,
                    idempotency_key="old-server",
                    debit_account="a",
                    credit_account="b",
                    amount=1,
                    asset="USD",
                    entry_type="",
                    description="",
                    metadata={},
                    created_at=datetime.now(UTC),
                )
            )
    finally:
        engine.dispose()
