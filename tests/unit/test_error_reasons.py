"""The error reasons agree everywhere they are written down: the README's
error table, the edge's one table (api/errors.py) and the contract's
ErrorReason enum; and the reason strings on the wire never change."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ledger.v1 import ledger_pb2

import ledger_service
from ledger_service.api.errors import ERRORS, reason_name
from ledger_service.domain.errors import LedgerError

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ERROR_REASON_"

# Clients in other languages compare these exact strings: never change one.
WIRE_REASONS = {
    "INVALID_FIELD",
    "COUNTER_NOT_INITIALIZED",
    "IDEMPOTENCY_KEY_REUSED",
    "ACCOUNT_TOTAL_OVERFLOW",
    "POSITION_AHEAD_OF_LEDGER",
    "STORAGE_UNAVAILABLE",
    "SERVER_SHUTTING_DOWN",
    "TOO_MANY_PENDING_POSTS",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "TOO_MANY_STREAMS",
    "BALANCE_LIMIT_EXCEEDED",
    "ALREADY_REVERSED",
    "ENTRY_NOT_FOUND",
    "STANDBY_BEHIND",
    "CONSUMER_POSITION_BEHIND",
}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def readme_rows() -> list[tuple[str, str]]:
    """(status, reason) of each row of the table under README's "## Errors"."""
    section = (ROOT / "README.md").read_text().split("\n## Errors\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    table: list[str] = []
    for line in section.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break  # the first table only
    assert _cells(table[0]) == ["status", "reason", "when", "retry?"]
    assert all(set(c) <= set("-: ") for c in _cells(table[1])), table[1]
    rows = []
    for line in table[2:]:
        status, reason, *rest = _cells(line)
        assert len(rest) == 2, line
        code, name = re.fullmatch(r"`([A-Z_]+)`", status), re.fullmatch(r"`([A-Z_]+)`", reason)
        assert code and name, line
        rows.append((code[1], name[1]))
    return rows


def table_rows() -> set[tuple[str, str]]:
    return {(row.code.name, reason_name(row.reason)) for row in ERRORS.values()}


def enum_reasons() -> set[str]:
    names = [
        n for n, v in ledger_pb2.ErrorReason.items() if v != ledger_pb2.ERROR_REASON_UNSPECIFIED
    ]
    assert all(n.startswith(PREFIX) for n in names), names
    return {n.removeprefix(PREFIX) for n in names}


def test_the_readme_table_is_the_edge_table() -> None:
    rows = readme_rows()
    assert len(rows) == len(set(rows)), "a README row is repeated"
    assert set(rows) == table_rows()


def test_the_reasons_are_the_enum_values_and_never_change() -> None:
    reasons = {reason for _, reason in table_rows()}
    assert reasons == enum_reasons()
    assert reasons == WIRE_REASONS


def test_every_reason_but_unspecified_is_exactly_one_rows() -> None:
    used = Counter(row.reason for row in ERRORS.values())
    expected = set(ledger_pb2.ErrorReason.values()) - {ledger_pb2.ERROR_REASON_UNSPECIFIED}
    assert set(used) == expected
    assert all(count == 1 for count in used.values()), used


def _subclasses(cls: type[LedgerError]) -> Iterator[type[LedgerError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_the_server_defines_has_a_row() -> None:
    # Import every module, so that no LedgerError subclass stays unseen.
    for module in pkgutil.walk_packages(ledger_service.__path__, "ledger_service."):
        if ".migrations" not in module.name and not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    defined = {c for c in _subclasses(LedgerError) if c.__module__.startswith("ledger_service.")}
    assert defined - set(ERRORS) == set()


def test_each_enum_comment_names_the_status_code_of_its_row() -> None:
    proto = (ROOT / "protos/ledger/v1/ledger.proto").read_text()
    body = proto.split("enum ErrorReason {", 1)[1].split("\n}", 1)[0]
    code_of = {reason_name(row.reason): row.code.name for row in ERRORS.values()}
    comment: list[str] = []
    documented = {}
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("//"):
            # Stripped, so "Status" ending one line and its code starting
            # the next read as "Status CODE".
            comment.append(line.removeprefix("//").strip())
        elif value := re.fullmatch(rf"{PREFIX}([A-Z_]+) = \d+;", line):
            documented[value[1]] = re.findall(r"\bStatus ([A-Z_]+)", " ".join(comment))
            comment = []
    assert documented.pop("UNSPECIFIED") == []
    assert documented == {reason: [code] for reason, code in code_of.items()}


def test_the_domain_imports_nothing_generated_or_grpc() -> None:
    for path in sorted((ROOT / "ledger_service" / "domain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            roots = {m.split(".")[0] for m in modules}
            assert not roots & {"grpc", "grpc_status", "google", "ledger"}, path
