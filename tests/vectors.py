"""The shared hash-chain test vectors (docs/integrity-vectors.json), as the
tests of every implementation read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ledger.v1 import ledger_pb2

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "docs" / "integrity-vectors.json").read_text()
)


def entry_of(vector: dict[str, Any]) -> ledger_pb2.Entry:
    """A vector's entry as a reader receives it, its hash included."""
    entry = ledger_pb2.Entry(
        ledger=vector["ledger"],
        sequence=vector["sequence"],
        idempotency_key=vector["idempotency_key"],
        debit_account=vector["debit_account"],
        credit_account=vector["credit_account"],
        amount=int(vector["amount"]),
        asset=vector["asset"],
        entry_type=vector["entry_type"],
        description=vector["description"],
        metadata=vector["metadata"],
        posted_by=vector["posted_by"],
        hash=bytes.fromhex(vector["hash"]),
        postings=[
            ledger_pb2.Posting(
                debit_account=p["debit_account"],
                credit_account=p["credit_account"],
                amount=int(p["amount"]),
                asset=p["asset"],
            )
            for p in vector["postings"]
        ],
        reverses_sequence=int(vector["reverses_sequence"]),
    )
    seconds, micros = divmod(int(vector["created_at_micros"]), 1_000_000)
    entry.created_at.seconds, entry.created_at.nanos = seconds, micros * 1000
    return entry
