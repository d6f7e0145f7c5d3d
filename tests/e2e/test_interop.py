"""Clients this project did not write, against a real server: Node with
@grpc/grpc-js loading the .proto at run time (tests/interop/node); and the
TypeScript client package's own test. Both servers have an auth file, so
both clients send a bearer token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger_service.auth.principals import token_digest
from ledger_service.testing import ServerProcess

from ..conftest import missing_requirement
from .conftest import FAST

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"
TOKEN = f"interop-{uuid.uuid4().hex}"  # an admin's: the clients initialize counters


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("interop-auth") / "auth.toml"
    path.write_text(
        f'[[principal]]\nname = "interop"\ntoken_sha256 = ["{token_digest(TOKEN)}"]\n'
        'roles = ["admin"]\n'
    )
    return path


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def secured(request: pytest.FixtureRequest, auth_file: Path) -> Iterator[ServerProcess]:
    """A server with the auth file, per store."""
    url = request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    with ServerProcess(url, extra_args=[*FAST, "--auth-file", str(auth_file)]) as server:
        yield server


def with_token() -> dict[str, str]:
    # In the environment, never on a command line (where `ps` would show it).
    return {**os.environ, "LEDGER_TOKEN": TOKEN}


def _node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = f"run `npm ci` in {NODE_DIR} (make test does)"
    if missing:
        missing_requirement(missing)
    assert node is not None
    return node


def test_a_node_grpc_js_client_posts_replays_streams_and_reads_error_details(
    secured: ServerProcess, ledger: str
) -> None:
    result = subprocess.run(
        [_node(), str(NODE_DIR / "interop.mjs"), secured.address, ledger],
        capture_output=True,
        text=True,
        timeout=120,
        env=with_token(),
    )
    assert result.returncode == 0, result.stderr
    observed = json.loads(result.stdout)
    # Read from the grpc-status-details-bin trailer by a non-Python client.
    assert observed["unauthenticated_reason"] == "UNAUTHENTICATED"  # the call without the token
    assert observed["precondition_reason"] == "COUNTER_NOT_INITIALIZED"
    assert observed["precondition_domain"] == "ledger.v1"
    assert observed["conflict_reason"] == "IDEMPOTENCY_KEY_REUSED"
    # Followed live while posted; int64 above 2^53 exact end to end.
    assert observed["streamed"] == ["1", "2", "3"]
    assert observed["streamed_amounts"] == ["9007199254740993"] * 3
    assert observed["total_debits"] == str(3 * (2**53 + 1))
    assert observed["as_of_sequence"] == "3"


TS_DIR = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def test_the_typescript_client_package_passes_its_tests_against_a_real_server(
    pg_url: str, auth_file: Path
) -> None:
    """clients/typescript: generated messages (protoc-gen-es), the thin client
    over connect-node's gRPC transport, bigint int64, ErrorInfo reasons, the
    token (and UNAUTHENTICATED without it, not retried)."""
    npm = shutil.which("npm")
    if npm is None or not (TS_DIR / "node_modules" / "typescript").is_dir():
        missing_requirement(
            "npm or clients/typescript/node_modules missing (make test runs npm ci)"
        )
    assert npm is not None
    args = [*FAST, "--auth-file", str(auth_file)]
    with ServerProcess(pg_url, extra_args=args) as server:
        result = subprocess.run(
            [npm, "test", "--silent"],
            cwd=TS_DIR,
            env={**with_token(), "LEDGER_ADDRESS": server.address},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 1" in result.stdout and "# fail 0" in result.stdout


def test_the_typescript_client_recomputes_the_shared_chain_vectors() -> None:
    """clients/typescript's integrity.ts against docs/integrity-vectors.json,
    and its verifying stream over a scripted transport (no server)."""
    npm = shutil.which("npm")
    if npm is None or not (TS_DIR / "node_modules" / "typescript").is_dir():
        missing_requirement(
            "npm or clients/typescript/node_modules missing (make test runs npm ci)"
        )
    assert npm is not None
    result = subprocess.run(
        [npm, "run", "--silent", "test:unit"],
        cwd=TS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
