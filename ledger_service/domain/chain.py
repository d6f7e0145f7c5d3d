"""The server's side of the hash chain (docs/integrity.md): the canonical
bytes of an entry it stores, from the one encoding the clients check with
(ledger_client.integrity)."""

from __future__ import annotations

from ledger_client.integrity import (
    GENESIS,
    HASH_SIZE,
    chain_hash,
    entry_body,
    format_version,
    single_posting_body,
)

from .entries import NewEntry

__all__ = ["GENESIS", "HASH_SIZE", "body_of", "chain_hash", "hash_field", "version_of"]

# Entry.hash: field 13, length-delimited, 32 bytes.
_HASH_FIELD_PREFIX = b"\x6a\x20"


def body_of(entry: NewEntry) -> bytes:
    """The canonical bytes after the header (version, sequence, created_at):
    all of the entry that is known before it is numbered."""
    if entry.postings or entry.reverses_sequence:
        return entry_body(
            entry.ledger,
            entry.idempotency_key,
            entry.all_postings(),
            entry.entry_type,
            entry.description,
            entry.metadata,
            entry.posted_by,
            entry.reverses_sequence,
        )
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


def version_of(entry: NewEntry) -> int:
    """The canonical bytes' format version of `entry` (2 for a reversal)."""
    return format_version(entry.reverses_sequence)


def hash_field(entry_hash: bytes) -> bytes:
    """Entry.hash encoded, to follow an entry's stored encoding."""
    return _HASH_FIELD_PREFIX + entry_hash if entry_hash else b""
