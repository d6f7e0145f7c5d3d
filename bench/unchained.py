"""The ledger server without its hash chain: the baseline that prices the
chain, run side by side with the real one in the same bench run.

`python -m bench.unchained serve --database-url URL --listen ADDR ...` is
`ledger-service serve` whose write statement does not chain (no canonical
bytes made, no hashes computed; an empty one stored, which the schema's
check against servers older than the chain asks for). It gives the same
numbers (1..N, checked after each run); its entries have no hash, so it is
never a product mode, only this baseline.
"""

from __future__ import annotations

import sys

from ledger_service import cli
from ledger_service.domain import chain
from ledger_service.storage import loop_writer, numbering

# The write statement without its chain: the real one (storage/numbering.py)
# with ledger_chain's hashes replaced by empty ones and no hash appended to
# the stored encodings, so that the A/B pair prices the chain alone, and
# follows every other change of the statement.
_CHAIN = (
    "ledger_chain(h.head_hash, h.value + 1, m.micros, %(bodies)b::BYTEA[],\n"
    "                            %(versions)s::BYTEA)"
)
_HASH_APPENDED = "t.wire || '\\x6a20'::BYTEA || t.hash"
for _part in (_CHAIN, _HASH_APPENDED):
    assert _part in numbering.TAKE_AND_INSERT_PG, "the write statement changed: update this"
UNCHAINED = numbering.TAKE_AND_INSERT_PG.replace(
    _CHAIN, "array_fill(''::BYTEA, ARRAY[%(n)s])"
).replace(_HASH_APPENDED, "t.wire")


def main() -> None:
    # Where the write path looks them up: the module globals that use them.
    numbering.TAKE_AND_INSERT_PG = UNCHAINED
    vars(loop_writer)["TAKE_AND_INSERT_PG"] = UNCHAINED
    vars(numbering)["body_of"] = lambda entry: b""  # no canonical bytes either
    assert chain.body_of is not vars(numbering)["body_of"]
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
