"""The input limits, as one table: the checks (domain/validation.py), their
messages and the README's limits text all come from it. They are part of the
public contract, documented on the proto fields too."""

from __future__ import annotations

import re
from dataclasses import dataclass

INT64_MAX = 2**63 - 1

# C0/C1 control characters (NUL included): they break logs, terminals and
# Postgres text (which rejects NUL outright).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Text:
    """A text field of `min_chars` (0: optional) to `max_chars` characters.
    With `pattern` (shown to people as `alphabet`) it must match it; else,
    unless `controls`, it holds no control character; with `controls`, only
    NUL is refused."""

    min_chars: int
    max_chars: int
    pattern: re.Pattern[str] | None = None
    alphabet: str = ""
    controls: bool = False

    def plainly_valid(self, value: str) -> bool:
        """A fast check: True only for a valid value. isprintable() is one C
        call, stricter than "no control characters", so False only means
        "look closer" (violation() decides)."""
        if not self.min_chars <= len(value) <= self.max_chars:
            return False
        if self.pattern is not None:
            return self.pattern.fullmatch(value) is not None
        return "\x00" not in value if self.controls else value.isprintable()

    def all_plainly_valid(self, values: tuple[str, ...]) -> bool:
        """plainly_valid() over a batch's column, a C-level pass per check
        (len over a map; isprintable over a join, printable exactly when
        every part is) rather than Python work per entry."""
        if min(map(len, values)) < self.min_chars or max(map(len, values)) > self.max_chars:
            return False
        if self.pattern is not None:
            return all(self.pattern.fullmatch(v) is not None for v in set(values))
        joined = "".join(values)
        return "\x00" not in joined if self.controls else joined.isprintable()

    def violation(self, value: str) -> str | None:
        """What is wrong with `value`, or None."""
        if not value:
            return "is required" if self.min_chars else None
        if len(value) > self.max_chars:
            return f"must be at most {self.max_chars} characters"
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return f"must match {self.pattern.pattern}"
        if self.controls:
            return "must not contain NUL" if "\x00" in value else None
        if not value.isprintable() and CONTROL_RE.search(value):
            return "must not contain control characters"
        return None

    def describe(self) -> str:
        """The limit as the README states it."""
        if self.min_chars:
            size = f"{self.min_chars} to {self.max_chars} characters"
        else:
            size = f"at most {self.max_chars} characters"
        if self.alphabet:
            return f"{size} of `{self.alphabet}`, starting with a letter or digit"
        return f"{size} (no NUL)" if self.controls else f"{size} without control characters"


LEDGER = Text(1, 64, re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*"), "A-Z a-z 0-9 _ - . :")
IDEMPOTENCY_KEY = Text(1, 128)
ACCOUNT = Text(1, 128)
ASSET = Text(1, 32, re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*"), "A-Z a-z 0-9 _ - . : /")
ENTRY_TYPE = Text(0, 64)
DESCRIPTION = Text(0, 1024, controls=True)
METADATA_KEY = Text(1, 64)
METADATA_VALUE = Text(0, 256, controls=True)

# An entry's text fields, in NewEntry's order.
ENTRY_TEXT = {
    "idempotency_key": IDEMPOTENCY_KEY,
    "debit_account": ACCOUNT,
    "credit_account": ACCOUNT,
    "asset": ASSET,
    "entry_type": ENTRY_TYPE,
    "description": DESCRIPTION,
}

AMOUNT_MAX = INT64_MAX  # minor units; an amount is > 0
METADATA_MAX_PAIRS = 32
METADATA_MAX_BYTES = 4096  # keys and values, UTF-8
BATCH_MAX_ENTRIES = 1000
POSTINGS_MAX = 64  # per multi-posting entry
# In one PostEntries, counting an entry of the single pair as one: it keeps
# the largest valid request within max_request_bytes().
BATCH_MAX_POSTINGS = 4000
LIST_PAGE_DEFAULT = 100  # ListAccounts
LIST_PAGE_MAX = 1000
# The worst-case entry the limits allow is ~10.5 KiB, so a stream message of
# this many stays well under gRPC's 4 MiB default.
STREAM_MESSAGE_MAX_ENTRIES = 256
# Entries of many postings are larger: a message also stops at about this
# many bytes of entries, under gRPC's 4 MiB default receive limit.
STREAM_MESSAGE_MAX_BYTES = 3 << 20


def max_request_bytes() -> int:
    """The largest request a valid call can need, rounded up to a MiB: a
    PostEntries of BATCH_MAX_ENTRIES entries at every limit, each character
    4 bytes of UTF-8, with every field's tag and length."""

    def text(limit: Text) -> int:
        size = limit.max_chars if limit.alphabet else 4 * limit.max_chars  # alphabets: ASCII
        return 1 + 3 + size  # tag, length (up to 3 bytes), value

    per_pair = 1 + 3 + 2 * (1 + 2)  # a map entry: its tag and length, key's and value's
    entry = (
        sum(text(limit) for limit in ENTRY_TEXT.values())
        + 1 + 10  # amount: tag, varint
        + METADATA_MAX_BYTES + METADATA_MAX_PAIRS * per_pair
    )  # fmt: skip
    # A posting beyond an entry's own pair: its tag and length, two accounts,
    # an amount and an asset (an entry of postings leaves its pair empty,
    # which the entries above count anyway).
    posting = 1 + 3 + 2 * text(ACCOUNT) + 1 + 10 + text(ASSET)
    request = (
        text(LEDGER)
        + BATCH_MAX_ENTRIES * (1 + 3 + entry)
        + (BATCH_MAX_POSTINGS - BATCH_MAX_ENTRIES) * posting
    )
    mib = 1 << 20
    return -(-request // mib) * mib


def describe() -> list[str]:
    """The README's input limits, one line a field, made from the table above."""
    return [
        f"`ledger`: {LEDGER.describe()}",
        f"`idempotency_key`: {IDEMPOTENCY_KEY.describe()}",
        f"accounts (`debit_account`, `credit_account`, `account`): {ACCOUNT.describe()};"
        " an entry's two accounts differ",
        f"`asset`: {ASSET.describe()}",
        "`amount`: 1 to 2^63-1 (minor units)",
        f"`entry_type`: {ENTRY_TYPE.describe()}",
        f"`description`: {DESCRIPTION.describe()}",
        f"`metadata`: at most {METADATA_MAX_PAIRS} pairs; keys {METADATA_KEY.describe()};"
        f" values {METADATA_VALUE.describe()}; at most {METADATA_MAX_BYTES} bytes of UTF-8"
        " in all",
        f"`postings`: 1 to {POSTINGS_MAX} per entry, each with the accounts, `amount` and"
        " `asset` rules above; an entry uses them or the single pair of fields, not both",
        f"`PostEntries`: 1 to {BATCH_MAX_ENTRIES} entries, at most {BATCH_MAX_POSTINGS}"
        " postings in all (an entry of the single pair counts one)",
        f"`ListAccounts` `page_size`: 0 (default {LIST_PAGE_DEFAULT}) to {LIST_PAGE_MAX};"
        " above it, taken as that",
        f"a `StreamEntries` message: at most {STREAM_MESSAGE_MAX_ENTRIES} entries",
    ]
