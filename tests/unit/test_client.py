"""What ledger_client retries, against an in-process server that fails on
cue: only UNAVAILABLE and DEADLINE_EXCEEDED, always with the same keys, within
total_timeout; streams resume within reconnect_timeout after their last
message; the token rides on every call. Blocking and asyncio alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_client import AsyncLedgerClient, LedgerClient, channel_options, integrity

from ledger_service.api.errors import ERRORS

from ..vectors import VECTORS, entry_of


class _Scripted:
    """PostEntry as scripted; the other methods are the base's UNIMPLEMENTED."""

    _Base = ledger_pb2_grpc.LedgerServiceServicer
    InitializeCounter, PostEntries = _Base.InitializeCounter, _Base.PostEntries
    StreamEntries, GetAccount, GetLedger = _Base.StreamEntries, _Base.GetAccount, _Base.GetLedger
    SetAccountLimits, ReverseEntry = _Base.SetAccountLimits, _Base.ReverseEntry
    GetEntry, ListAccounts = _Base.GetEntry, _Base.ListAccounts
    AckEntries, ListConsumers = _Base.AckEntries, _Base.ListConsumers

    def __init__(self, fail: Callable[[int, Any], None]) -> None:
        self.keys: list[str] = []
        self._fail = fail  # called with (attempt number, context): aborts or stalls

    def PostEntry(self, request: Any, context: Any) -> ledger_pb2.PostEntryResponse:
        self.keys.append(request.idempotency_key)
        self._fail(len(self.keys), context)
        entry = ledger_pb2.Entry(sequence=1, idempotency_key=request.idempotency_key)
        return ledger_pb2.PostEntryResponse(entry=entry, replayed=len(self.keys) > 1)


def _post(client: LedgerClient) -> ledger_pb2.PostEntryResponse:
    return client.post_entry("l", debit_account="a", credit_account="b", amount=1, asset="USD")


@pytest.mark.parametrize("code", sorted({row.code for row in ERRORS.values()}, key=str))
def test_the_client_retries_only_unavailable_and_deadline_exceeded(
    serve: Any, code: grpc.StatusCode
) -> None:
    def fail(attempt: int, context: Any) -> None:
        context.abort(code, "scripted")

    servicer = _Scripted(fail)
    client = LedgerClient(serve(servicer), max_attempts=3, backoff=0.01)
    with client, pytest.raises(grpc.RpcError) as error:
        _post(client)
    assert error.value.code() == code
    retried = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert len(servicer.keys) == (3 if retried else 1)
    assert len(set(servicer.keys)) == 1  # every attempt carries the same key


def test_the_client_retries_its_own_deadline_with_the_same_key(serve: Any) -> None:
    def fail(attempt: int, context: Any) -> None:
        if attempt == 1:
            time.sleep(1.0)  # past the attempt's deadline; its answer is lost

    servicer = _Scripted(fail)
    with LedgerClient(serve(servicer), timeout=0.5, backoff=0.01) as client:
        result = _post(client)
    assert len(servicer.keys) >= 2 and len(set(servicer.keys)) == 1
    assert result.replayed and result.entry.idempotency_key == servicer.keys[0]


def test_total_timeout_bounds_the_retries(serve: Any) -> None:
    servicer = _Scripted(lambda attempt, context: time.sleep(1))
    client = LedgerClient(
        serve(servicer), timeout=0.1, total_timeout=0.6, max_attempts=1000, backoff=0.01
    )
    with client, pytest.raises(grpc.RpcError) as error:
        _post(client)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Each attempt takes its 0.1 s deadline, so 0.6 s allow a handful, not 1000.
    assert 1 <= len(servicer.keys) <= 10, len(servicer.keys)


def test_the_async_client_retries_with_the_same_key_and_not_what_it_should_not(
    serve: Any,
) -> None:
    def fail(attempt: int, context: Any) -> None:
        if attempt == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted")

    async def post(target: str, **settings: Any) -> ledger_pb2.PostEntryResponse:
        async with AsyncLedgerClient(target, backoff=0.01, **settings) as client:
            return await client.post_entry(
                "l", debit_account="a", credit_account="b", amount=1, asset="USD"
            )

    servicer = _Scripted(fail)
    assert asyncio.run(post(serve(servicer))).replayed
    assert len(servicer.keys) == 2 and len(set(servicer.keys)) == 1

    refused = _Scripted(
        lambda attempt, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "no")
    )
    with pytest.raises(grpc.RpcError) as error:
        asyncio.run(post(serve(refused)))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(refused.keys) == 1  # not retried


class _Streams:
    """StreamEntries as scripted: `script(call number, request, context)`
    yields messages and then aborts or returns."""

    _Base = ledger_pb2_grpc.LedgerServiceServicer
    InitializeCounter, PostEntry = _Base.InitializeCounter, _Base.PostEntry
    PostEntries, GetAccount, GetLedger = _Base.PostEntries, _Base.GetAccount, _Base.GetLedger
    SetAccountLimits, ReverseEntry = _Base.SetAccountLimits, _Base.ReverseEntry
    GetEntry, ListAccounts = _Base.GetEntry, _Base.ListAccounts
    AckEntries, ListConsumers = _Base.AckEntries, _Base.ListConsumers

    def __init__(self, script: Callable[[int, Any, Any], Iterator[Any]]) -> None:
        self.positions: list[int] = []  # each call's after_sequence
        self._script = script

    def StreamEntries(self, request: Any, context: Any) -> Iterator[Any]:
        self.positions.append(request.after_sequence)
        yield from self._script(len(self.positions), request, context)


def _entries(message: Any) -> list[int]:
    return [e.sequence for e in message.entries]


def _read(target: str, kind: str, **settings: Any) -> list[int]:
    """Every entry a `kind` client's stream yields (it follows nothing)."""
    if kind == "sync":
        with LedgerClient(target, **settings) as client:
            return [e.sequence for e in client.stream_entries("l")]

    async def run() -> list[int]:
        async with AsyncLedgerClient(target, **settings) as client:
            return [e.sequence async for e in client.stream_entries("l")]

    return asyncio.run(run())


def _message(sequence: int) -> ledger_pb2.StreamEntriesResponse:
    return ledger_pb2.StreamEntriesResponse(entries=[ledger_pb2.Entry(sequence=sequence)])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_resumes_within_reconnect_timeout_then_gives_up(serve: Any, kind: str) -> None:
    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        context.abort(grpc.StatusCode.UNAVAILABLE, "away")
        yield  # a generator, never reached

    servicer = _Streams(script)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        _read(serve(servicer), kind, reconnect_timeout=0.5, backoff=0.01, max_backoff=0.05)
    elapsed = time.monotonic() - started
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.positions) > 2 and 0.3 < elapsed < 10, (len(servicer.positions), elapsed)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_reconnect_budget_restarts_with_every_message(serve: Any, kind: str) -> None:
    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        if call == 6:
            return  # the end of the history
        time.sleep(0.3)
        yield _message(call)
        context.abort(grpc.StatusCode.UNAVAILABLE, "dropped")

    servicer = _Streams(script)
    started = time.monotonic()
    got = _read(serve(servicer), kind, reconnect_timeout=1.0, backoff=0.01, max_backoff=0.05)
    assert got == [1, 2, 3, 4, 5]
    assert servicer.positions == [0, 1, 2, 3, 4, 5]  # each resume from the last entry
    assert time.monotonic() - started > 1.0  # longer than one budget, in all


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stream_out_of_order_is_an_error_not_a_resume(serve: Any, kind: str) -> None:
    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        yield _message(2)

    with pytest.raises(RuntimeError, match="expected 1, got 2"):
        _read(serve(_Streams(script)), kind)


class _Batches:
    """PostEntries that loses its first answer (UNAVAILABLE), and records
    what every attempt carried, metadata included."""

    _Base = ledger_pb2_grpc.LedgerServiceServicer
    InitializeCounter, PostEntry = _Base.InitializeCounter, _Base.PostEntry
    StreamEntries, GetAccount, GetLedger = _Base.StreamEntries, _Base.GetAccount, _Base.GetLedger
    SetAccountLimits, ReverseEntry = _Base.SetAccountLimits, _Base.ReverseEntry
    GetEntry, ListAccounts = _Base.GetEntry, _Base.ListAccounts
    AckEntries, ListConsumers = _Base.AckEntries, _Base.ListConsumers

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.keys: list[list[str]] = []
        self.metadata: list[dict[str, str]] = []
        self._code = code

    def PostEntries(self, request: Any, context: Any) -> ledger_pb2.PostEntriesResponse:
        self.keys.append([e.idempotency_key for e in request.entries])
        self.metadata.append(dict(context.invocation_metadata()))
        if len(self.keys) == 1 or self._code != grpc.StatusCode.UNAVAILABLE:
            context.abort(self._code, "scripted")
        results = [
            ledger_pb2.PostedEntry(entry=ledger_pb2.Entry(sequence=i + 1, idempotency_key=k))
            for i, k in enumerate(self.keys[-1])
        ]
        return ledger_pb2.PostEntriesResponse(results=results)


FIELDS: dict[str, Any] = {"debit_account": "a", "credit_account": "b", "amount": 1, "asset": "USD"}


def test_post_entries_keys_each_entry_and_retries_with_the_same_keys(serve: Any) -> None:
    servicer = _Batches()
    given = ledger_pb2.EntryInput(**FIELDS)
    with LedgerClient(serve(servicer), backoff=0.01, token="s3cret-token") as client:
        response = client.post_entries("l", [given, {**FIELDS, "idempotency_key": "mine"}, FIELDS])
    assert len(servicer.keys) == 2 and servicer.keys[0] == servicer.keys[1]
    keys = servicer.keys[0]
    assert keys[1] == "mine" and len(set(keys)) == 3 and all(keys)
    assert [r.entry.idempotency_key for r in response.results] == keys
    assert given.idempotency_key == ""  # the caller's message is left as it was
    # The token rides on every attempt.
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer s3cret-token"] * 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_refused_token_is_not_retried_nor_shown(serve: Any, kind: str) -> None:
    servicer = _Batches(grpc.StatusCode.UNAUTHENTICATED)
    target, token = serve(servicer), "s3cret-token"
    with pytest.raises(grpc.RpcError) as error:
        if kind == "sync":
            with LedgerClient(target, token=token) as client:
                client.post_entries("l", [FIELDS])
        else:

            async def run() -> None:
                async with AsyncLedgerClient(target, token=token) as client:
                    await client.post_entries("l", [FIELDS])

            asyncio.run(run())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(servicer.keys) == 1
    assert servicer.metadata[0]["authorization"] == f"Bearer {token}"
    assert token not in f"{error.value} {error.value!r}"


def test_settings_that_cannot_work_are_refused_without_showing_the_token() -> None:
    with pytest.raises(ValueError, match="cannot both be None"):
        LedgerClient("127.0.0.1:1", total_timeout=None, max_attempts=None)
    with pytest.raises(ValueError, match="go together"):
        LedgerClient("127.0.0.1:1", private_key=b"key")
    with grpc.insecure_channel("127.0.0.1:1", channel_options()) as channel:
        with pytest.raises(ValueError, match="used as is"):
            LedgerClient("127.0.0.1:1", channel=channel, root_certificates=b"ca")
        LedgerClient("127.0.0.1:1", channel=channel, token="fine").close()
    with pytest.raises(ValueError) as error:
        LedgerClient("127.0.0.1:1", token="bad token\n")
    assert "bad token" not in str(error.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("served", ["as is", "skipping", "edited"])
def test_a_verifying_stream_checks_the_chain_across_a_reconnect(
    serve: Any, kind: str, served: str
) -> None:
    chain = [entry_of(v) for v in VECTORS["entries"]]

    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        after = request.after_sequence
        if served == "skipping":  # a message that leaves entry 2 out
            yield ledger_pb2.StreamEntriesResponse(entries=[chain[0], chain[2]], caught_up=True)
            return
        if call == 1:  # entry 1, then the connection drops
            yield ledger_pb2.StreamEntriesResponse(entries=chain[after:1])
            context.abort(grpc.StatusCode.UNAVAILABLE, "dropped")
        rest = chain[after:]
        if served == "edited":
            rest[-1].description = "edited after it was chained"
        yield ledger_pb2.StreamEntriesResponse(entries=rest, caught_up=True)

    target = serve(_Streams(script))

    def read() -> list[int]:
        settings: dict[str, Any] = {"backoff": 0.01, "max_backoff": 0.05}
        if kind == "sync":
            with LedgerClient(target, **settings) as client:
                return [e.sequence for e in client.stream_entries("books", verify=True)]

        async def run() -> list[int]:
            async with AsyncLedgerClient(target, **settings) as client:
                stream = client.stream_entries("books", verify=True)
                return [e.sequence async for e in stream]

        return asyncio.run(run())

    if served == "as is":
        # Every vector verifies, multi-posting entries and reversals included.
        assert read() == [e.sequence for e in chain] == list(range(1, len(chain) + 1))
        return
    with pytest.raises(integrity.ChainBroken) as broken:
        read()
    if served == "skipping":
        assert (broken.value.sequence, broken.value.problem) == (3, "expected entry 2 next")
    else:
        # Only the last entry was edited: every entry before it verified.
        assert (broken.value.sequence, broken.value.problem) == (len(chain), "hash mismatch")
