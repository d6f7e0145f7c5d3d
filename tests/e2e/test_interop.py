"""Clients this project did not write, against a real server: Node with
@grpc/grpc-js loading the .proto at run time (tests/interop/node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ledger_service.testing import ServerProcess

from ..conftest import missing_requirement

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"


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
    server: ServerProcess, ledger: str
) -> None:
    result = subprocess.run(
        [_node(), str(NODE_DIR / "interop.mjs"), server.address, ledger],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    observed = json.loads(result.stdout)
    # Read from the grpc-status-details-bin trailer by a non-Python client.
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
    pg_server: ServerProcess,
) -> None:
    """clients/typescript: generated messages (protoc-gen-es), the thin client
    over connect-node's gRPC transport, bigint int64, ErrorInfo reasons."""
    npm = shutil.which("npm")
    if npm is None or not (TS_DIR / "node_modules" / "typescript").is_dir():
        missing_requirement(
            "npm or clients/typescript/node_modules missing (make test runs npm ci)"
        )
    assert npm is not None
    result = subprocess.run(
        [npm, "test", "--silent"],
        cwd=TS_DIR,
        env={**os.environ, "LEDGER_ADDRESS": pg_server.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 1" in result.stdout and "# fail 0" in result.stdout
