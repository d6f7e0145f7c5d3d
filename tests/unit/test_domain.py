"""Validation rules and payload comparison, without any I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ledger_service.domain.entries import EntryFields, NewEntry
from ledger_service.domain.errors import InvalidArgument
from ledger_service.domain.limits import INT64_MAX
from ledger_service.domain.validation import (
    validate_account_query,
    validate_batch,
    validate_ledger,
    validate_new_entry,
    validate_stream_request,
)

GOOD: dict[str, Any] = {
    "ledger": "main:eu-1.v2",
    "idempotency_key": "order-42/attempt 1",
    "debit_account": "assets:cash",
    "credit_account": "income:sales",
    "amount": 1,
    "asset": "EUR/2",
    "entry_type": "sale",
    "description": "line one\nline two",
    "metadata": {"order": "42", "note": "ünïcode ✓"},
}


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def test_a_valid_entry_keeps_every_field() -> None:
    entry = validate_new_entry(**GOOD)
    assert entry.ledger == "main:eu-1.v2"
    assert dict(entry.metadata) == GOOD["metadata"]


def test_every_violation_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_new_entry(**{**GOOD, "ledger": "", "amount": 0, "asset": ""})
    assert fields_of(error.value) == ["ledger", "amount", "asset"]
    assert "ledger: is required" in error.value.message


# One field over its limit each (ledger aside): the field it must name.
ENTRY_LIMITS: list[tuple[dict[str, Any], str]] = [
    ({"idempotency_key": "k" * 129}, "idempotency_key"),
    ({"idempotency_key": "tab\there"}, "idempotency_key"),
    ({"debit_account": "x" * 129}, "debit_account"),
    ({"debit_account": "same", "credit_account": "same"}, "credit_account"),
    ({"amount": -1}, "amount"),
    ({"amount": INT64_MAX + 1}, "amount"),
    ({"asset": "/USD"}, "asset"),
    ({"entry_type": "t" * 65}, "entry_type"),
    ({"description": "nul\x00byte"}, "description"),
    ({"description": "d" * 1025}, "description"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 257}}, "metadata['k']"),
    ({"metadata": {f"k{i}": "" for i in range(33)}}, "metadata"),
    ({"metadata": {f"k{i:02}": "é" * 100 for i in range(21)}}, "metadata"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"debit_account": ""}, "debit_account"),
    ({"credit_account": "c" * 129}, "credit_account"),
    ({"credit_account": "bell\x07"}, "credit_account"),
    ({"entry_type": "esc\x1b"}, "entry_type"),
    ({"asset": ""}, "asset"),
    ({"asset": "A" * 33}, "asset"),
    ({"amount": 0}, "amount"),
]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"ledger": "a" * 65}, "ledger"), ({"ledger": "-leading-dash"}, "ledger"), *ENTRY_LIMITS],
)
def test_each_limit_names_its_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        validate_new_entry(**{**GOOD, **overrides})
    assert fields_of(error.value) == [field]


def test_limits_are_inclusive() -> None:
    validate_new_entry(
        **{
            **GOOD,
            "ledger": "l" * 64,
            "idempotency_key": "k" * 128,
            "amount": INT64_MAX,
            "asset": "A" * 32,
            "description": "d" * 1024,
        }
    )


def test_differing_fields_compares_payload_only() -> None:
    a = validate_new_entry(**GOOD)
    b = validate_new_entry(**{**GOOD, "amount": 2, "metadata": {"order": "43"}})
    assert a.differing_fields(a) == []
    assert a.differing_fields(b) == ["amount", "metadata"]


def test_queries_are_validated() -> None:
    assert validate_ledger("demo") == "demo"
    with pytest.raises(InvalidArgument):
        validate_account_query("demo", "")
    with pytest.raises(InvalidArgument) as error:
        validate_stream_request("demo", -1)
    assert fields_of(error.value) == ["after_sequence"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"metadata": {}},  # the fast path
        {"metadata": {}, "idempotency_key": "no\u00a0break"},  # not isprintable(), still valid
        {"metadata": {}, "description": "tab\tand\nnewline"},
    ],
)
def test_valid_entries_pass_either_path_unchanged(overrides: dict[str, Any]) -> None:
    fields = {**GOOD, **overrides}
    entry = validate_new_entry(**fields)
    assert (entry.idempotency_key, entry.description, dict(entry.metadata)) == (
        fields["idempotency_key"],
        fields["description"],
        {},
    )
    assert (entry.debit_account, entry.credit_account, entry.amount, entry.asset) == (
        GOOD["debit_account"],
        GOOD["credit_account"],
        GOOD["amount"],
        GOOD["asset"],
    )


# A batch row's fields: NewEntry's, without the ledger and who posts the
# batch, which validate_batch takes once (EntryFields).
ENTRY_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(NewEntry)
    if f.name not in ("ledger", "posted_by", "postings", "reverses_sequence")
)


def as_kwargs(row: EntryFields) -> dict[str, Any]:
    return dict(zip(ENTRY_FIELDS, row, strict=True))


def batch_fields(n: int) -> list[EntryFields]:
    """n valid, distinct entries of a batch, as the edge hands them over."""
    return [
        (f"key-{i}", f"debit-{i}", "credit", 10 + i, "EUR/2", "sale", "line\none", {}, None)
        for i in range(n)
    ]


@pytest.mark.parametrize(("overrides", "field"), ENTRY_LIMITS)
def test_a_batch_names_the_invalid_entry_and_field(overrides: dict[str, Any], field: str) -> None:
    rows = batch_fields(5)
    rows[3] = tuple({**as_kwargs(rows[3]), **overrides}.values())
    with pytest.raises(InvalidArgument) as error:
        validate_batch("main", rows)
    assert fields_of(error.value) == [f"entries[3].{field}"]


def test_a_valid_batch_validates_as_its_entries_would_one_by_one() -> None:
    rows = batch_fields(4)
    rows[1] = ("no\u00a0break", *rows[1][1:])  # not isprintable(), still valid
    rows[2] = (*rows[2][:7], {"order": "42"}, b"x")
    batch = validate_batch("main", rows)
    assert batch == [validate_new_entry(ledger="main", **as_kwargs(row)) for row in rows]
    assert [e.encoded for e in batch] == [None, None, b"x", None]


def test_a_key_repeated_within_a_batch_names_the_repeat() -> None:
    rows = batch_fields(3)
    rows[2] = (rows[0][0], *rows[2][1:])
    with pytest.raises(InvalidArgument) as error:
        validate_batch("main", rows)
    assert fields_of(error.value) == ["entries[2].idempotency_key"]
    assert "repeats entries[0]" in error.value.message
