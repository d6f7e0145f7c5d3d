"""The hash chain end to end: real server processes hand out hashes that the
Python client verifies while it streams (sync and asyncio, resumed or not),
GetLedger gives the head to anchor, and `ledger-service verify` run as a
process names damage made behind the service's back, one line each."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from ledger.v1 import ledger_pb2
from ledger_client import AsyncLedgerClient, LedgerClient, integrity

from ledger_service.storage.schema import account_totals, entries
from ledger_service.testing import ServerProcess

from .conftest import FAST, batch_request, details, init, post_request, verify_books


def _post_some(server: ServerProcess, ledger: str) -> None:
    init(server.stub, ledger)
    for i in range(5):
        server.stub.PostEntry(post_request(ledger, f"one-{i}", metadata={"i": str(i)}))
    server.stub.PostEntries(batch_request(ledger, [f"many-{i}" for i in range(20)]))


def test_the_client_verifies_every_entry_and_getledger_gives_the_head(
    server: ServerProcess, ledger: str
) -> None:
    _post_some(server, ledger)
    with LedgerClient(server.address) as client:
        streamed = list(client.stream_entries(ledger, verify=True))
        assert [e.sequence for e in streamed] == list(range(1, 26))
        head = client.get_ledger(ledger)
        assert (head.ledger, head.head_sequence) == (ledger, 25)
        assert head.head_hash == streamed[-1].hash
        # Resuming: with entry 10's hash, or trusting entry 10 as read.
        resumed = client.stream_entries(
            ledger, after_sequence=10, verify=True, previous_hash=streamed[9].hash
        )
        assert [e.sequence for e in resumed] == list(range(11, 26))
        trusted = list(client.stream_entries(ledger, after_sequence=10, verify=True))
        assert [e.sequence for e in trusted] == list(range(11, 26))
        # A wrong anchor is caught at the first entry after it.
        with pytest.raises(integrity.ChainBroken) as broken:
            list(
                client.stream_entries(
                    ledger, after_sequence=10, verify=True, previous_hash=bytes(32)
                )
            )
        assert broken.value.sequence == 11
        assert "entry 11: hash mismatch" in str(broken.value)
        # After an entry not yet posted there is nothing to anchor on.
        with pytest.raises(integrity.ChainBroken) as ahead:
            list(client.stream_entries(ledger, after_sequence=26, verify=True))
        assert (ahead.value.sequence, ahead.value.problem) == (
            26,
            "not in the ledger: cannot start after it",
        )

    async def follow() -> list[int]:
        async with AsyncLedgerClient(server.address) as client:
            seen = []
            async for entry in client.stream_entries(ledger, verify=True, follow=True):
                seen.append(entry.sequence)
                if entry.sequence == 26:
                    break
            return seen

    async def follow_and_post() -> list[int]:
        following = asyncio.ensure_future(follow())
        await asyncio.sleep(0.2)
        # A live entry chains to the ones caught up before it.
        await asyncio.to_thread(server.stub.PostEntry, post_request(ledger, "live"))
        return await asyncio.wait_for(following, 60)

    assert asyncio.run(follow_and_post()) == list(range(1, 27))


def test_a_replay_returns_the_original_hash_and_getledger_is_a_read(
    server: ServerProcess, ledger: str
) -> None:
    init(server.stub, ledger)
    first = server.stub.PostEntry(post_request(ledger, "k")).entry
    again = server.stub.PostEntry(post_request(ledger, "k"))
    assert again.replayed and again.entry.hash == first.hash and len(first.hash) == 32
    empty = f"{ledger}-empty"
    init(server.stub, empty)
    head = server.stub.GetLedger(ledger_pb2.GetLedgerRequest(ledger=empty))
    assert (head.head_sequence, head.head_hash) == (0, integrity.GENESIS)
    with pytest.raises(grpc.RpcError) as missing:
        server.stub.GetLedger(ledger_pb2.GetLedgerRequest(ledger=f"{ledger}-none"))
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(missing.value)[0].reason == "COUNTER_NOT_INITIALIZED"


def test_verify_as_a_process_names_each_problem_on_a_line_and_fails(
    fresh_pg_url: str, ledger: str
) -> None:
    with ServerProcess(fresh_pg_url, extra_args=FAST) as server:
        _post_some(server, ledger)
    clean = verify_books(fresh_pg_url, "--all")
    assert (clean.returncode, clean.stdout) == (0, ""), clean.stderr
    assert "the books hold" in clean.stderr

    engine = sa.create_engine(sa.make_url(fresh_pg_url).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        at = sa.and_(entries.c.ledger == ledger, entries.c.sequence == 3)
        conn.execute(sa.update(entries).where(at).values(description="rewritten"))
        conn.execute(
            sa.delete(entries).where(entries.c.ledger == ledger, entries.c.sequence.in_([7, 8]))
        )
        conn.execute(
            sa.update(account_totals)
            .where(account_totals.c.ledger == ledger, account_totals.c.account == "cash")
            .values(debits=account_totals.c.debits + 1)
        )
    engine.dispose()
    damaged = verify_books(fresh_pg_url, "--ledger", ledger)
    assert damaged.returncode == 1
    lines = damaged.stdout.splitlines()
    assert lines[:2] == [f"{ledger}: entry 3: hash mismatch", f"{ledger}: entries 7-8 missing"]
    assert all(line.startswith(f"{ledger}: account ") for line in lines[2:]) and lines[2:]
    assert f"{ledger}: account cash USD: debits " in damaged.stdout
    # From entry 10 on (entry 9 has the hash to start from), the chain holds;
    # the totals are not checked from there.
    later = verify_books(fresh_pg_url, "--ledger", ledger, "--from", "10")
    assert (later.returncode, later.stdout) == (0, ""), later.stderr


def test_verify_refuses_bad_arguments_with_one_line(pg_url: str) -> None:
    neither = verify_books(pg_url)
    assert neither.returncode == 2 and "--ledger" in neither.stderr
    bad: Any = verify_books(pg_url, "--ledger", "no spaces allowed")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
