"""Bench-only servers for the baselines, on the same gRPC path as the ledger:

- `plain`: gap-free, one transaction per request written the obvious way
  (baseline a): the key looked up, the counter bumped, the entry and the
  totals inserted, each its own statement, then the commit;
- `sequence`: PostEntry numbered by a Postgres SEQUENCE (not gap-free): same
  validation, idempotency lookup and account totals, no counter row;
- `noop`: PostEntry validated and answered without any database work (the
  gRPC ceiling).

`python -m bench.servers --mode sequence --database-url URL --listen ADDR`
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.api.convert import entry_to_proto, new_entry_from_request
from ledger_service.api.errors import map_errors
from ledger_service.bootstrap import build_servicer, in_thread_pool
from ledger_service.config import Settings
from ledger_service.domain.entries import Entry, NewEntry, PostResult
from ledger_service.server import settle_startup_objects
from ledger_service.storage.repository import SqlLedgerRepository
from ledger_service.storage.uow import SqlUnitOfWork, create_engine
from ledger_service.streaming.watch import HeadWatcher

log = logging.getLogger("bench.servers")

SETUP_SQL = [
    "CREATE SEQUENCE IF NOT EXISTS bench_seq",
    "CREATE TABLE IF NOT EXISTS bench_seq_entries (LIKE ledger_entries INCLUDING ALL)",
]

_INSERT_WITH_SEQUENCE = sa.text(
    """
    INSERT INTO bench_seq_entries (
        ledger, sequence, idempotency_key, debit_account, credit_account, amount, asset,
        entry_type, description, metadata, created_at, hash)
    VALUES (:ledger, nextval('bench_seq'), :idempotency_key, :debit_account, :credit_account,
            :amount, :asset, :entry_type, :description, CAST(:metadata AS JSONB), clock_timestamp(),
            ''::BYTEA)
    RETURNING sequence, created_at
    """
)


_ADD_TOTALS = """
    INSERT INTO ledger_account_totals (ledger, account, asset, debits, credits)
    VALUES (:ledger, :debit_account, :asset, :amount, 0),
           (:ledger, :credit_account, :asset, 0, :amount)
    ON CONFLICT (ledger, account, asset) DO UPDATE
    SET debits = ledger_account_totals.debits + excluded.debits,
        credits = ledger_account_totals.credits + excluded.credits
"""


_PLAIN_BUMP = sa.text(
    "UPDATE ledger_counters SET value = value + 1 WHERE ledger = :ledger"
    " RETURNING value, clock_timestamp() AS created_at"
)
_PLAIN_INSERT = sa.text(
    """
    INSERT INTO ledger_entries (
        ledger, sequence, idempotency_key, debit_account, credit_account, amount, asset,
        entry_type, description, metadata, created_at, hash)
    VALUES (:ledger, :sequence, :idempotency_key, :debit_account, :credit_account,
            :amount, :asset, :entry_type, :description, CAST(:metadata AS JSONB), :created_at,
            ''::BYTEA)
    """
)


def _params(entry: NewEntry) -> dict[str, Any]:
    """An entry's columns as statement parameters (the baselines' SQL)."""
    return {
        "ledger": entry.ledger,
        "idempotency_key": entry.idempotency_key,
        "debit_account": entry.debit_account,
        "credit_account": entry.credit_account,
        "amount": entry.amount,
        "asset": entry.asset,
        "entry_type": entry.entry_type,
        "description": entry.description,
        "metadata": json.dumps(dict(entry.metadata)),
    }


def post_plain(engine: sa.Engine, entry: NewEntry) -> PostResult:
    # One transaction per request written the obvious way: look up the key,
    # take the next number, insert, add to the totals, commit. The counter
    # row stays locked from the bump through the inserts to the commit.
    with engine.begin() as conn:
        stored = SqlLedgerRepository(conn).find_by_keys(entry.ledger, [entry.idempotency_key])
        if entry.idempotency_key in stored:
            return PostResult(stored[entry.idempotency_key], replayed=True)
        row = conn.execute(_PLAIN_BUMP, {"ledger": entry.ledger}).one()
        params = {**_params(entry), "sequence": row.value, "created_at": row.created_at}
        conn.execute(_PLAIN_INSERT, params)
        conn.execute(sa.text(_ADD_TOTALS), params)
    return PostResult(Entry(row.value, row.created_at, entry), replayed=False)


def post_with_sequence(engine: sa.Engine, entry: NewEntry) -> Entry:
    # The same work as the ledger's write path (key lookup, totals, insert,
    # in one transaction), minus the counter row.
    with engine.begin() as conn:
        SqlLedgerRepository(conn).find_by_keys(entry.ledger, [entry.idempotency_key])
        params = _params(entry)
        conn.execute(sa.text(_ADD_TOTALS), params)
        row = conn.execute(_INSERT_WITH_SEQUENCE, params).one()
    return Entry(row.sequence, row.created_at, entry)


class BaselineServicer:
    """PostEntry by `mode`; every other call by the ledger's own servicer."""

    def __init__(self, mode: str, engine: sa.Engine, executor: ThreadPoolExecutor) -> None:
        self._run = in_thread_pool(executor)
        uow = functools.partial(SqlUnitOfWork, engine)
        self._ledger = build_servicer(
            Settings(group_commit=False), uow, self._run, None, HeadWatcher()
        )
        self._mode = mode
        self._bench_engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def PostEntry(
        self, request: ledger_pb2.PostEntryRequest, context: Any
    ) -> ledger_pb2.PostEntryResponse:
        entry = new_entry_from_request(request)
        if self._mode == "noop":
            stored = Entry(1, datetime.now(UTC), entry)
        elif self._mode == "plain":
            result = await self._run(post_plain, self._bench_engine, entry)
            return ledger_pb2.PostEntryResponse(
                entry=entry_to_proto(result.entry), replayed=result.replayed
            )
        else:
            stored = await self._run(post_with_sequence, self._bench_engine, entry)
        return ledger_pb2.PostEntryResponse(entry=entry_to_proto(stored))


async def serve(mode: str, database_url: str, listen: str, pool_size: int) -> None:
    engine = create_engine(database_url, pool_size=pool_size)
    with engine.begin() as conn:
        for statement in SETUP_SQL:
            conn.exec_driver_sql(statement)
    executor = ThreadPoolExecutor(pool_size)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        map_errors(
            cast(ledger_pb2_grpc.LedgerServiceServicer, BaselineServicer(mode, engine, executor))
        ),
        server,
    )
    port = server.add_insecure_port(listen)
    await server.start()
    settle_startup_objects()  # as the ledger server does
    log.info("ledger-service listening on %s:%d (bench %s)", listen.rsplit(":", 1)[0], port, mode)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["sequence", "noop", "plain"], required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--pool-size", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args.mode, args.database_url, args.listen, args.pool_size))


if __name__ == "__main__":
    main()
