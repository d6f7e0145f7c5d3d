"""The abuse limits, each with its flag, through real server processes: the
largest request, following streams per principal, concurrent calls per
connection, keepalive pings, and a maximum connection age."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_client import LedgerClient

from ledger_service.auth.principals import token_digest
from ledger_service.domain import limits
from ledger_service.testing import ServerProcess

from .conftest import FAST, details, init, post_request
from .traffic import Follower, stored_entries

WIDE = "\U0001f600"  # four bytes of UTF-8


def first_message(stream: Any) -> ledger_pb2.StreamEntriesResponse:
    """The stream's first message (caught up, on a new ledger): it is open."""
    for message in stream:
        return message  # type: ignore[no-any-return]
    raise AssertionError("the stream ended at once")


def worst_case_entries(n: int) -> list[ledger_pb2.EntryInput]:
    """n entries at every limit at once, in characters of four bytes."""
    pair = limits.METADATA_MAX_BYTES // limits.METADATA_MAX_PAIRS
    metadata = {f"k{i:02d}" + "a" * (pair // 2 - 3): "v" * (pair - pair // 2) for i in range(32)}
    return [
        ledger_pb2.EntryInput(
            idempotency_key=f"{i:04d}" + WIDE * (limits.IDEMPOTENCY_KEY.max_chars - 4),
            debit_account=WIDE * limits.ACCOUNT.max_chars,
            credit_account="c" + WIDE * (limits.ACCOUNT.max_chars - 1),
            amount=1,
            asset="A" * limits.ASSET.max_chars,
            entry_type=WIDE * limits.ENTRY_TYPE.max_chars,
            description=WIDE * limits.DESCRIPTION.max_chars,
            metadata=metadata,
        )
        for i in range(n)
    ]


def worst_case_batch() -> list[ledger_pb2.EntryInput]:
    """The largest valid PostEntries: BATCH_MAX_ENTRIES entries at every
    limit, the first ones in the postings form, holding BATCH_MAX_POSTINGS
    postings at every limit in all."""
    entries = worst_case_entries(limits.BATCH_MAX_ENTRIES)
    extra = limits.BATCH_MAX_POSTINGS - limits.BATCH_MAX_ENTRIES
    for i, entry in enumerate(entries):
        if extra <= 0:
            break
        n = min(limits.POSTINGS_MAX, extra + 1)
        extra -= n - 1
        for name in ("debit_account", "credit_account", "amount", "asset"):
            entry.ClearField(name)
        entry.postings.extend(
            # Accounts of their own: amounts at their maximum must not sum.
            ledger_pb2.Posting(
                debit_account=f"d{i:04d}{j:02d}" + WIDE * (limits.ACCOUNT.max_chars - 7),
                credit_account=f"c{i:04d}{j:02d}" + WIDE * (limits.ACCOUNT.max_chars - 7),
                amount=limits.AMOUNT_MAX,
                asset="A" * limits.ASSET.max_chars,
            )
            for j in range(n)
        )
    return entries


def test_the_largest_valid_batch_is_accepted_and_one_beyond_the_limit_writes_nothing(
    pg_url: str,
) -> None:
    ledger = f"big-{uuid.uuid4().hex[:8]}"
    request = ledger_pb2.PostEntriesRequest(ledger=ledger, entries=worst_case_batch())
    assert sum(max(1, len(e.postings)) for e in request.entries) == limits.BATCH_MAX_POSTINGS
    assert request.ByteSize() > 4 << 20  # beyond gRPC's own default
    # The default limit admits it, and is no more than a MiB over it.
    assert request.ByteSize() <= limits.max_request_bytes() < request.ByteSize() + (1 << 20)
    with ServerProcess(pg_url, extra_args=FAST) as server:
        init(server.stub, ledger)
        # The answer repeats every entry, with its balances: the client
        # accepts it as it is.
        with LedgerClient(server.address, timeout=120) as client:
            answer = client.post_entries(ledger, request.entries)
        assert answer.ByteSize() > 4 << 20
        results = answer.results
        assert [r.entry.sequence for r in results] == list(range(1, 1001))
        assert sum(len(r.balances) for r in results) > 2 * limits.BATCH_MAX_ENTRIES
    small = ["--max-request-bytes", str(100_000)]
    with ServerProcess(pg_url, extra_args=[*FAST, *small]) as server:
        with pytest.raises(grpc.RpcError) as error:
            server.stub.PostEntries(
                ledger_pb2.PostEntriesRequest(ledger=ledger, entries=worst_case_entries(20)),
                timeout=30,
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored_entries(pg_url, ledger)[0] == 1000  # nothing more was written


def test_a_principal_may_follow_only_so_many_streams(sqlite_url: str, tmp_path: Path) -> None:
    tokens = {name: f"{name}-{uuid.uuid4().hex}" for name in ("alice", "bob")}
    auth = tmp_path / "auth.toml"
    auth.write_text(
        "\n".join(
            f'[[principal]]\nname = "{name}"\ntoken_sha256 = ["{token_digest(token)}"]\n'
            'roles = ["admin"]\n'
            for name, token in tokens.items()
        )
    )
    ledger = f"follow-{uuid.uuid4().hex[:8]}"
    args = [*FAST, "--auth-file", str(auth), "--max-follows-per-principal", "2"]
    with ServerProcess(sqlite_url, extra_args=args) as server:
        metadata = {name: (("authorization", f"Bearer {t}"),) for name, t in tokens.items()}
        init_request = ledger_pb2.InitializeCounterRequest(ledger=ledger)
        server.stub.InitializeCounter(init_request, metadata=metadata["alice"], timeout=10)

        def follow(who: str) -> Any:
            stream = server.stub.StreamEntries(
                ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True),
                metadata=metadata[who],
                timeout=60,
            )
            first_message(stream)  # caught up: the stream is open and counted
            return stream

        held = [follow("alice"), follow("alice")]
        with pytest.raises(grpc.RpcError) as error:
            follow("alice")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, _ = details(error.value)
        assert (info.reason, info.metadata["limit"]) == ("TOO_MANY_STREAMS", "2")
        other = follow("bob")  # a quota of one's own
        held[0].cancel()
        deadline = time.monotonic() + 15  # the server frees the slot as the cancel arrives
        while True:
            try:
                held[0] = follow("alice")
                break
            except grpc.RpcError as again:
                assert again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the slot was never freed"
                time.sleep(0.1)
        for stream in [*held, other]:
            stream.cancel()


def test_calls_beyond_a_connections_concurrent_streams_wait_for_one_to_end(
    sqlite_url: str,
) -> None:
    ledger = f"streams-{uuid.uuid4().hex[:8]}"
    args = [*FAST, "--max-streams-per-connection", "1"]
    with ServerProcess(sqlite_url, extra_args=args) as server:
        init(server.stub, ledger)
        with grpc.insecure_channel(server.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            stream = stub.StreamEntries(
                ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
            )
            first_message(stream)
            with pytest.raises(grpc.RpcError) as error:  # queued behind the stream
                stub.PostEntry(post_request(ledger, "k1"), timeout=1)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream.cancel()
            assert stub.PostEntry(post_request(ledger, "k1"), timeout=30).entry.sequence == 1
        # Another connection is never held up by this one's limit.
        assert server.stub.PostEntry(post_request(ledger, "k2"), timeout=30).entry.sequence == 2


@pytest.mark.parametrize("allowed", [False, True], ids=["too often", "allowed"])
def test_a_client_that_pings_more_often_than_allowed_is_sent_away(
    sqlite_url: str, allowed: bool
) -> None:
    """A client pinging every 0.1 s: sent away under --min-ping-interval 5,
    kept under 0.05 (so the flag, not only gRPC's default, decides)."""
    ledger = f"pings-{uuid.uuid4().hex[:8]}"
    interval = "0.05" if allowed else "5"
    with ServerProcess(sqlite_url, extra_args=[*FAST, "--min-ping-interval", interval]) as server:
        init(server.stub, ledger)
        eager = [
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", 100),
        ]
        with grpc.insecure_channel(server.address, options=eager) as channel:
            stream = ledger_pb2_grpc.LedgerServiceStub(channel).StreamEntries(
                ledger_pb2.StreamEntriesRequest(ledger=ledger, follow=True), timeout=60
            )
            if not allowed:
                with pytest.raises(grpc.RpcError) as error:
                    for _ in stream:  # heartbeats would come only every 15 s
                        pass
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "ping" in (error.value.details() or "").lower()
                return
            first_message(stream)  # caught up; then 3 s of nothing but pings
            time.sleep(3)
            server.stub.PostEntry(post_request(ledger, "k1"), timeout=10)
            seen: list[int] = []
            for message in stream:
                seen.extend(e.sequence for e in message.entries)
                if seen:
                    break
            stream.cancel()
            assert seen == [1]  # still connected


def test_aged_connections_are_closed_and_followers_resume_without_missing_an_entry(
    sqlite_url: str,
) -> None:
    ledger = f"age-{uuid.uuid4().hex[:8]}"
    args = [*FAST, "--max-connection-age", "1", "--max-connection-age-grace", "0.5"]
    with ServerProcess(sqlite_url, extra_args=args) as server:
        init(server.stub, ledger)
        with Follower(server.address, ledger) as follower:
            for i in range(1, 31):
                with grpc.insecure_channel(server.address) as channel:  # fresh, so never aged
                    ledger_pb2_grpc.LedgerServiceStub(channel).PostEntry(
                        post_request(ledger, f"k{i}"), timeout=10
                    )
                time.sleep(0.1)
            assert follower.wait_for(30) == list(range(1, 31))
            assert follower.resumed > 0  # its connection was closed under it, more than once
