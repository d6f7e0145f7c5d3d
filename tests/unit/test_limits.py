"""The limits table (domain/limits.py) is the one source of the input limits:
the README states what it holds, and its fast checks never accept what its
detailed checks refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ledger_service.domain import limits
from ledger_service.domain.limits import Text

README = Path(__file__).resolve().parents[2] / "README.md"

TEXT_LIMITS = {name: value for name, value in vars(limits).items() if isinstance(value, Text)}

# Values near every edge a limit has: lengths, alphabets, control characters,
# NUL, the separator the write statement joins columns with (U+001F), and
# printable non-ASCII.
SAMPLES = [
    "",
    "a",
    "A-z_0.9:x",
    "a/b",
    "-leading",
    "/leading",
    "spa ce",
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "sep\x1farator",
    "del\x7f",
    "c1\x85",
    "ünïcødé",
    "€",
    "emoji 🙂",
    "\u2028line separator",
    *("x" * n for n in (16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1024, 1025)),
]


def test_the_readme_states_the_limits_the_table_holds() -> None:
    text = README.read_text()
    block = re.search(r"<!-- limits:begin[^>]*-->\n(.*?)<!-- limits:end -->", text, re.S)
    assert block is not None, "README lost its limits markers"
    expected = "Input limits:\n\n" + "\n".join(f"- {line}" for line in limits.describe())
    assert block.group(1).strip() == expected


@pytest.mark.parametrize("name", sorted(TEXT_LIMITS))
def test_the_fast_check_accepts_only_what_the_detailed_check_accepts(name: str) -> None:
    limit = TEXT_LIMITS[name]
    for value in SAMPLES:
        if limit.plainly_valid(value):
            assert limit.violation(value) is None, (name, value)
        if limit.all_plainly_valid((value, "a")):
            assert limit.violation(value) is None, (name, value)


@pytest.mark.parametrize("name", sorted(TEXT_LIMITS))
def test_every_limit_is_inclusive_and_refuses_one_more(name: str) -> None:
    limit = TEXT_LIMITS[name]
    at_most = "a" * limit.max_chars
    assert limit.violation(at_most) is None
    assert limit.plainly_valid(at_most)
    assert limit.violation(at_most + "a") == f"must be at most {limit.max_chars} characters"
    assert (limit.violation("") is None) == (limit.min_chars == 0)


def test_the_separator_of_the_write_statement_is_refused_where_columns_are_joined() -> None:
    """storage/numbering.py joins these columns with U+001F: validation must
    keep it out of them."""
    for name in ("IDEMPOTENCY_KEY", "ACCOUNT", "ASSET", "ENTRY_TYPE", "METADATA_KEY"):
        assert TEXT_LIMITS[name].violation("a\x1fb") is not None, name
