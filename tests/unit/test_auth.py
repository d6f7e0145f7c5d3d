"""Principals, roles and the one table of what each RPC needs (auth/)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from ledger.v1 import ledger_pb2

from ledger_service.auth.access import bearer_token
from ledger_service.auth.principals import AuthFile, AuthFileError, Principals, token_digest
from ledger_service.auth.roles import NEEDS, Access, parse_role
from ledger_service.auth.tokens import new_token

TOKEN_A, TOKEN_B = "token-a", "token-b"

GOOD = f"""
[[principal]]
name = "payments-api"
token_sha256 = ["{token_digest(TOKEN_A)}", "{token_digest(TOKEN_B)}"]
roles = ["writer:books"]

[[principal]]
name = "ops"
tls_identities = ["ops.example.internal"]
roles = ["admin"]
"""


def test_every_method_of_the_service_needs_something() -> None:
    """A method a later issue adds cannot slip through: without an entry it
    would be refused to everyone, and this test fails first."""
    methods = {m.name for m in ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].methods}
    assert set(NEEDS) == methods


def test_a_principal_is_found_by_any_of_its_tokens_or_by_its_tls_identity() -> None:
    principals = Principals.parse(GOOD)
    a, b = principals.by_token(TOKEN_A), principals.by_token(TOKEN_B)
    assert a is not None and a is b and a.name == "payments-api"
    assert principals.by_token("guess") is None
    ops = principals.by_identities(["stranger", "ops.example.internal"])
    assert ops is not None and ops.name == "ops"
    assert principals.names == {"payments-api", "ops"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('name = "payments-api"', "`name` must be"),
        (f'"{token_digest(TOKEN_A)}"', "token_sha256 must hold 64 lowercase hex digits"),
        ('roles = ["writer:books"]', "role 'writer:': must be"),
        ('tls_identities = ["ops.example.internal"]', "needs token_sha256 or tls_identities"),
        ('roles = ["admin"]', "unknown key(s) role"),
    ],
)
def test_a_broken_file_is_refused_naming_the_principal_and_what_is_wrong(
    change: str, message: str
) -> None:
    broken = {
        'name = "payments-api"': 'name = "no spaces allowed"',
        f'"{token_digest(TOKEN_A)}"': '"not-a-digest"',
        'roles = ["writer:books"]': 'roles = ["writer:"]',
        'tls_identities = ["ops.example.internal"]': "",
        'roles = ["admin"]': 'role = ["admin"]',
    }[change]
    with pytest.raises(AuthFileError, match=rf"principal #\d.*{re.escape(message)}"):
        Principals.parse(GOOD.replace(change, broken))


def test_names_digests_and_identities_are_each_used_once() -> None:
    twice = GOOD + GOOD
    with pytest.raises(AuthFileError, match="used twice"):
        Principals.parse(twice)
    with pytest.raises(AuthFileError, match="not valid TOML"):
        Principals.parse("[[principal]\n")


@pytest.mark.parametrize(
    ("role", "need", "ledger", "granted"),
    [
        ("admin", Access.ADMIN, "books", True),
        ("admin", Access.WRITE, "any", True),
        ("writer:books", Access.WRITE, "books", True),
        ("writer:books", Access.READ, "books", True),  # a writer reads what it writes
        ("writer:books", Access.WRITE, "other", False),
        ("writer:books", Access.ADMIN, "books", False),
        ("writer:*", Access.WRITE, "other", True),
        ("reader:books", Access.READ, "books", True),
        ("reader:books", Access.WRITE, "books", False),
        ("reader:*", Access.READ, "any", True),
        ("reader:*", Access.ADMIN, "any", False),
    ],
)
def test_roles_grant_exactly_their_table(
    role: str, need: Access, ledger: str, granted: bool
) -> None:
    assert parse_role(role).grants(need, ledger) is granted


@pytest.mark.parametrize("role", ["root", "writer", "writer:", "reader:bad name", "admin:books"])
def test_a_role_outside_the_grammar_is_refused(role: str) -> None:
    with pytest.raises(ValueError, match="must be admin, writer:<ledger> or reader:<ledger>"):
        parse_role(role)


def test_the_bearer_token_is_read_from_the_authorization_header_only() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("x-token", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_new_tokens_are_256_bit_and_distinct() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 43 for t in tokens)  # 32 bytes, URL-safe base64
    assert len(token_digest(next(iter(tokens)))) == 64


def test_the_file_is_reread_when_it_changes_and_a_broken_one_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(GOOD)
    auth = AuthFile(path)
    assert not auth.reload()  # unchanged
    path.write_text(GOOD.replace(f', "{token_digest(TOKEN_B)}"', ""))  # B revoked
    _touch(path)
    assert auth.reload()
    assert auth.principals.by_token(TOKEN_B) is None
    assert auth.principals.by_token(TOKEN_A) is not None
    caplog.set_level(logging.WARNING)
    path.write_text("[[principal]\n")
    _touch(path)
    assert not auth.reload()
    assert auth.principals.by_token(TOKEN_A) is not None  # the last good one
    assert "keeping the last good one" in caplog.text
    caplog.clear()
    assert not auth.reload()  # reported once, until it changes again
    assert caplog.text == ""
    path.write_text(GOOD)
    assert auth.reload(force=True)
    assert auth.principals.by_token(TOKEN_B) is not None


def test_a_broken_file_at_start_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="cannot be read"):
        AuthFile(tmp_path / "missing.toml")


def _touch(path: Path) -> None:
    """A later mtime, even on file systems with coarse timestamps."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
