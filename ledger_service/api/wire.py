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

import struct
from collections.abc import Iterable, Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from ledger.v1 import ledger_pb2

from ..domain.chain import hash_field
from ..domain.entries import Balance, Entry, NewEntry, epoch_micros

_ENTRIES_TAG = b"\x0a"  # field 1, length-delimited (entries, results, entry)
_REPLAYED_TRUE = b"\x10\x01"  # PostedEntry.replayed = true
_SEQUENCE_TAG = b"\x10"  # Entry.sequence: field 2, varint
_CREATED_AT_TAG = b"\x5a"  # Entry.created_at: field 11, length-delimited
_POSTED_BY_TAG = b"\x62"  # Entry.posted_by: field 12, length-delimited
_POSTINGS_TAG = b"\x72"  # Entry.postings: field 14, length-delimited
_BALANCES_TAG = b"\x1a"  # PostedEntry.balances: field 3, length-delimited
# AccountAssetBalance's totals: fields 3, 4, 5, each a tag and a sfixed64.
_TOTALS_STRUCT = struct.Struct("<BqBqBq")
_TOTALS, _TOTALS_SIZE = _TOTALS_STRUCT.pack, _TOTALS_STRUCT.size
_DEBITS, _CREDITS, _BALANCE = 0x19, 0x21, 0x29


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # most lengths: one byte, from a table
        return _ONE_BYTE[value]
    if value < 0:  # int64 two's complement, as protobuf encodes negative varints
        value += 1 << 64
    if value < 0x4000:  # two bytes: lengths, small totals
        return bytes((value & 0x7F | 0x80, value >> 7))
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


def _text_field(tag: bytes, value: str) -> bytes:
    if not value:
        return b""
    raw = value.encode()
    return tag + _varint(len(raw)) + raw


def posting_field(debit_account: str, credit_account: str, amount: int, asset: str) -> bytes:
    """Entry.postings holding one posting, encoded: a one-posting entry's
    request bytes lack it, and Entry lists every posting."""
    posting = (
        _text_field(b"\x0a", debit_account)
        + _text_field(b"\x12", credit_account)
        + b"\x18"
        + _varint(amount)
        + _text_field(b"\x22", asset)
    )
    return _POSTINGS_TAG + _varint(len(posting)) + posting


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
        postings=[ledger_pb2.Posting(**p._asdict()) for p in entry.all_postings()],
        reverses_sequence=entry.reverses_sequence,
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
    results: Sequence[tuple[bytes, int, datetime, bool, Sequence[Balance]]],
) -> ledger_pb2.PostEntriesResponse:
    """A PostEntriesResponse of (payload, sequence, created_at, replayed,
    balances) results, encoded here and parsed once. The entries of one
    transaction share their created_at, so its encoding is made once per
    distinct value; an account's name and asset are encoded once too, and
    each balance then takes one pack of its fixed-width totals."""
    stamps: dict[datetime, bytes] = {}
    heads: dict[tuple[str, str], bytes] = {}
    parts = []
    for payload_bytes, sequence, created_at, replayed, balances in results:
        stamp = stamps.get(created_at)
        if stamp is None:
            stamp = stamps[created_at] = _created_at_field(epoch_micros(created_at))
        entry = payload_bytes + _SEQUENCE_TAG + _varint(sequence) + stamp
        posted = _ENTRIES_TAG + _varint(len(entry)) + entry  # PostedEntry.entry
        if replayed:
            posted += _REPLAYED_TRUE
        for account, asset, debits, credits in balances:
            head = heads.get((account, asset))
            if head is None:
                head = heads[(account, asset)] = _balance_head(account, asset)
            posted += head + _TOTALS(_DEBITS, debits, _CREDITS, credits, _BALANCE, debits - credits)
        parts.append(_ENTRIES_TAG + _varint(len(posted)) + posted)  # PostEntriesResponse.results
    return ledger_pb2.PostEntriesResponse.FromString(b"".join(parts))


def _balance_head(account: str, asset: str) -> bytes:
    """PostedEntry.balances' tag and length, then AccountAssetBalance's
    account and asset: all but its totals, whose size is fixed."""
    name = _text_field(b"\x0a", account) + _text_field(b"\x12", asset)
    return _BALANCES_TAG + _varint(len(name) + _TOTALS_SIZE) + name


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
