"""The server's side of the hash chain (docs/integrity.md): the canonical
bytes of an entry it stores, from the one encoding the clients check with
(ledger_client.integrity)."""

from __future__ import annotations

from ledger_client.integrity import GENESIS, HASH_SIZE, chain_hash, single_posting_body

from .entries import NewEntry

__all__ = ["GENESIS", "HASH_SIZE", "body_of", "chain_hash", "hash_field"]

# Entry.hash: field 13, length-delimited, 32 bytes.
_HASH_FIELD_PREFIX = b"\x6a\x20"


def body_of(entry: NewEntry) -> bytes:
    """The canonical bytes after the header (sequence, created_at): all of
    the entry that is known before it is numbered."""
    return single_posting_body(
        entry.ledger,
        entry.idempotency_key,
        entry.debit_account,
        entry.credit_account,
        entry.amount,
        entry.asset,
        entry.entry_type,
        entry.description,
        entry.metadata,
        entry.posted_by,
    )


def hash_field(entry_hash: bytes) -> bytes:
    """Entry.hash encoded, to follow an entry's stored encoding."""
    return _HASH_FIELD_PREFIX + entry_hash if entry_hash else b""
