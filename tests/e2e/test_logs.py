"""The server's log as JSON lines, read from a real server process's stderr:
failed and slow calls carry their fields; tokens and entry contents never
appear."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2

from ledger_service.auth.principals import token_digest
from ledger_service.testing import ServerProcess

from .conftest import FAST, post_request

TOKEN = f"log-token-{uuid.uuid4().hex}"
UNKNOWN_TOKEN = f"unknown-token-{uuid.uuid4().hex}"
DESCRIPTION = f"private-description-{uuid.uuid4().hex}"
METADATA_VALUE = f"private-metadata-{uuid.uuid4().hex}"
CALL_FIELDS = {"method", "ledger", "principal", "status", "duration_ms"}


@pytest.fixture
def server(pg_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[principal]]\nname = "ops"\ntoken_sha256 = ["{token_digest(TOKEN)}"]\n'
        'roles = ["admin"]\n'
    )
    # 0.001 ms: every call is slow, whatever the machine's speed.
    args = [*FAST, "--auth-file", str(auth), "--log-format", "json", "--slow-call-ms", "0.001"]
    with ServerProcess(pg_url, extra_args=args) as server:
        yield server


def records(server: ServerProcess) -> list[dict[str, Any]]:
    parsed = []
    for line in list(server.lines):
        record = json.loads(line)  # every line is one object
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        parsed.append(record)
    return parsed


def wait_for(server: ServerProcess, found: Any) -> list[dict[str, Any]]:
    """The records once one satisfies `found` (the drain thread reads stderr
    a moment after the server writes it)."""
    deadline = time.monotonic() + 30
    while True:
        logged = records(server)
        if any(found(r) for r in logged) or time.monotonic() > deadline:
            return logged
        time.sleep(0.05)


def test_failed_and_slow_calls_are_logged_as_json_without_secrets(
    server: ServerProcess, ledger: str
) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    stub = server.stub
    stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=ledger), metadata=auth)
    private = {"description": DESCRIPTION, "metadata": {"note": METADATA_VALUE}}
    posted = stub.PostEntry(post_request(ledger, "k1", **private), metadata=auth, timeout=10)
    missing = f"{ledger}-missing"
    with pytest.raises(grpc.RpcError):
        stub.PostEntry(post_request(missing, "k1", **private), metadata=auth, timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        stub.PostEntry(
            post_request(ledger, "k2", **private),
            metadata=(("authorization", f"Bearer {UNKNOWN_TOKEN}"),),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def failed(r: dict[str, Any]) -> bool:
        return r.get("status") == "FAILED_PRECONDITION"

    def slow(r: dict[str, Any]) -> bool:
        return r.get("status") == "OK" and r.get("method") == "PostEntry"

    logged = wait_for(server, failed)
    logged = wait_for(server, slow)
    (failure,) = [r for r in logged if failed(r)]
    assert failure.keys() >= CALL_FIELDS
    assert failure["method"] == "PostEntry"
    assert failure["ledger"] == missing
    assert failure["principal"] == "ops"
    assert failure["reason"] == "COUNTER_NOT_INITIALIZED"
    assert failure["logger"] == "ledger_service.calls"
    assert isinstance(failure["duration_ms"], float)
    (slow_post,) = [r for r in logged if slow(r)]
    assert slow_post["ledger"] == ledger
    assert slow_post["principal"] == "ops"
    assert slow_post["level"] == "WARNING"
    assert posted.entry.sequence == 1

    # The refusal: one line (auth.access's), not two.
    wait_for(server, lambda r: "refused" in r["message"])
    text = "".join(server.lines)
    assert text.count("refused PostEntry") == 1
    assert sum(r.get("status") == "UNAUTHENTICATED" for r in records(server)) == 0
    for secret in (TOKEN, UNKNOWN_TOKEN, DESCRIPTION, METADATA_VALUE):
        assert secret not in text
