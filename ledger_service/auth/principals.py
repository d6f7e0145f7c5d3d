"""Who may call: the principals of the auth file (TOML), found by the digest
of their bearer token or by their mTLS identity; re-read when it changes."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .roles import Role, parse_role

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")


class AuthFileError(ValueError):
    """The auth file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Principal:
    name: str  # recorded with every entry it posts
    roles: tuple[Role, ...]


def token_digest(token: str) -> str:
    """The SHA-256 hex digest the auth file holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principals:
    """The auth file, parsed: two lookups, each one dictionary access."""

    by_digest: Mapping[str, Principal]
    by_tls_identity: Mapping[str, Principal]
    names: frozenset[str]

    @classmethod
    def parse(cls, text: str, source: str = "auth file") -> Principals:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AuthFileError(f"{source}: not valid TOML: {exc}") from None
        entries = data.get("principal", [])
        if not isinstance(entries, list):
            raise AuthFileError(f"{source}: `principal` must be an array of tables")
        unknown = set(data) - {"principal"}
        if unknown:
            raise AuthFileError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        by_digest: dict[str, Principal] = {}
        by_identity: dict[str, Principal] = {}
        names: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"{source}: principal #{i + 1}"
            principal, digests, identities = _principal(entry, where)
            if principal.name in names:
                raise AuthFileError(f"{where}: name {principal.name!r} is used twice")
            names.add(principal.name)
            for digest in digests:
                if digest in by_digest:
                    raise AuthFileError(f"{where}: a token digest is listed twice")
                by_digest[digest] = principal
            for identity in identities:
                if identity in by_identity:
                    raise AuthFileError(f"{where}: tls identity {identity!r} is listed twice")
                by_identity[identity] = principal
        return cls(by_digest, by_identity, frozenset(names))

    def by_token(self, token: str) -> Principal | None:
        return self.by_digest.get(token_digest(token))

    def by_identities(self, identities: Iterable[str]) -> Principal | None:
        for identity in identities:
            principal = self.by_tls_identity.get(identity)
            if principal is not None:
                return principal
        return None


def _principal(entry: Any, where: str) -> tuple[Principal, list[str], list[str]]:
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: must be a table")
    unknown = set(entry) - {"name", "token_sha256", "tls_identities", "roles"}
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AuthFileError(f"{where}: `name` must be 1 to 64 characters of A-Z a-z 0-9 _ . : @ -")
    digests = _strings(entry, "token_sha256", where)
    for digest in digests:
        if not _DIGEST.fullmatch(digest):
            raise AuthFileError(
                f"{where} ({name}): token_sha256 must hold 64 lowercase hex digits each"
                " (`ledger-service hash-token` prints them)"
            )
    identities = _strings(entry, "tls_identities", where)
    if not digests and not identities:
        raise AuthFileError(f"{where} ({name}): needs token_sha256 or tls_identities")
    try:
        roles = tuple(parse_role(r) for r in _strings(entry, "roles", where))
    except ValueError as exc:
        raise AuthFileError(f"{where} ({name}): {exc}") from None
    return Principal(name, roles), digests, identities


def _strings(entry: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthFileError(f"{where}: `{key}` must be a list of strings")
    return value


class AuthFile:
    """The principals of one file, re-read when it changes (reload()): a
    broken file keeps the last good principals and logs why, once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._stamp()
        self.principals = self._parse()  # at start, a broken file is fatal

    def _stamp(self) -> tuple[int, int]:
        try:
            stat = os.stat(self.path)
        except OSError:
            return (-1, -1)
        return stat.st_mtime_ns, stat.st_size

    def _parse(self) -> Principals:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise AuthFileError(f"{self.path}: cannot be read ({exc.strerror})") from None
        return Principals.parse(text, str(self.path))

    def reload(self, *, force: bool = False) -> bool:
        """Re-reads the file if it changed since it was last read (or
        `force`); True if the principals were replaced."""
        stamp = self._stamp()
        if not force and stamp == self._seen:
            return False
        self._seen = stamp  # a broken file is reported once, until it changes
        try:
            principals = self._parse()
        except AuthFileError as exc:
            log.warning("auth file not reloaded, keeping the last good one: %s", exc)
            return False
        self.principals = principals
        log.info("auth file reloaded: %d principals", len(principals.names))
        return True
