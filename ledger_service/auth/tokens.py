"""Bearer tokens: made here, handed to a client once; the auth file keeps
only their SHA-256 digests (`ledger-service new-token | hash-token`)."""

from __future__ import annotations

import secrets

from .principals import token_digest

TOKEN_BYTES = 32  # 256 bits


def new_token() -> str:
    """A fresh random token, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


__all__ = ["new_token", "token_digest"]
