"""The single-pair fields sit outside the hash (which covers `postings`): a
verifying reader refuses them unless they repeat the one posting or are
empty."""

from __future__ import annotations

import pytest
from ledger_client.integrity import ChainBroken, ChainVerifier

from ..vectors import VECTORS, entry_of


def test_the_vectors_verify_with_their_single_pair_fields() -> None:
    verifier = ChainVerifier()
    for vector in VECTORS["entries"]:
        verifier.check(entry_of(vector))
    assert verifier.sequence == len(VECTORS["entries"])


@pytest.mark.parametrize(
    ("index", "field", "value"),
    [
        (0, "debit_account", "someone-else"),
        (0, "amount", 999),
        (3, "asset", "USD"),  # a multi-posting entry's single pair is empty
    ],
)
def test_a_changed_single_pair_field_breaks_the_chain(
    index: int, field: str, value: object
) -> None:
    verifier = ChainVerifier()
    entries = [entry_of(v) for v in VECTORS["entries"]]
    setattr(entries[index], field, value)
    for entry in entries[:index]:
        verifier.check(entry)
    with pytest.raises(ChainBroken, match="single-pair fields disagree with postings"):
        verifier.check(entries[index])
