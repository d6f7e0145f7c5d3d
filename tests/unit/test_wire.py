"""The stored encoding of entries equals what protobuf itself would build."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from ledger.v1 import ledger_pb2

from ledger_service.api import wire
from ledger_service.domain.entries import Balance, epoch_micros
from ledger_service.domain.validation import validate_new_entry

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
        # A one-posting entry lists its one posting too: Entry.postings
        # always holds every posting.
        postings=[
            ledger_pb2.Posting(
                debit_account="cash", credit_account="sales", amount=2**62 + 1, asset="EUR/2"
            )
        ],
    )
    expected.created_at.FromDatetime(created_at)
    assert wire.entry_message(wire.payload(ENTRY), 300, created_at) == expected
    micros = epoch_micros(created_at)
    assert wire.stream_message([(300, micros, wire.payload(ENTRY))]).entries[0] == expected


def test_stream_messages_are_assembled_from_payloads() -> None:
    at = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    rows = [(seq, epoch_micros(at), wire.payload(ENTRY)) for seq in (1, 2, 3)]
    message = wire.stream_message(rows)
    assert [e.sequence for e in message.entries] == [1, 2, 3]
    assert message.entries[2].metadata == {"a": "1", "b": "2"}
    assert message.entries[0].created_at.ToDatetime(tzinfo=UTC) == at
    assert message.entries[1] == wire.entry_message(wire.payload(ENTRY), 2, at)


BALANCES = (Balance("cash", "USD", 0, 2**62), Balance("sales", "USD", 5, 0))


def test_posted_entries_carry_replayed_flags_and_their_own_times() -> None:
    at = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    earlier = datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)  # negative seconds
    message = wire.posted_entries_message(
        [
            (wire.payload(ENTRY), 7, at, False, ()),
            (wire.payload(ENTRY), 3, earlier, True, BALANCES),
            (wire.payload(ENTRY), 2**40, at, False, ()),
        ]
    )
    assert [
        (b.account, b.asset, b.total_debits, b.total_credits, b.balance)
        for b in message.results[1].balances
    ] == [("cash", "USD", 0, 2**62, -(2**62)), ("sales", "USD", 5, 0, 5)]
    assert [(r.entry.sequence, r.replayed) for r in message.results] == [
        (7, False),
        (3, True),
        (2**40, False),
    ]
    for result, (sequence, created_at) in zip(
        message.results, [(7, at), (3, earlier), (2**40, at)], strict=True
    ):
        assert result.entry == wire.entry_message(wire.payload(ENTRY), sequence, created_at)


def test_a_post_request_encoding_is_the_entry_payload_encoding() -> None:
    from ledger_service.api.convert import batch_from_request, new_entry_from_request

    fields: dict[str, Any] = {
        "idempotency_key": ENTRY.idempotency_key,
        "debit_account": ENTRY.debit_account,
        "credit_account": ENTRY.credit_account,
        "amount": ENTRY.amount,
        "asset": ENTRY.asset,
        "entry_type": ENTRY.entry_type,
        "description": ENTRY.description,
        "metadata": dict(ENTRY.metadata),
    }
    built = ledger_pb2.Entry.FromString(wire.payload(ENTRY))  # field by field
    request = ledger_pb2.PostEntryRequest(ledger=ENTRY.ledger, **fields)
    # A newer client's field 2 or 11 must not become Entry.sequence/created_at.
    request.MergeFromString(b"\x10\x07" + b"\xf8\x01\x01")
    from_request = new_entry_from_request(request)
    assert from_request == ENTRY
    assert ledger_pb2.Entry.FromString(wire.payload(from_request)) == built
    batch = batch_from_request(
        ledger_pb2.PostEntriesRequest(
            ledger=ENTRY.ledger, entries=[ledger_pb2.EntryInput(**fields)]
        )
    )
    assert ledger_pb2.Entry.FromString(wire.payload(batch[0])) == built
