"""ListAccounts' page tokens (AIP-158): opaque to clients, checked here.

A token holds the ledger and the last account of the page it follows,
with a checksum over both. The checksum catches a token that was altered
or truncated, and the ledger catches one passed with another ledger; it is
not a secret (a forged token can only start a listing the caller may read
anyway, at another account name).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from ..domain.errors import FieldViolation, InvalidArgument

_VERSION = b"\x01"
_CHECK = 8  # bytes of SHA-256 kept


def _check(body: bytes) -> bytes:
    return hashlib.sha256(b"ledger.v1.ListAccounts\x00" + body).digest()[:_CHECK]


def encode(ledger: str, last_account: str) -> str:
    body = _VERSION + ledger.encode() + b"\x00" + last_account.encode()
    return base64.urlsafe_b64encode(_check(body) + body).decode().rstrip("=")


def decode(ledger: str, token: str) -> str:
    """The account a page starts after ("" for the first page)."""
    if not token:
        return ""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        check, body = raw[:_CHECK], raw[_CHECK:]
        if len(check) != _CHECK or _check(body) != check or body[:1] != _VERSION:
            raise ValueError("checksum")
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            raise ValueError("not the canonical encoding")
        token_ledger, sep, account = body[1:].partition(b"\x00")
        if not sep:
            raise ValueError("layout")
        if token_ledger.decode() != ledger:
            raise InvalidArgument(
                [FieldViolation("page_token", "belongs to another ledger's listing")]
            )
        return account.decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            [FieldViolation("page_token", "is not a token this service issued (altered?)")]
        ) from None
