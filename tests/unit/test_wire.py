"""The stored encoding of entries equals what protobuf itself would build."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from ledger.v1 import ledger_pb2

from ledger_service import wire
from ledger_service.domain import validate_new_entry

ENTRY = validate_new_entry(
    ledger="books",
    idempotency_key="k-ü",
    debit_account="cash",
    credit_account="sales",
    amount=2**62 + 1,
    asset="EUR/2",
    entry_type="sale",
    description="two\nlines",
    metadata={"b": "2", "a": "1"},
)


@pytest.mark.parametrize(
    "created_at",
    [
        datetime(2026, 11, 27, 21, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 21, 0, 0, tzinfo=UTC),  # no nanos field at all
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # negative seconds
        datetime(2026, 1, 1, 0, 0, 0, 1),  # naive values are UTC
    ],
)
def test_encoded_entry_parses_to_the_same_message(created_at: datetime) -> None:
    expected = ledger_pb2.Entry(
        ledger=ENTRY.ledger,
        sequence=300,
        idempotency_key=ENTRY.idempotency_key,
        debit_account=ENTRY.debit_account,
        credit_account=ENTRY.credit_account,
        amount=ENTRY.amount,
        asset=ENTRY.asset,
        entry_type=ENTRY.entry_type,
        description=ENTRY.description,
        metadata=ENTRY.metadata,
    )
    expected.created_at.FromDatetime(created_at)
    assert wire.entry_message(wire.payload(ENTRY), 300, created_at) == expected
    micros = wire.epoch_micros(created_at)
    assert wire.stream_message([(300, micros, wire.payload(ENTRY))]).entries[0] == expected


def test_stream_messages_are_assembled_from_payloads() -> None:
    at = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    rows = [(seq, wire.epoch_micros(at), wire.payload(ENTRY)) for seq in (1, 2, 3)]
    message = wire.stream_message(rows)
    assert [e.sequence for e in message.entries] == [1, 2, 3]
    assert message.entries[2].metadata == {"a": "1", "b": "2"}
    assert message.entries[0].created_at.ToDatetime(tzinfo=UTC) == at
    assert message.entries[1] == wire.entry_message(wire.payload(ENTRY), 2, at)


def test_posted_entries_carry_replayed_flags() -> None:
    at = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    message = wire.posted_entries_message(
        [(wire.payload(ENTRY), 7, at, False), (wire.payload(ENTRY), 3, at, True)]
    )
    assert [(r.entry.sequence, r.replayed) for r in message.results] == [(7, False), (3, True)]
    assert message.results[0].entry == wire.entry_message(wire.payload(ENTRY), 7, at)
