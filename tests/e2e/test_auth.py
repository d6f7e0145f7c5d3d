"""Who may do what, through a real server with an auth file: every role
against every RPC, tokens missing, unknown, rotated and revoked, the file
reloaded without a restart, and secure by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ledger.v1 import ledger_pb2

from ledger_service.auth.principals import token_digest
from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

from ..conftest import hold_row_lock, lock_waiters_when
from .conftest import FAST, batch_request, details, post_request
from .traffic import stored_entries

BOOKS = f"books-{uuid.uuid4().hex[:8]}"
OTHER = f"other-{uuid.uuid4().hex[:8]}"

# principal -> (its token, its roles)
PRINCIPALS = {
    "admin": ["admin"],
    "writer-books": [f"writer:{BOOKS}"],
    "writer-all": ["writer:*"],
    "reader-books": [f"reader:{BOOKS}"],
    "reader-all": ["reader:*"],
    "writer-other": [f"writer:{OTHER}"],
    "nobody": [],
}
TOKENS = {name: f"token-of-{name}-{uuid.uuid4().hex}" for name in PRINCIPALS}
ROTATING = [f"rotating-old-{uuid.uuid4().hex}", f"rotating-new-{uuid.uuid4().hex}"]

WRITERS = {"admin", "writer-books", "writer-all"}
READERS = WRITERS | {"reader-books", "reader-all"}
ALLOWED = {
    "InitializeCounter": {"admin"},
    "PostEntry": WRITERS,
    "PostEntries": WRITERS,
    "StreamEntries": READERS,
    "GetAccount": READERS,
    "GetLedger": READERS,
    "ListAccounts": READERS,
    "AckEntries": READERS,
    "ListConsumers": READERS,
}


def auth_toml(tokens: dict[str, str], rotating: list[str]) -> str:
    blocks = [
        f'[[principal]]\nname = "{name}"\ntoken_sha256 = ["{token_digest(tokens[name])}"]\n'
        f"roles = {roles!r}\n".replace("'", '"')
        for name, roles in PRINCIPALS.items()
    ]
    digests = ", ".join(f'"{token_digest(t)}"' for t in rotating)
    blocks.append(f'[[principal]]\nname = "rotating"\ntoken_sha256 = [{digests}]\nroles = []\n')
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(auth_toml(TOKENS, ROTATING))
    return path


@pytest.fixture(scope="module")
def secured(pg_url: str, auth_file: Path) -> Iterator[ServerProcess]:
    with ServerProcess(pg_url, extra_args=[*FAST, "--auth-file", str(auth_file)]) as server:
        for ledger in (BOOKS, OTHER):
            call(server, "InitializeCounter", TOKENS["admin"], ledger)
        yield server


def credentials(token: str | None) -> tuple[tuple[str, str | bytes], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def call(server: ServerProcess, rpc: str, token: str | None, ledger: str = BOOKS) -> Any:
    """One call of `rpc` on `ledger` with `token`; raises grpc.RpcError."""
    stub = server.stub
    metadata = credentials(token)
    key = f"{rpc}-{uuid.uuid4().hex}"
    if rpc == "InitializeCounter":
        request: Any = ledger_pb2.InitializeCounterRequest(ledger=ledger)
        return stub.InitializeCounter(request, metadata=metadata, timeout=10)
    if rpc == "PostEntry":
        return stub.PostEntry(post_request(ledger, key), metadata=metadata, timeout=10)
    if rpc == "PostEntries":
        return stub.PostEntries(batch_request(ledger, [key]), metadata=metadata, timeout=10)
    if rpc == "GetAccount":
        request = ledger_pb2.GetAccountRequest(ledger=ledger, account="cash")
        return stub.GetAccount(request, metadata=metadata, timeout=10)
    if rpc == "GetLedger":
        request = ledger_pb2.GetLedgerRequest(ledger=ledger)
        return stub.GetLedger(request, metadata=metadata, timeout=10)
    if rpc == "ListAccounts":
        request = ledger_pb2.ListAccountsRequest(ledger=ledger)
        return stub.ListAccounts(request, metadata=metadata, timeout=10)
    if rpc == "AckEntries":
        request = ledger_pb2.AckEntriesRequest(ledger=ledger, consumer="audit", sequence=0)
        return stub.AckEntries(request, metadata=metadata, timeout=10)
    if rpc == "ListConsumers":
        request = ledger_pb2.ListConsumersRequest(ledger=ledger)
        return stub.ListConsumers(request, metadata=metadata, timeout=10)
    assert rpc == "StreamEntries"
    request = ledger_pb2.StreamEntriesRequest(ledger=ledger)
    return list(stub.StreamEntries(request, metadata=metadata, timeout=10))


@pytest.mark.parametrize("rpc", sorted(ALLOWED))
@pytest.mark.parametrize("principal", sorted(PRINCIPALS))
def test_every_role_against_every_rpc(secured: ServerProcess, principal: str, rpc: str) -> None:
    before = stored_entries(secured.database_url, BOOKS)
    if principal in ALLOWED[rpc]:
        call(secured, rpc, TOKENS[principal])
        return
    with pytest.raises(grpc.RpcError) as error:
        call(secured, rpc, TOKENS[principal])
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(error.value)[0].reason == "PERMISSION_DENIED"
    message = error.value.details() or ""
    assert f"{principal} may not call {rpc} on ledger {BOOKS!r}: needs" in message
    assert ("admin" if rpc == "InitializeCounter" else f"writer:{BOOKS} or admin") in message
    assert stored_entries(secured.database_url, BOOKS) == before  # a refusal writes nothing


def test_a_writer_of_one_ledger_cannot_post_to_another_and_burns_no_number(
    secured: ServerProcess,
) -> None:
    before = stored_entries(secured.database_url, OTHER)
    for token in (TOKENS["writer-books"], TOKENS["reader-all"]):
        with pytest.raises(grpc.RpcError) as error:
            call(secured, "PostEntry", token, OTHER)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stored_entries(secured.database_url, OTHER) == before
    posted = call(secured, "PostEntry", TOKENS["writer-other"], OTHER)
    assert posted.entry.sequence == before[0] + 1  # the next number, none skipped


@pytest.mark.parametrize("rpc", sorted(ALLOWED))
@pytest.mark.parametrize("token", [None, "not-a-known-token"], ids=["none", "unknown"])
def test_without_a_known_token_every_rpc_is_unauthenticated(
    secured: ServerProcess, rpc: str, token: str | None
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(secured, rpc, token)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(error.value)[0].reason == "UNAUTHENTICATED"


def test_a_refused_stream_ends_before_its_first_message(secured: ServerProcess) -> None:
    request = ledger_pb2.StreamEntriesRequest(ledger=BOOKS, follow=True)
    received = []
    with pytest.raises(grpc.RpcError) as error:
        for message in secured.stub.StreamEntries(request, timeout=10):
            received.append(message)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert received == []


def test_health_and_reflection_stay_open(secured: ServerProcess) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    grpcurl = Path(sys.executable).parent / "grpcurl"
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", secured.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ledger.v1.LedgerService" in listed.stdout, listed.stderr


def test_refusals_are_logged_with_who_and_why_and_never_a_token(secured: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError):
        call(secured, "PostEntry", None)
    with pytest.raises(grpc.RpcError):
        call(secured, "InitializeCounter", TOKENS["reader-all"])
    deadline = time.monotonic() + 10
    while True:
        log = "".join(secured.lines)
        if "refused InitializeCounter from reader-all" in log:
            break
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.05)
    assert "refused PostEntry from anonymous (ipv4:127.0.0.1:" in log
    assert not any(token in log for token in [*TOKENS.values(), *ROTATING])


def test_tokens_rotate_and_a_revoked_one_is_refused_on_its_next_call_without_a_restart(
    pg_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_toml(TOKENS, ROTATING))
    with ServerProcess(pg_url, extra_args=[*FAST, "--auth-file", str(path)]) as server:
        call(server, "InitializeCounter", TOKENS["admin"])
        health = health_pb2_grpc.HealthStub(server.channel)
        for metadata in map(credentials, ROTATING):  # both digests of one principal
            with pytest.raises(grpc.RpcError) as error:
                server.stub.GetAccount(
                    ledger_pb2.GetAccountRequest(ledger=BOOKS, account="cash"),
                    metadata=metadata,
                    timeout=10,
                )
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # known, no role
        # Revoke the old token by editing the file: refused from its next call on.
        path.write_text(auth_toml(TOKENS, ROTATING[1:]))
        wait_for_code(server, ROTATING[0], grpc.StatusCode.UNAUTHENTICATED)
        call(server, "PostEntry", TOKENS["writer-books"])  # the same connection still serves
        # A broken file keeps the last good one.
        path.write_text("[[principal]\n")
        wait_for_log(server, "auth file not reloaded, keeping the last good one")
        call(server, "PostEntry", TOKENS["writer-books"])
        # SIGHUP re-reads the file even when nothing about it looks changed.
        path.write_text(auth_toml(TOKENS, ROTATING))
        wait_for_code(server, ROTATING[0], grpc.StatusCode.PERMISSION_DENIED)
        stat = path.stat()
        revoked = auth_toml({**TOKENS, "writer-books": "x" * len(TOKENS["writer-books"])}, ROTATING)
        assert len(revoked) == stat.st_size
        path.write_text(revoked)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
        time.sleep(3)  # the poller sees nothing to re-read...
        call(server, "PostEntry", TOKENS["writer-books"])
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)  # ...SIGHUP re-reads it anyway
        wait_for_code(server, TOKENS["writer-books"], grpc.StatusCode.UNAUTHENTICATED)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving


def wait_for_code(server: ServerProcess, token: str, code: grpc.StatusCode) -> None:
    """Calls GetAccount with `token` until it fails with `code` (the file is
    re-read within a few seconds)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            call(server, "GetAccount", token)
            got = None
        except grpc.RpcError as exc:
            got = exc.code()
        if got == code:
            return
        assert time.monotonic() < deadline, f"still {got}, not {code}"
        time.sleep(0.1)


def wait_for_log(server: ServerProcess, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in "".join(server.lines):
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.1)


def test_serve_refuses_a_non_loopback_address_without_auth_unless_insecure(
    sqlite_url: str,
) -> None:
    with pytest.raises(RuntimeError, match=r"refusing to serve 0\.0\.0\.0:0 without auth"):
        ServerProcess(sqlite_url, extra_args=["--listen", "0.0.0.0:0"]).start()
    with ServerProcess(sqlite_url, extra_args=["--listen", "0.0.0.0:0", "--insecure"]) as server:
        assert "auth is off (--insecure)" in "".join(server.lines)
    with ServerProcess(sqlite_url) as server:  # loopback, as make run: open, and says so
        warnings = [line for line in server.lines if "auth is off" in line]
        assert len(warnings) == 1 and "loopback only" in warnings[0]


def test_new_token_and_hash_token_agree(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "ledger_service", "new-token"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert made[0] == "token:" and made[2] == "sha256:"
    token, digest = made[1], made[3]
    hashed = subprocess.run(
        [sys.executable, "-m", "ledger_service", "hash-token"],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert hashed == digest == token_digest(token)


def test_entries_record_who_posted_them_and_a_replay_keeps_the_original(
    secured: ServerProcess,
) -> None:
    one = call(secured, "PostEntry", TOKENS["writer-books"]).entry
    batch = call(secured, "PostEntries", TOKENS["writer-all"]).results
    assert one.posted_by == "writer-books"
    assert [r.entry.posted_by for r in batch] == ["writer-all"]
    again = secured.stub.PostEntry(
        post_request(BOOKS, one.idempotency_key),
        metadata=credentials(TOKENS["admin"]),
        timeout=10,
    )
    assert (again.replayed, again.entry.posted_by) == (True, "writer-books")
    streamed = {
        e.sequence: e.posted_by
        for m in call(secured, "StreamEntries", TOKENS["reader-books"])
        for e in m.entries
    }
    assert streamed[one.sequence] == "writer-books"  # in the stored encoding too
    assert streamed[batch[0].entry.sequence] == "writer-all"


def test_a_request_cannot_say_who_posted_it(secured: ServerProcess) -> None:
    """posted_by is reserved in the requests: sent anyway (as field 12, as a
    client built from another contract would), it is dropped."""
    forged = post_request(BOOKS, f"forged-{uuid.uuid4().hex}").SerializeToString()
    forged += b"\x62\x07mallory"  # Entry.posted_by = "mallory"
    post = secured.channel.unary_unary(
        "/ledger.v1.LedgerService/PostEntry",
        request_serializer=lambda raw: raw,
        response_deserializer=ledger_pb2.PostEntryResponse.FromString,
    )
    response = post(forged, metadata=credentials(TOKENS["writer-books"]), timeout=10)
    assert response.entry.posted_by == "writer-books"


def test_one_group_commit_records_each_posters_own_name(
    pg_url: str, secured: ServerProcess
) -> None:
    """Two principals' posts queued behind a locked counter go out as one
    transaction (one created_at), each with its own posted_by."""
    engine = create_engine(pg_url, pool_size=1)
    grouped = False
    try:
        for _ in range(5):  # the two must both be queued when the lock goes
            b, c = _two_posts_queued_behind_a_lock(engine, secured)
            assert (b.posted_by, c.posted_by) == ("writer-books", "writer-all")
            with engine.connect() as conn:  # the column, not only the stored encoding
                stored: dict[int, str] = dict(
                    conn.exec_driver_sql(
                        "SELECT sequence, posted_by FROM ledger_entries"
                        " WHERE ledger = %(l)s AND sequence IN (%(b)s, %(c)s)",
                        {"l": BOOKS, "b": b.sequence, "c": c.sequence},
                    ).all()
                )
            assert stored == {b.sequence: "writer-books", c.sequence: "writer-all"}
            if b.created_at == c.created_at:
                grouped = True
                break
    finally:
        engine.dispose()
    assert grouped, "the two posts never shared a transaction"


def _two_posts_queued_behind_a_lock(engine: Any, server: ServerProcess) -> list[Any]:
    with engine.connect() as conn:
        hold_row_lock(conn, BOOKS)
        first = server.stub.PostEntry.future(
            post_request(BOOKS, f"first-{uuid.uuid4().hex}"),
            metadata=credentials(TOKENS["admin"]),
            timeout=30,
        )
        assert lock_waiters_when(engine, 1, timeout=10) == 1  # in flight: the rest queue
        queued = [
            server.stub.PostEntry.future(
                post_request(BOOKS, f"{who}-{uuid.uuid4().hex}"),
                metadata=credentials(TOKENS[who]),
                timeout=30,
            )
            for who in ("writer-books", "writer-all")
        ]
        time.sleep(0.5)  # time to reach the server's queue
        conn.rollback()
    first.result()
    return [f.result().entry for f in queued]


def test_initialize_counter_records_who_created_it_and_when(secured: ServerProcess) -> None:
    ledger = f"created-{uuid.uuid4().hex[:8]}"
    created = call(secured, "InitializeCounter", TOKENS["admin"], ledger)
    assert (created.created, created.initialized_by) == (True, "admin")
    assert created.initialized_at.seconds > 0
    again = call(secured, "InitializeCounter", TOKENS["admin"], ledger)
    assert (again.created, again.initialized_by) == (False, "admin")
    assert again.initialized_at == created.initialized_at
