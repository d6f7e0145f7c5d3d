"""Operators' tools against a real server, through reflection only: the README's
grpcurl and buf curl lines are run exactly as written, from the repo root
(address substituted)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from ledger_service.auth.principals import token_digest
from ledger_service.auth.tokens import new_token
from ledger_service.testing import ServerProcess

from ..conftest import migrated

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README_ADDRESS = "127.0.0.1:50051"
# The README writes the tools as `make venv` installs them, so its lines work
# pasted in the repo root.
README_BIN = ".venv/bin/"

# What each README line must print, in order (grpcurl keeps proto field names,
# buf curl prints lowerCamelCase JSON). The zero values ("value": "0",
# "created": false, ...) show only because the lines ask for -emit-defaults.
EXPECTED = [
    [
        "ledger.v1.LedgerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ],
    ['"status": "SERVING"'],
    ['"ledger": "demo"', '"value": "0"', '"created": true'],
    [
        '"sequence": "1"',
        '"idempotency_key": "order-1001"',
        '"amount": "1250"',
        '"order": "1001"',
        '"replayed": false',
    ],
    ['"sequence": "2"', '"sequence": "3"', '"idempotency_key": "order-1004"', '"replayed": false'],
    [
        '"asset": "USD"',
        '"total_debits": "1280"',
        '"total_credits": "0"',
        '"balance": "1280"',
        '"as_of_sequence": "3"',
    ],
    ['"sequence": "1"', '"sequence": "3"', '"caught_up": true', '"heartbeat": false', '"hash": "'],
    ['"head_sequence": "3"', '"head_hash": "', '"initialized_by": ""'],
    [
        "ledger.v1.LedgerService/PostEntry",
        "ledger.v1.LedgerService/StreamEntries",
        "ledger.v1.LedgerService/GetLedger",
    ],
    ['"value": "3"', '"created": false'],
    ['"sequence": "4"', '"idempotencyKey": "order-1002"', '"replayed": false'],
    ['"totalDebits": "0"', '"totalCredits": "1379"', '"balance": "-1379"', '"asOfSequence": "4"'],
    ['"sequence": "2"', '"sequence": "4"', '"caughtUp": true'],
    ['"sequence": "5"', '"account": "tax"', '"balance": "-100"', '"debit_account": ""'],
    ['"account": "sales"', '"max_net_debit": "0"', '"balance": "-2279"'],
    ['"sequence": "6"', '"reverses_sequence": "5"', '"replayed": false'],
    ['"sequence": "5"', '"idempotency_key": "order-1005"', '"credit_account": "tax"'],
    ['"account": "cash"', '"account": "sales"', '"next_page_token": "', '"as_of_sequence": "6"'],
    ['"total_debits": "1280"', '"as_of_sequence": "3"'],
    ['"sequence": "5"', '"sequence": "6"', '"caught_up": true', '"through_sequence": "6"'],
    ['"sequence": "3"', '"head_sequence": "6"', '"acked_at": "'],
    ['"consumer": "projection"', '"sequence": "3"', '"lag": "3"', '"head_sequence": "6"'],
    ['"sequence": "4"', '"sequence": "6"', '"through_sequence": "6"'],
]


SECURE_ADDRESS = "localhost:50051"
SECURE_EXPECTED = [
    ["ledger.v1.LedgerService", "grpc.health.v1.Health"],
    ['"ledger": "demo"', '"value": "0"', '"created": true', '"initialized_by": "ops"'],
    [
        '"sequence": "1"',
        '"idempotency_key": "order-2001"',
        '"posted_by": "ops"',
        '"replayed": false',
    ],
    ['"totalDebits": "500"', '"totalCredits": "0"', '"asOfSequence": "1"'],
]


def readme_examples(block: str = "examples") -> list[str]:
    """The commands of a README block: every line but the fence, blanks and `export`."""
    text = (ROOT / "README.md").read_text()
    block_text = text.split(f"<!-- {block}:begin", 1)[1].split("-->", 1)[1]
    lines = block_text.split(f"<!-- {block}:end -->", 1)[0]
    commands = [
        line
        for line in lines.splitlines()
        if line.strip() and not line.startswith(("```", "export "))
    ]
    for command in commands:
        assert command.startswith(README_BIN), f"not runnable as pasted: {command}"
    return commands


def tool_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    # The README's .venv/bin is this interpreter's bin when pytest runs from
    # .venv, as `make test` does; from another venv, that venv's tools.
    argv[0] = str(BIN / argv[0].removeprefix(README_BIN))
    return argv


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(migrated(f"sqlite:///{tmp_path / 'tools.sqlite3'}")) as server:
        yield server


def run(command: str, server: ServerProcess) -> subprocess.CompletedProcess[str]:
    argv = tool_argv(command.replace(README_ADDRESS, server.address))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_readme_grpcurl_and_buf_curl_examples_work_as_written(fresh_server: ServerProcess) -> None:
    examples = readme_examples()
    assert len(examples) == len(EXPECTED), "update EXPECTED along with the README"
    for command, expected in zip(examples, EXPECTED, strict=True):
        result = run(command, fresh_server)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        for fragment in expected:
            assert fragment in result.stdout, f"{command}\n{result.stdout}"


def test_readme_token_and_tls_examples_work_as_written(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    token = new_token()
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[principal]]\nname = "ops"\ntoken_sha256 = ["{token_digest(token)}"]\n'
        'roles = ["admin"]\n'
    )
    url = migrated(f"sqlite:///{tmp_path / 'tools.sqlite3'}")
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth)]
    examples = readme_examples("secure-examples")
    assert len(examples) == len(SECURE_EXPECTED), "update SECURE_EXPECTED along with the README"
    with ServerProcess(url, extra_args=args) as server:
        for command, expected in zip(examples, SECURE_EXPECTED, strict=True):
            line = command.replace(SECURE_ADDRESS, f"localhost:{server.port}")
            # ca.pem is in the repo root for a reader; this test keeps it in tmp_path.
            line = line.replace(" ca.pem ", f" {tmp_path / 'ca.pem'} ")
            argv = tool_argv(line.replace("$LEDGER_TOKEN", token))
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            for fragment in expected:
                assert fragment in result.stdout, f"{command}\n{result.stdout}"
            assert token not in result.stderr


def test_grpcurl_reads_the_error_info_of_a_post_before_initialize(
    fresh_server: ServerProcess,
) -> None:
    request = (
        '{"ledger": "nowhere", "idempotency_key": "k", "debit_account": "a",'
        ' "credit_account": "b", "amount": "1", "asset": "USD"}'
    )
    result = run(
        f"{README_BIN}grpcurl -plaintext -d '{request}' {README_ADDRESS}"
        " ledger.v1.LedgerService/PostEntry",
        fresh_server,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "FailedPrecondition" in output
    assert re.search(r'"reason":\s*"COUNTER_NOT_INITIALIZED"', output), output
    assert '"domain":"ledger.v1"' in output.replace(" ", "")


def test_grpcurl_describes_the_contract_through_reflection(fresh_server: ServerProcess) -> None:
    result = run(
        f"{README_BIN}grpcurl -plaintext {README_ADDRESS} describe ledger.v1.PostEntryRequest",
        fresh_server,
    )
    assert result.returncode == 0, result.stderr
    assert "int64 amount = 6;" in result.stdout
    assert "map<string, string> metadata = 10;" in result.stdout
