"""The stored wire form of an entry, so streams do not rebuild every message.

Entries never change, so each entry's `ledger.v1.Entry` encoding, minus the two
fields only the database knows (sequence, created_at), is computed once when
it is written and stored beside the columns (`ledger_entries.wire`), its
`hash` (field 13) appended by the write statement that chains it. Messages
of many entries are then made by one parse of the concatenated payloads (with
their field tags) plus two fields set per entry, instead of a Python message
built field by field per entry, which is what limited catch-up streams and
batch responses (see docs/BENCHMARKS.md).

This couples the table to the wire contract on purpose: the contract only
ever grows compatibly (buf breaking), and rows written without `wire` (restored
data) are encoded from their columns instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from ledger.v1 import ledger_pb2

from ..domain.chain import hash_field
from ..domain.entries import Entry, NewEntry, epoch_micros

_ENTRIES_TAG = b"\x0a"  # field 1, length-delimited (entries, results, entry)
_REPLAYED_TRUE = b"\x10\x01"  # PostedEntry.replayed = true
_SEQUENCE_TAG = b"\x10"  # Entry.sequence: field 2, varint
_CREATED_AT_TAG = b"\x5a"  # Entry.created_at: field 11, length-delimited
_POSTED_BY_TAG = b"\x62"  # Entry.posted_by: field 12, length-delimited


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # most lengths: one byte, from a table
        return _ONE_BYTE[value]
    if value < 0:  # int64 two's complement, as protobuf encodes negative varints
        value += 1 << 64
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def posted_by_field(posted_by: str) -> bytes:
    """Entry.posted_by encoded, to follow a request's own bytes (empty: none)."""
    if not posted_by:
        return b""
    name = posted_by.encode()
    return _POSTED_BY_TAG + _varint(len(name)) + name


def payload(entry: NewEntry) -> bytes:
    """Encoding of every Entry field except sequence and created_at."""
    if entry.encoded is not None:  # the request's own bytes (see ledger.proto)
        return entry.encoded
    return ledger_pb2.Entry(
        ledger=entry.ledger,
        idempotency_key=entry.idempotency_key,
        debit_account=entry.debit_account,
        credit_account=entry.credit_account,
        amount=entry.amount,
        asset=entry.asset,
        entry_type=entry.entry_type,
        description=entry.description,
        metadata=entry.metadata,
        posted_by=entry.posted_by,
    ).SerializeToString()


def stored_payload(entry: Entry) -> bytes:
    """A committed entry's payload encoding, its hash included: the stored one
    when storage had it (restored rows may lack it), else built from its fields."""
    if entry.payload_wire is not None:
        return entry.payload_wire
    return payload(entry.payload) + hash_field(entry.hash)


def _set_timestamp(stamp: Timestamp, micros: int) -> None:
    seconds, fraction = divmod(micros, 1_000_000)
    stamp.seconds = seconds
    stamp.nanos = fraction * 1000


def entry_message(payload_bytes: bytes, sequence: int, created_at: datetime) -> ledger_pb2.Entry:
    """A complete ledger.v1.Entry from a stored payload encoding."""
    message = ledger_pb2.Entry.FromString(payload_bytes)
    message.sequence = sequence
    _set_timestamp(message.created_at, epoch_micros(created_at))
    return message


def posted_entries_message(
    results: Sequence[tuple[bytes, int, datetime, bool]],
) -> ledger_pb2.PostEntriesResponse:
    """A PostEntriesResponse of (payload, sequence, created_at, replayed)
    results, encoded here and parsed once. The entries of one transaction
    share their created_at, so its encoding is made once per distinct value."""
    stamps: dict[datetime, bytes] = {}
    parts = []
    for payload_bytes, sequence, created_at, replayed in results:
        stamp = stamps.get(created_at)
        if stamp is None:
            stamp = stamps[created_at] = _created_at_field(epoch_micros(created_at))
        entry = payload_bytes + _SEQUENCE_TAG + _varint(sequence) + stamp
        posted = _ENTRIES_TAG + _varint(len(entry)) + entry  # PostedEntry.entry
        if replayed:
            posted += _REPLAYED_TRUE
        parts.append(_ENTRIES_TAG + _varint(len(posted)) + posted)  # PostEntriesResponse.results
    return ledger_pb2.PostEntriesResponse.FromString(b"".join(parts))


def _created_at_field(micros: int) -> bytes:
    """Entry.created_at (field 11) encoded."""
    stamp = Timestamp()
    _set_timestamp(stamp, micros)
    encoded = stamp.SerializeToString()
    return _CREATED_AT_TAG + _varint(len(encoded)) + encoded


def repeated(encoded_entries: Iterable[bytes]) -> bytes:
    """Encoded entries as field 1 of a message (StreamEntriesResponse.entries)."""
    return b"".join(_ENTRIES_TAG + _varint(len(e)) + e for e in encoded_entries)


def stream_message(rows: Sequence[tuple[int, int, bytes]]) -> ledger_pb2.StreamEntriesResponse:
    """A StreamEntriesResponse of (sequence, created_at epoch microseconds,
    payload) rows: one parse of all payloads, then two fields set per entry,
    faster than encoding the rest in Python or building the messages."""
    message = ledger_pb2.StreamEntriesResponse.FromString(repeated(p for _, _, p in rows))
    for entry_message, (sequence, micros, _) in zip(message.entries, rows, strict=True):
        entry_message.sequence = sequence
        _set_timestamp(entry_message.created_at, micros)
    return message


def ledger_field(ledger: str) -> bytes:
    """Entry.ledger (field 1) encoded: prefix of an EntryInput's encoding."""
    raw = ledger.encode()
    return _ENTRIES_TAG + _varint(len(raw)) + raw
