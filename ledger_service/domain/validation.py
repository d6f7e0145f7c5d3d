"""Validation against the limits table (domain/limits.py): pure, done before
any database work, so a rejected request never takes a number. Every
violation is reported at once."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from itertools import repeat

from .entries import EntryFields, NewEntry
from .errors import FieldViolation, InvalidArgument
from .limits import (
    ACCOUNT,
    AMOUNT_MAX,
    ASSET,
    BATCH_MAX_ENTRIES,
    DESCRIPTION,
    ENTRY_TEXT,
    ENTRY_TYPE,
    IDEMPOTENCY_KEY,
    LEDGER,
    METADATA_KEY,
    METADATA_MAX_BYTES,
    METADATA_MAX_PAIRS,
    METADATA_VALUE,
    Text,
)


def _check(out: list[FieldViolation], name: str, value: str, limit: Text) -> None:
    problem = limit.violation(value)
    if problem is not None:
        out.append(FieldViolation(name, problem))


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def validate_ledger(ledger: str) -> str:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    _raise_if(out)
    return ledger


def validate_account_query(ledger: str, account: str) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    _check(out, "account", account, ACCOUNT)
    _raise_if(out)


def validate_stream_request(ledger: str, after_sequence: int) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if after_sequence < 0:
        out.append(FieldViolation("after_sequence", "must be >= 0"))
    _raise_if(out)


def validate_new_entry(
    *,
    ledger: str,
    idempotency_key: str,
    debit_account: str,
    credit_account: str,
    amount: int,
    asset: str,
    entry_type: str = "",
    description: str = "",
    metadata: Mapping[str, str] | None = None,
    encoded: bytes | None = None,
    posted_by: str = "",
) -> NewEntry:
    """Checks every field and reports every violation at once."""
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    entry = _checked_entry(
        out,
        ledger,
        idempotency_key,
        debit_account,
        credit_account,
        amount,
        asset,
        entry_type,
        description,
        metadata,
        encoded,
        posted_by,
    )
    _raise_if(out)
    return entry


def _checked_entry(
    out: list[FieldViolation],
    ledger: str,
    idempotency_key: str,
    debit_account: str,
    credit_account: str,
    amount: int,
    asset: str,
    entry_type: str = "",
    description: str = "",
    metadata: Mapping[str, str] | None = None,
    encoded: bytes | None = None,
    posted_by: str = "",
) -> NewEntry:
    """Appends the violations of every field but `ledger` (checked by the caller,
    once per batch) to `out`; returns the entry, meaningful only if none."""
    if (
        # The plainly valid entry, the common one, in one pass; anything
        # else takes the detailed checks below, which decide.
        not metadata
        and 0 < amount <= AMOUNT_MAX
        and debit_account != credit_account
        and IDEMPOTENCY_KEY.plainly_valid(idempotency_key)
        and ACCOUNT.plainly_valid(debit_account)
        and ACCOUNT.plainly_valid(credit_account)
        and ASSET.plainly_valid(asset)
        and ENTRY_TYPE.plainly_valid(entry_type)
        and DESCRIPTION.plainly_valid(description)
    ):
        return NewEntry(
            ledger,
            idempotency_key,
            debit_account,
            credit_account,
            amount,
            asset,
            entry_type,
            description,
            {},
            encoded,
            posted_by,
        )
    _check(out, "idempotency_key", idempotency_key, IDEMPOTENCY_KEY)
    _check(out, "debit_account", debit_account, ACCOUNT)
    _check(out, "credit_account", credit_account, ACCOUNT)
    if debit_account and debit_account == credit_account:
        out.append(FieldViolation("credit_account", "must differ from debit_account"))
    if amount <= 0:
        out.append(FieldViolation("amount", "must be > 0 (minor units)"))
    elif amount > AMOUNT_MAX:
        out.append(FieldViolation("amount", f"must be at most {AMOUNT_MAX}"))
    _check(out, "asset", asset, ASSET)
    _check(out, "entry_type", entry_type, ENTRY_TYPE)
    _check(out, "description", description, DESCRIPTION)
    meta = dict(metadata or {})
    _check_metadata(out, meta)
    return NewEntry(
        ledger=ledger,
        idempotency_key=idempotency_key,
        debit_account=debit_account,
        credit_account=credit_account,
        amount=amount,
        asset=asset,
        entry_type=entry_type,
        description=description,
        metadata=meta,
        encoded=encoded,
        posted_by=posted_by,
    )


def _check_metadata(out: list[FieldViolation], meta: dict[str, str]) -> None:
    if len(meta) > METADATA_MAX_PAIRS:
        out.append(FieldViolation("metadata", f"must have at most {METADATA_MAX_PAIRS} pairs"))
        return
    size = 0
    for key, value in meta.items():
        shown = key[: METADATA_KEY.max_chars]
        if METADATA_KEY.violation(key) is not None:
            out.append(
                FieldViolation(
                    "metadata",
                    f"key {shown!r} must be {METADATA_KEY.min_chars}-{METADATA_KEY.max_chars}"
                    " characters without control characters",
                )
            )
        _check(out, f"metadata[{shown!r}]", value, METADATA_VALUE)
        size += len(key.encode()) + len(value.encode())
    if size > METADATA_MAX_BYTES:
        out.append(
            FieldViolation("metadata", f"must be at most {METADATA_MAX_BYTES} bytes of UTF-8")
        )


def validate_batch(ledger: str, rows: Sequence[EntryFields], posted_by: str = "") -> list[NewEntry]:
    """Validates an atomic batch of entries of `ledger`, posted by
    `posted_by`; violations are named `entries[i].field`, all at once."""
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if not rows:
        out.append(FieldViolation("entries", "must contain at least one entry"))
    elif len(rows) > BATCH_MAX_ENTRIES:
        out.append(FieldViolation("entries", f"must contain at most {BATCH_MAX_ENTRIES} entries"))
    _raise_if(out)
    if _plainly_valid(rows):
        n = len(rows)
        return list(
            map(NewEntry, repeat(ledger, n), *zip(*rows, strict=True), repeat(posted_by, n))
        )
    batch: list[NewEntry] = []
    first_index: dict[str, int] = {}
    for i, row in enumerate(rows):
        mine: list[FieldViolation] = []
        batch.append(_checked_entry(mine, ledger, *row, posted_by))
        if mine:
            out.extend(FieldViolation(f"entries[{i}].{v.field}", v.description) for v in mine)
            continue
        key = batch[-1].idempotency_key
        if key in first_index:
            out.append(
                FieldViolation(
                    f"entries[{i}].idempotency_key",
                    f"repeats entries[{first_index[key]}].idempotency_key within the batch",
                )
            )
        first_index.setdefault(key, i)
    _raise_if(out)
    return batch


def _plainly_valid(rows: Sequence[EntryFields]) -> bool:
    """The single-entry fast path's conditions, checked a column at a time
    (Text.all_plainly_valid). False only means "look closer": the per-entry
    checks decide and name the violations."""
    keys, debits, credits, amounts, assets, entry_types, descriptions, metadata, _ = zip(
        *rows, strict=True
    )
    columns = (keys, debits, credits, assets, entry_types, descriptions)
    return (
        not any(metadata)
        and len(set(keys)) == len(keys)
        and min(amounts) > 0
        and max(amounts) <= AMOUNT_MAX
        and not any(map(operator.eq, debits, credits))
        and all(
            limit.all_plainly_valid(column)
            for limit, column in zip(ENTRY_TEXT.values(), columns, strict=True)
        )
    )
