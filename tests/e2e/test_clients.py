"""The clients (Python blocking and asyncio, TypeScript) through real server
processes: with default settings a following stream and a post ride through a
server restart of about 5 s; bearer tokens, TLS and mTLS credentials."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from ledger.v1 import ledger_pb2
from ledger_client import AsyncLedgerClient, EntryLike, LedgerClient, error_info

from ledger_service.auth.principals import token_digest
from ledger_service.testing import ServerProcess

from ..conftest import free_port, missing_requirement
from .conftest import FAST

OUTAGE = 5.0  # seconds the server stays down between its two runs
POST: dict[str, Any] = {
    "debit_account": "cash",
    "credit_account": "sales",
    "amount": 100,
    "asset": "USD",
}
ADMIN_TOKEN = f"admin-{uuid.uuid4().hex}"
WRITER_TOKEN = f"writer-{uuid.uuid4().hex}"
OPS = "ops.example.internal"  # the admin's mTLS identity
AUTH_TOML = (
    f'[[principal]]\nname = "admin"\ntoken_sha256 = ["{token_digest(ADMIN_TOKEN)}"]\n'
    'roles = ["admin"]\n\n'
    f'[[principal]]\nname = "writer"\ntoken_sha256 = ["{token_digest(WRITER_TOKEN)}"]\n'
    'roles = ["writer:*"]\n\n'
    f'[[principal]]\nname = "ops"\ntls_identities = ["{OPS}"]\nroles = ["admin"]\n'
)
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}  # a failed handshake
TS_DIR = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def auth_args(tmp_path: Path) -> list[str]:
    return ["--auth-file", str(write(tmp_path / "auth.toml", AUTH_TOML.encode()))]


def tls_args(tmp_path: Path, ca: trustme.CA, *, mtls: bool = False) -> list[str]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    args = ["--tls-cert", str(write(tmp_path / "server.pem", chain))]
    args += ["--tls-key", str(write(tmp_path / "server.key", leaf.private_key_pem.bytes()))]
    if mtls:
        args += ["--tls-client-ca", str(write(tmp_path / "clients.pem", ca.cert_pem.bytes()))]
    return args


def exercise(kind: str, target: str, ledger: str, **settings: Any) -> list[int]:
    """With a `kind` ("sync" or "async") client made with `settings`: init,
    post, post a batch of two, and read the stream back; its sequences."""
    batch = [{**POST, "idempotency_key": "b1"}, POST]
    if kind == "sync":
        with LedgerClient(target, **settings) as client:
            client.initialize_counter(ledger)
            client.post_entry(ledger, **POST)
            client.post_entries(ledger, batch)
            return [e.sequence for e in client.stream_entries(ledger)]

    async def run() -> list[int]:
        async with AsyncLedgerClient(target, **settings) as client:
            await client.initialize_counter(ledger)
            await client.post_entry(ledger, **POST)
            await client.post_entries(ledger, batch)
            return [e.sequence async for e in client.stream_entries(ledger)]

    return asyncio.run(run())


# --- Riding through a restart, with default settings ---------------------------------


def test_the_blocking_client_rides_through_a_restart_with_defaults(
    fresh_pg_url: str, ledger: str
) -> None:
    server = ServerProcess(fresh_pg_url, port=free_port(), extra_args=FAST)
    with server, LedgerClient(server.address) as client:
        client.initialize_counter(ledger)
        seen: list[int] = []
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                with contextlib.closing(client.stream_entries(ledger, follow=True)) as entries:
                    for entry in entries:
                        seen.append(entry.sequence)
                        if len(seen) == 3:
                            return
            except BaseException as exc:
                failed.append(exc)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert client.post_entry(ledger, idempotency_key="k1", **POST).entry.sequence == 1
        wait_until(lambda: seen or failed, "entry 1 on the stream")
        server.kill()  # a crash: SIGKILL, nothing drained
        during: list[Any] = []

        def post_during_the_outage() -> None:
            try:
                during.append(client.post_entry(ledger, idempotency_key="k2", **POST))
            except grpc.RpcError as exc:
                during.append(exc)

        poster = threading.Thread(target=post_during_the_outage, daemon=True)
        poster.start()
        time.sleep(OUTAGE)
        server.start()
        poster.join(60)
        assert during and isinstance(during[0], ledger_pb2.PostEntryResponse), during
        assert during[0].entry.sequence == 2
        assert client.post_entry(ledger, idempotency_key="k3", **POST).entry.sequence == 3
        follower.join(60)
        assert not failed, failed
        assert seen == [1, 2, 3]  # every entry once, in order, across the restart


def test_the_asyncio_client_rides_through_a_restart_with_defaults(
    fresh_pg_url: str, ledger: str
) -> None:
    async def run(server: ServerProcess) -> None:
        async with AsyncLedgerClient(server.address) as client:
            await client.initialize_counter(ledger)
            seen: list[int] = []

            async def follow() -> None:
                entries = client.stream_entries(ledger, follow=True)
                async with contextlib.aclosing(entries):
                    async for entry in entries:
                        seen.append(entry.sequence)
                        if len(seen) == 3:
                            return

            follower = asyncio.create_task(follow())
            posted = await client.post_entry(ledger, idempotency_key="k1", **POST)
            assert posted.entry.sequence == 1
            for _ in range(1200):  # up to 60 s
                if seen or follower.done():
                    break
                await asyncio.sleep(0.05)
            assert seen == [1]
            await asyncio.to_thread(server.terminate)  # SIGTERM: followers end UNAVAILABLE
            during = asyncio.create_task(client.post_entry(ledger, idempotency_key="k2", **POST))
            await asyncio.sleep(OUTAGE)
            await asyncio.to_thread(server.start)
            assert (await asyncio.wait_for(during, 60)).entry.sequence == 2
            posted = await client.post_entry(ledger, idempotency_key="k3", **POST)
            assert posted.entry.sequence == 3
            await asyncio.wait_for(follower, 60)
            assert seen == [1, 2, 3]

    server = ServerProcess(fresh_pg_url, port=free_port(), extra_args=FAST)
    with server:
        asyncio.run(run(server))


class NodeDriver:
    """clients/typescript's dist/test/driver.js: a LedgerClient with default
    settings following `ledger`, posting on command; its JSON events."""

    def __init__(self, ledger: str, address: str, env: dict[str, str] | None = None) -> None:
        node = shutil.which("node")
        assert node is not None
        self.proc = subprocess.Popen(
            [node, str(TS_DIR / "dist" / "test" / "driver.js"), ledger],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LEDGER_ADDRESS": address, **(env or {})},
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)  # read as it comes, so the pipe never fills

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """The first event named `event` with `fields`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for seen in self.events[checked:]:
                assert seen["event"] not in ("stream_failed", "post_failed"), seen
                if seen["event"] == event and fields.items() <= seen.items():
                    return seen
            checked = len(self.events)
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event} {fields} in {self.events}") from None
            if item is None:
                raise AssertionError(f"driver exited: {self.events}\n{''.join(self.stderr)}")
            self.events.append(item)

    def __enter__(self) -> NodeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def ts_built() -> None:
    """clients/typescript compiled (dist/), for the driver."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None or not (TS_DIR / "node_modules").is_dir():
        missing_requirement(
            "npm or clients/typescript/node_modules missing (make test runs npm ci)"
        )
    assert npm is not None
    built = subprocess.run(
        [npm, "run", "--silent", "build"], cwd=TS_DIR, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stdout + built.stderr


def streamed(driver: NodeDriver) -> list[str]:
    return [e["sequence"] for e in driver.events if e["event"] == "streamed"]


def test_the_typescript_client_rides_through_a_restart_with_defaults(
    ts_built: None, fresh_pg_url: str, ledger: str
) -> None:
    server = ServerProcess(fresh_pg_url, port=free_port(), extra_args=FAST)
    with server, NodeDriver(ledger, server.address) as node:
        node.expect("ready")
        node.send("post k1")
        node.expect("posted", key="k1", sequence="1")
        node.expect("streamed", sequence="1")
        server.kill()
        node.send("post k2")  # during the outage
        time.sleep(OUTAGE)
        server.start()
        node.expect("posted", key="k2", sequence="2")
        node.send("post k3")
        node.expect("posted", key="k3", sequence="3")
        node.expect("streamed", sequence="3")
        node.send("stop")
        node.expect("done")
        assert streamed(node) == ["1", "2", "3"]


# --- Tokens -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*FAST, *auth_args(tmp_path_factory.mktemp("auth"))]
    with ServerProcess(pg_url, extra_args=args) as server:
        yield server


def test_a_token_is_sent_and_without_one_a_call_is_refused_once(
    secured: ServerProcess, ledger: str
) -> None:
    with LedgerClient(secured.address, token=ADMIN_TOKEN) as admin:
        admin.initialize_counter(ledger)
    with LedgerClient(secured.address, token=WRITER_TOKEN) as writer:
        assert writer.post_entry(ledger, idempotency_key="k1", **POST).entry.sequence == 1
        batch: list[EntryLike] = [
            {**POST, "idempotency_key": "b1"},
            ledger_pb2.EntryInput(**POST),  # messages and mappings alike
            POST,
        ]
        first = writer.post_entries(ledger, batch)
        assert [(r.entry.sequence, r.replayed) for r in first.results] == [
            (2, False),
            (3, False),
            (4, False),
        ]
        keys = [r.entry.idempotency_key for r in first.results]
        assert keys[0] == "b1" and len(set(keys)) == 3  # a key of its own per entry
        again = writer.post_entries(ledger, [{**POST, "idempotency_key": k} for k in keys])
        assert [(r.entry.sequence, r.replayed) for r in again.results] == [
            (2, True),
            (3, True),
            (4, True),
        ]
        assert [e.sequence for e in writer.stream_entries(ledger)] == [1, 2, 3, 4]
        assert writer.get_account(ledger, "cash").as_of_sequence == 4
    refusals = "".join(secured.lines).count("refused PostEntry from anonymous")
    for token in (None, "not-a-known-token"):
        stranger = LedgerClient(secured.address, token=token)
        with stranger, pytest.raises(grpc.RpcError) as error:
            stranger.post_entry(ledger, **POST)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(error.value)
        assert info is not None and info.reason == "UNAUTHENTICATED"
        text = f"{error.value} {error.value!r} {error.value.debug_error_string()}"  # type: ignore[attr-defined]
        assert not any(t in text for t in (ADMIN_TOKEN, WRITER_TOKEN, "not-a-known-token"))
    # Not retried: the server refused each call once (a retry would come
    # within a backoff, well before the call raised).
    wait_until(
        lambda: "".join(secured.lines).count("refused PostEntry from anonymous") >= refusals + 2,
        "both refusals logged",
    )
    time.sleep(0.5)
    assert "".join(secured.lines).count("refused PostEntry from anonymous") == refusals + 2


def test_the_asyncio_client_sends_its_token(secured: ServerProcess, ledger: str) -> None:
    with LedgerClient(secured.address, token=ADMIN_TOKEN) as admin:
        admin.initialize_counter(ledger)

    async def run() -> None:
        async with AsyncLedgerClient(secured.address, token=WRITER_TOKEN) as writer:
            await writer.post_entry(ledger, idempotency_key="k1", **POST)
            batch = [{**POST, "idempotency_key": "b1"}, POST]
            first = await writer.post_entries(ledger, batch)
            keys = [r.entry.idempotency_key for r in first.results]
            replay = [{**POST, "idempotency_key": k} for k in keys]
            again = await writer.post_entries(ledger, replay)
            assert [r.replayed for r in again.results] == [True, True]
            assert [e.sequence async for e in writer.stream_entries(ledger)] == [1, 2, 3]
        async with AsyncLedgerClient(secured.address) as stranger:
            with pytest.raises(grpc.RpcError) as error:
                await stranger.post_entry(ledger, **POST)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(error.value)  # an AioRpcError's details read the same way
        assert info is not None and info.reason == "UNAUTHENTICATED"

    asyncio.run(run())


# --- TLS and mTLS -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_tls_with_root_certificates_and_a_token(
    sqlite_url: str, tmp_path: Path, ledger: str, kind: str
) -> None:
    ca = trustme.CA()
    args = [*FAST, *tls_args(tmp_path, ca), *auth_args(tmp_path)]
    # PEM bytes for one client, a path for the other: both are accepted.
    pem = ca.cert_pem.bytes()
    root = pem if kind == "async" else str(write(tmp_path / "ca.pem", pem))
    with ServerProcess(sqlite_url, extra_args=args) as server:
        got = exercise(kind, server.address, ledger, token=ADMIN_TOKEN, root_certificates=root)
        assert got == [1, 2, 3]
        # The token rides as call credentials; the server names the caller by it.
        with pytest.raises(grpc.RpcError) as error:
            exercise(
                kind, server.address, f"{ledger}-w", token=WRITER_TOKEN, root_certificates=root
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a writer may not init
        with pytest.raises(grpc.RpcError) as error:
            exercise(kind, server.address, ledger, token=ADMIN_TOKEN, total_timeout=1.0)
        assert error.value.code() in REFUSED  # plaintext to a TLS server


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_under_mtls_the_client_certificate_names_the_principal(
    sqlite_url: str, tmp_path: Path, ledger: str, kind: str
) -> None:
    ca = trustme.CA()
    args = [*FAST, *tls_args(tmp_path, ca, mtls=True), *auth_args(tmp_path)]
    ops = ca.issue_cert(OPS)
    chain = b"".join(b.bytes() for b in ops.cert_chain_pems)
    if kind == "async":
        pems: dict[str, Any] = {
            "root_certificates": ca.cert_pem.bytes(),
            "private_key": ops.private_key_pem.bytes(),
            "certificate_chain": chain,
        }
    else:
        pems = {
            "root_certificates": write(tmp_path / "ca.pem", ca.cert_pem.bytes()),
            "private_key": write(tmp_path / "ops.key", ops.private_key_pem.bytes()),
            "certificate_chain": write(tmp_path / "ops.pem", chain),
        }
    with ServerProcess(sqlite_url, extra_args=args) as server:
        assert exercise(kind, server.address, ledger, **pems) == [1, 2, 3]  # ops is admin
        root = pems["root_certificates"]
        with pytest.raises(grpc.RpcError) as error:
            exercise(kind, server.address, ledger, root_certificates=root, total_timeout=1.0)
        assert error.value.code() in REFUSED  # no client certificate


@pytest.mark.parametrize("mode", ["tls-and-token", "mtls"])
def test_the_typescript_client_over_tls(
    ts_built: None, sqlite_url: str, tmp_path: Path, ledger: str, mode: str
) -> None:
    ca = trustme.CA()
    args = [*FAST, *tls_args(tmp_path, ca, mtls=mode == "mtls"), *auth_args(tmp_path)]
    env = {"LEDGER_CA": str(write(tmp_path / "ca.pem", ca.cert_pem.bytes()))}
    if mode == "mtls":
        ops = ca.issue_cert(OPS)
        chain = b"".join(b.bytes() for b in ops.cert_chain_pems)
        env["LEDGER_CERT"] = str(write(tmp_path / "ops.pem", chain))
        env["LEDGER_KEY"] = str(write(tmp_path / "ops.key", ops.private_key_pem.bytes()))
    else:
        env["LEDGER_TOKEN"] = ADMIN_TOKEN  # in the environment: never on a command line
    server = ServerProcess(sqlite_url, extra_args=args)
    with server, NodeDriver(ledger, server.address, env) as node:
        node.expect("ready")
        node.send("post k1")
        node.expect("posted", key="k1", sequence="1")
        node.expect("streamed", sequence="1")
        node.send("stop")
        node.expect("done")


# --- Postings, limits, reversals, lookups, listings (both clients) ----------------


class Awaited:
    """Either client behind one face: each method is awaited, the blocking
    client's called in place (the loop has nothing else to run), and an
    iterator method (accounts, stream_entries) gives a list."""

    def __init__(self, client: LedgerClient | AsyncLedgerClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                return await result
            if isinstance(result, AsyncIterator):
                return [item async for item in result]
            if isinstance(result, Iterator):
                return list(result)
            return result

        return call


def totals(balances: Iterable[Any]) -> list[tuple[str, str, int, int, int]]:
    """AccountAssetBalance messages as (account, asset, debits, credits, balance)."""
    return [(b.account, b.asset, b.total_debits, b.total_credits, b.balance) for b in balances]


def postings_of(entry: ledger_pb2.Entry) -> list[tuple[str, str, int, str]]:
    return [(p.debit_account, p.credit_account, p.amount, p.asset) for p in entry.postings]


def reason_of(error: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str, Any]:
    info = error_info(error.value)
    assert info is not None, error.value
    assert info.domain == "ledger.v1"
    return error.value.code(), info.reason, dict(info.metadata)


SPLIT = [
    ("cash", "sales", 100, "USD"),  # a tuple, a message and a mapping
    ledger_pb2.Posting(debit_account="cash", credit_account="tax", amount=20, asset="USD"),
    {"debit_account": "stock", "credit_account": "inventory", "amount": 3, "asset": "SHARES"},
]


async def postings_limits_and_reversals(client: Awaited, ledger: str) -> None:
    await client.initialize_counter(ledger)

    # One entry, many postings (each form of PostingLike), and its balances.
    first = await client.post_entry(ledger, idempotency_key="m1", postings=SPLIT)
    assert (first.entry.sequence, first.replayed) == (1, False)
    assert postings_of(first.entry) == [
        ("cash", "sales", 100, "USD"),
        ("cash", "tax", 20, "USD"),
        ("stock", "inventory", 3, "SHARES"),
    ]
    assert (first.entry.debit_account, first.entry.amount) == ("", 0)  # the other form
    after_1 = [
        ("cash", "USD", 120, 0, 120),
        ("inventory", "SHARES", 0, 3, -3),
        ("sales", "USD", 0, 100, -100),
        ("stock", "SHARES", 3, 0, 3),
        ("tax", "USD", 0, 20, -20),
    ]
    assert totals(first.balances) == after_1
    again = await client.post_entry(ledger, idempotency_key="m1", postings=SPLIT)
    assert (again.entry.sequence, again.replayed) == (1, True)
    assert totals(again.balances) == after_1  # as of entry 1, on a replay too
    for both_or_neither in ({**POST, "postings": SPLIT}, {"asset": "USD"}):
        with pytest.raises(ValueError):
            await client.post_entry(ledger, **both_or_neither)

    # A batch mixing the forms: postings (as tuples in a mapping) and a pair.
    split = [("cash", "sales", 5, "USD"), ("fees", "cash", 1, "USD")]
    batch: list[EntryLike] = [
        {"idempotency_key": "b1", "postings": split},
        {**POST, "idempotency_key": "b2"},
    ]
    posted = await client.post_entries(ledger, batch)
    assert [r.entry.sequence for r in posted.results] == [2, 3]
    assert totals(posted.results[0].balances) == [
        ("cash", "USD", 125, 1, 124),
        ("fees", "USD", 1, 0, 1),
        ("sales", "USD", 0, 105, -105),
    ]
    assert totals(posted.results[1].balances) == [
        ("cash", "USD", 225, 1, 224),
        ("sales", "USD", 0, 205, -205),
    ]
    assert postings_of(posted.results[1].entry) == [("cash", "sales", 100, "USD")]

    # Limits: set (twice: idempotent), a post beyond one refused, and a new
    # limit that the balance already breaks refused.
    for _ in range(2):
        limits = await client.set_account_limits(ledger, "sales", "USD", max_net_credit=250)
        assert (limits.account, limits.as_of_sequence) == ("sales", 3)
        assert limits.balance.max_net_credit == 250
        assert not limits.balance.HasField("max_net_debit")
        assert limits.balance.balance == -205
    with pytest.raises(grpc.RpcError) as refused:
        await client.post_entry(ledger, idempotency_key="over", **POST)
    code, reason, metadata = reason_of(refused)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert {k: metadata.get(k) for k in ("account", "asset", "limit", "would_reach")} == {
        "account": "sales",
        "asset": "USD",
        "limit": "max_net_credit",
        "would_reach": "305",
    }
    with pytest.raises(grpc.RpcError) as refused:
        await client.set_account_limits(ledger, "sales", "USD", max_net_credit=100)
    assert reason_of(refused)[1] == "BALANCE_LIMIT_EXCEEDED"
    assert (await client.get_ledger(ledger)).head_sequence == 3  # nothing written

    # A reversal, its replay, and a second reversal refused.
    reversal = await client.reverse_entry(ledger, 1, "r1", description="undo the split")
    assert (reversal.entry.sequence, reversal.entry.reverses_sequence) == (4, 1)
    assert reversal.entry.description == "undo the split" and not reversal.replayed
    assert postings_of(reversal.entry) == [
        ("sales", "cash", 100, "USD"),
        ("tax", "cash", 20, "USD"),
        ("inventory", "stock", 3, "SHARES"),
    ]
    after_4 = [
        ("cash", "USD", 225, 121, 104),
        ("inventory", "SHARES", 3, 3, 0),
        ("sales", "USD", 100, 205, -105),
        ("stock", "SHARES", 3, 3, 0),
        ("tax", "USD", 20, 20, 0),
    ]
    assert totals(reversal.balances) == after_4
    replayed = await client.reverse_entry(ledger, 1, "r1", description="undo the split")
    assert (replayed.entry.sequence, replayed.replayed) == (4, True)
    with pytest.raises(grpc.RpcError) as refused:
        await client.reverse_entry(ledger, 1, "r2")
    code, reason, metadata = reason_of(refused)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_REVERSED")
    assert metadata["reversed_by"] == "4"
    with pytest.raises(grpc.RpcError) as refused:
        await client.reverse_entry(ledger, 99, "r3")
    assert reason_of(refused)[:2] == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")

    # GetEntry by either selector, and a missing entry.
    by_number = (await client.get_entry(ledger, sequence=1)).entry
    assert by_number.idempotency_key == "m1" and postings_of(by_number) == postings_of(first.entry)
    assert by_number.hash == first.entry.hash
    by_key = (await client.get_entry(ledger, idempotency_key="r1")).entry
    assert (by_key.sequence, by_key.reverses_sequence) == (4, 1)
    for missing in ({"sequence": 99}, {"idempotency_key": "never-posted"}):
        with pytest.raises(grpc.RpcError) as refused:
            await client.get_entry(ledger, **missing)
        assert reason_of(refused)[:2] == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")
    for selectors in ({}, {"sequence": 1, "idempotency_key": "m1"}):
        with pytest.raises(ValueError):
            await client.get_entry(ledger, **selectors)

    # Every account, two per page; and one page by hand.
    accounts = await client.accounts(ledger, page_size=2)
    names = ["cash", "fees", "inventory", "sales", "stock", "tax"]
    assert [a.account for a in accounts] == names
    summary = {a.account: a for a in accounts}
    assert summary["sales"].balances[0].max_net_credit == 250
    assert summary["cash"].balances[0].balance == 104
    page = await client.list_accounts(ledger, page_size=2)
    assert [a.account for a in page.accounts] == names[:2]
    assert page.next_page_token and page.as_of_sequence == 4
    page = await client.list_accounts(ledger, page_size=2, page_token=page.next_page_token)
    assert [a.account for a in page.accounts] == names[2:4]

    # An account as of earlier entries, and now.
    expected = {1: (120, 0, 120), 3: (225, 1, 224), 0: (225, 121, 104)}
    for as_of, (debits, credits, balance) in expected.items():
        cash = await client.get_account(ledger, "cash", as_of_sequence=as_of)
        assert cash.as_of_sequence == (as_of or 4)
        usd = cash.balances[0]
        assert (usd.asset, usd.total_debits, usd.total_credits, usd.balance) == (
            "USD",
            debits,
            credits,
            balance,
        )
    then = await client.get_account(ledger, "fees", as_of_sequence=1)
    assert (then.as_of_sequence, list(then.balances)) == (1, [])  # not posted to yet
    with pytest.raises(grpc.RpcError) as refused:
        await client.get_account(ledger, "cash", as_of_sequence=5)
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE

    # The chain verifies over multi-posting entries and the reversal.
    entries = await client.stream_entries(ledger, verify=True)
    assert [(e.sequence, e.reverses_sequence) for e in entries] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    assert (await client.get_ledger(ledger)).head_hash == entries[-1].hash
    resumed = await client.stream_entries(
        ledger, after_sequence=2, verify=True, previous_hash=entries[1].hash
    )
    assert [e.sequence for e in resumed] == [3, 4]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_postings_limits_reversals_lookups_and_listings(
    server: ServerProcess, ledger: str, kind: str
) -> None:
    async def run() -> None:
        if kind == "sync":
            with LedgerClient(server.address) as client:
                await postings_limits_and_reversals(Awaited(client), ledger)
        else:
            async with AsyncLedgerClient(server.address) as aclient:
                await postings_limits_and_reversals(Awaited(aclient), ledger)

    asyncio.run(run())
