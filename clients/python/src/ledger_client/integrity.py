"""The hash chain along a ledger's gap-free sequence (docs/integrity.md).

Each entry's `hash` is SHA-256 over the previous entry's hash (32 zero bytes
before entry 1) followed by the entry's canonical bytes, an encoding of our
own: protobuf's serialization is not canonical across languages. The server
chains entries with these functions too, so a consumer and the server cannot
disagree on the encoding without the shared test vectors failing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

from ledger.v1 import ledger_pb2

GENESIS = bytes(32)  # the "previous hash" of entry 1
FORMAT_VERSION = 1
# Version 2: version 1 plus the entry's `reverses_sequence`, for the entries
# that have one (ReverseEntry).
REVERSAL_FORMAT_VERSION = 2
HASH_SIZE = 32

_HEADER = struct.Struct(">Bqq")  # version, sequence, created_at (microseconds)
_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack

# (debit_account, credit_account, amount, asset)
Posting = tuple[str, str, int, str]


class ChainBroken(Exception):
    """An entry does not chain to the one before it, or a number is missing."""

    def __init__(self, ledger: str, sequence: int, problem: str) -> None:
        super().__init__(f"{ledger}: entry {sequence}: {problem}")
        self.ledger = ledger
        self.sequence = sequence
        self.problem = problem


def _text(value: str) -> bytes:
    raw = value.encode()
    return _U32(len(raw)) + raw


def entry_body(
    ledger: str,
    idempotency_key: str,
    postings: Iterable[Posting],
    entry_type: str,
    description: str,
    metadata: Mapping[str, str],
    posted_by: str,
    reverses_sequence: int = 0,
) -> bytes:
    """The canonical bytes after the fixed header (version, sequence,
    created_at): everything the entry says that is known before it is
    numbered. With `reverses_sequence`, the header's version is 2
    (format_version)."""
    listed = list(postings)
    parts = [_text(ledger), _text(idempotency_key), _U32(len(listed))]
    for debit, credit, amount, asset in listed:
        parts += (_text(debit), _text(credit), _I64(amount), _text(asset))
    parts += (_text(entry_type), _text(description), _metadata(metadata), _text(posted_by))
    if reverses_sequence:
        parts.append(_I64(reverses_sequence))
    return b"".join(parts)


def format_version(reverses_sequence: int) -> int:
    """The canonical bytes' version for an entry: 2 for a reversal, else 1."""
    return REVERSAL_FORMAT_VERSION if reverses_sequence else FORMAT_VERSION


def single_posting_body(
    ledger: str,
    idempotency_key: str,
    debit_account: str,
    credit_account: str,
    amount: int,
    asset: str,
    entry_type: str,
    description: str,
    metadata: Mapping[str, str],
    posted_by: str,
) -> bytes:
    """entry_body of an entry with one posting, without building it: the
    server makes one per entry it writes, on its hot path."""
    k, d, c, a, t, x, p = (
        idempotency_key.encode(),
        debit_account.encode(),
        credit_account.encode(),
        asset.encode(),
        entry_type.encode(),
        description.encode(),
        posted_by.encode(),
    )
    return b"".join(
        (
            _text(ledger),
            _U32(len(k)),
            k,
            _ONE,
            _U32(len(d)),
            d,
            _U32(len(c)),
            c,
            _I64(amount),
            _U32(len(a)),
            a,
            _U32(len(t)),
            t,
            _U32(len(x)),
            x,
            _metadata(metadata) if metadata else _NONE,
            _U32(len(p)),
            p,
        )
    )


_ONE = _U32(1)
_NONE = _U32(0)


def _metadata(metadata: Mapping[str, str]) -> bytes:
    # By the keys' UTF-8 bytes: the same order in every language.
    pairs = sorted((k.encode(), v.encode()) for k, v in metadata.items())
    return _U32(len(pairs)) + b"".join(_U32(len(k)) + k + _U32(len(v)) + v for k, v in pairs)


def canonical_bytes(
    sequence: int, created_at_micros: int, body: bytes, version: int = FORMAT_VERSION
) -> bytes:
    return _HEADER.pack(version, sequence, created_at_micros) + body


def chain_hash(
    previous: bytes,
    sequence: int,
    created_at_micros: int,
    body: bytes,
    version: int = FORMAT_VERSION,
) -> bytes:
    """SHA-256(previous || canonical bytes)."""
    return hashlib.sha256(
        previous + canonical_bytes(sequence, created_at_micros, body, version)
    ).digest()


def message_postings(entry: ledger_pb2.Entry) -> list[Posting]:
    """An Entry's postings: `postings` when the server listed them, else the
    single pair of fields as one posting (an older server's entries)."""
    if entry.postings:
        return [(p.debit_account, p.credit_account, p.amount, p.asset) for p in entry.postings]
    return [(entry.debit_account, entry.credit_account, entry.amount, entry.asset)]


def single_pair_agrees(entry: ledger_pb2.Entry) -> bool:
    """The hash covers `postings`; the single-pair fields, outside it, must
    be empty or repeat the entry's one posting (else they could be changed
    unseen)."""
    pair = (entry.debit_account, entry.credit_account, entry.amount, entry.asset)
    if not entry.postings or pair == ("", "", 0, ""):
        return True
    return len(entry.postings) == 1 and pair == message_postings(entry)[0]


def message_canonical(entry: ledger_pb2.Entry) -> bytes:
    """The canonical bytes of an Entry as a reader received it."""
    micros = entry.created_at.seconds * 1_000_000 + entry.created_at.nanos // 1000
    body = entry_body(
        entry.ledger,
        entry.idempotency_key,
        message_postings(entry),
        entry.entry_type,
        entry.description,
        entry.metadata,
        entry.posted_by,
        entry.reverses_sequence,
    )
    return canonical_bytes(entry.sequence, micros, body, format_version(entry.reverses_sequence))


class ChainVerifier:
    """Checks entries as they arrive, in order: each must be the next number
    and carry the hash that chains it to the one before.

    Start after entry 0 with nothing, or after entry N with N's hash (from
    your own records, or GetLedger's head when you start at the head)."""

    def __init__(self, after_sequence: int = 0, previous_hash: bytes | None = None) -> None:
        if previous_hash is None:
            if after_sequence != 0:
                raise ValueError("verifying after entry N needs entry N's hash")
            previous_hash = GENESIS
        if len(previous_hash) != HASH_SIZE:
            raise ValueError(f"a hash is {HASH_SIZE} bytes, not {len(previous_hash)}")
        self.sequence = after_sequence
        self.hash = previous_hash

    def check(self, entry: ledger_pb2.Entry) -> None:
        """Raises ChainBroken, naming the entry, unless it chains."""
        if entry.sequence != self.sequence + 1:
            problem = (
                f"expected entry {self.sequence + 1} next"
                if entry.sequence > self.sequence
                else f"out of order after entry {self.sequence}"
            )
            raise ChainBroken(entry.ledger, entry.sequence, problem)
        if not single_pair_agrees(entry):
            raise ChainBroken(
                entry.ledger, entry.sequence, "single-pair fields disagree with postings"
            )
        expected = hashlib.sha256(self.hash + message_canonical(entry)).digest()
        if entry.hash != expected:
            raise ChainBroken(entry.ledger, entry.sequence, "hash mismatch")
        self.sequence = entry.sequence
        self.hash = expected


class StreamCheck:
    """A verifying stream's start and its check of each entry.

    Resuming after entry N without N's hash, the stream starts one earlier:
    entry N is read, not yielded, and its hash trusted as the starting point."""

    def __init__(self, after_sequence: int, previous_hash: bytes | None) -> None:
        self._anchor = after_sequence if after_sequence > 0 and previous_hash is None else 0
        self.request_after = after_sequence - 1 if self._anchor else after_sequence
        self._verifier = (
            None if self._anchor else ChainVerifier(after_sequence, previous_hash or None)
        )

    def caught_up(self, ledger: str) -> None:
        """The stream reached the head: if that was before entry N, there is
        nothing to start after (without verify the server would have said
        OUT_OF_RANGE), and nothing that follows may be trusted in its place."""
        if self._verifier is None:
            raise ChainBroken(ledger, self._anchor, "not in the ledger: cannot start after it")

    def accept(self, entry: ledger_pb2.Entry) -> bool:
        """Whether to yield `entry`; raises ChainBroken unless it chains."""
        if self._verifier is None:
            if entry.sequence != self._anchor or len(entry.hash) != HASH_SIZE:
                raise ChainBroken(entry.ledger, entry.sequence, f"expected entry {self._anchor}")
            self._verifier = ChainVerifier(entry.sequence, entry.hash)
            return False
        self._verifier.check(entry)
        return True
