"""Validation against the limits table (domain/limits.py): pure, done before
any database work, so a rejected request never takes a number. Every
violation is reported at once."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from itertools import repeat

from .entries import EntryFields, NewEntry, Posting
from .errors import FieldViolation, InvalidArgument
from .limits import (
    ACCOUNT,
    AMOUNT_MAX,
    ASSET,
    BATCH_MAX_ENTRIES,
    BATCH_MAX_POSTINGS,
    DESCRIPTION,
    ENTRY_TEXT,
    ENTRY_TYPE,
    IDEMPOTENCY_KEY,
    LEDGER,
    LIST_PAGE_MAX,
    METADATA_KEY,
    METADATA_MAX_BYTES,
    METADATA_MAX_PAIRS,
    METADATA_VALUE,
    POSTINGS_MAX,
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


def validate_as_of(ledger: str, account: str, as_of_sequence: int) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    _check(out, "account", account, ACCOUNT)
    if as_of_sequence < 0:
        out.append(FieldViolation("as_of_sequence", "must be >= 0 (0: now)"))
    _raise_if(out)


def validate_limits_request(
    ledger: str,
    account: str,
    asset: str,
    max_net_debit: int | None,
    max_net_credit: int | None,
) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    _check(out, "account", account, ACCOUNT)
    _check(out, "asset", asset, ASSET)
    for name, value in (("max_net_debit", max_net_debit), ("max_net_credit", max_net_credit)):
        # -2^63 would make the checks' negation overflow; no balance reaches it.
        if value is not None and value < -AMOUNT_MAX:
            out.append(FieldViolation(name, f"must be at least {-AMOUNT_MAX}"))
    _raise_if(out)


def validate_entry_lookup(ledger: str, sequence: int | None, idempotency_key: str | None) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if sequence is None and idempotency_key is None:
        out.append(FieldViolation("sequence", "set sequence or idempotency_key"))
    elif sequence is not None and sequence < 1:
        out.append(FieldViolation("sequence", "must be >= 1"))
    elif idempotency_key is not None:
        _check(out, "idempotency_key", idempotency_key, IDEMPOTENCY_KEY)
    _raise_if(out)


def validate_reversal(ledger: str, sequence: int, idempotency_key: str, description: str) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if sequence < 1:
        out.append(FieldViolation("sequence", "must be >= 1"))
    _check(out, "idempotency_key", idempotency_key, IDEMPOTENCY_KEY)
    _check(out, "description", description, DESCRIPTION)
    _raise_if(out)


def validate_page_size(ledger: str, page_size: int) -> int:
    """The page size to use (0: the default; above the maximum: the maximum)."""
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if page_size < 0:
        out.append(FieldViolation("page_size", "must be >= 0 (0: the default)"))
    _raise_if(out)
    return min(page_size, LIST_PAGE_MAX)


def validate_stream_request(
    ledger: str, after_sequence: int, consumer: str = "", account: str = ""
) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if after_sequence < 0:
        out.append(FieldViolation("after_sequence", "must be >= 0"))
    if consumer:
        _check(out, "consumer", consumer, LEDGER)
    if account:
        _check(out, "account", account, ACCOUNT)
    _raise_if(out)


def validate_ack(ledger: str, consumer: str, sequence: int) -> None:
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    _check(out, "consumer", consumer, LEDGER)
    if sequence < 0:
        out.append(FieldViolation("sequence", "must be >= 0"))
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
    postings: Sequence[Posting] = (),
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
        postings,
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
    postings: Sequence[Posting] = (),
) -> NewEntry:
    """Appends the violations of every field but `ledger` (checked by the caller,
    once per batch) to `out`; returns the entry, meaningful only if none."""
    if postings:
        return _checked_postings_entry(
            out,
            ledger,
            idempotency_key,
            (debit_account, credit_account, amount, asset),
            entry_type,
            description,
            metadata,
            encoded,
            posted_by,
            postings,
        )
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


def _checked_postings_entry(
    out: list[FieldViolation],
    ledger: str,
    idempotency_key: str,
    single_pair: tuple[str, str, int, str],
    entry_type: str,
    description: str,
    metadata: Mapping[str, str] | None,
    encoded: bytes | None,
    posted_by: str,
    postings: Sequence[Posting],
) -> NewEntry:
    """An entry in the multi-posting form: its single-pair fields empty."""
    _check(out, "idempotency_key", idempotency_key, IDEMPOTENCY_KEY)
    for name, value in zip(
        ("debit_account", "credit_account", "amount", "asset"), single_pair, strict=True
    ):
        if value:
            out.append(FieldViolation(name, "must be empty when postings are given"))
    if len(postings) > POSTINGS_MAX:
        out.append(FieldViolation("postings", f"must hold at most {POSTINGS_MAX} postings"))
    for j, p in enumerate(postings[:POSTINGS_MAX]):
        where = f"postings[{j}]"
        _check(out, f"{where}.debit_account", p.debit_account, ACCOUNT)
        _check(out, f"{where}.credit_account", p.credit_account, ACCOUNT)
        if p.debit_account and p.debit_account == p.credit_account:
            out.append(FieldViolation(f"{where}.credit_account", "must differ from debit_account"))
        if p.amount <= 0:
            out.append(FieldViolation(f"{where}.amount", "must be > 0 (minor units)"))
        _check(out, f"{where}.asset", p.asset, ASSET)
    _check(out, "entry_type", entry_type, ENTRY_TYPE)
    _check(out, "description", description, DESCRIPTION)
    meta = dict(metadata or {})
    _check_metadata(out, meta)
    return NewEntry(
        ledger=ledger,
        idempotency_key=idempotency_key,
        debit_account="",
        credit_account="",
        amount=0,
        asset="",
        entry_type=entry_type,
        description=description,
        metadata=meta,
        encoded=encoded,
        posted_by=posted_by,
        postings=tuple(postings),
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


def validate_batch(
    ledger: str,
    rows: Sequence[EntryFields],
    posted_by: str = "",
    postings: Sequence[Sequence[Posting]] | None = None,
) -> list[NewEntry]:
    """Validates an atomic batch of entries of `ledger`, posted by
    `posted_by`; violations are named `entries[i].field`, all at once.
    `postings`: each entry's, when any entry has some (None: none has)."""
    out: list[FieldViolation] = []
    _check(out, "ledger", ledger, LEDGER)
    if not rows:
        out.append(FieldViolation("entries", "must contain at least one entry"))
    elif len(rows) > BATCH_MAX_ENTRIES:
        out.append(FieldViolation("entries", f"must contain at most {BATCH_MAX_ENTRIES} entries"))
    elif postings is not None and sum(max(1, len(p)) for p in postings) > BATCH_MAX_POSTINGS:
        out.append(
            FieldViolation(
                "entries",
                f"must hold at most {BATCH_MAX_POSTINGS} postings in all"
                " (an entry of the single pair of fields counts one)",
            )
        )
    _raise_if(out)
    if postings is None and _plainly_valid(rows):
        n = len(rows)
        return list(
            map(NewEntry, repeat(ledger, n), *zip(*rows, strict=True), repeat(posted_by, n))
        )
    batch: list[NewEntry] = []
    first_index: dict[str, int] = {}
    for i, row in enumerate(rows):
        mine: list[FieldViolation] = []
        own = () if postings is None else postings[i]
        batch.append(_checked_entry(mine, ledger, *row, posted_by, own))
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
