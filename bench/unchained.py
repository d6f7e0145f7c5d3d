"""The ledger server without its hash chain: the baseline that prices the
chain, run side by side with the real one in the same bench run.

`python -m bench.unchained serve --database-url URL --listen ADDR ...` is
`ledger-service serve` whose write statement is the one before the chain
(no canonical bytes made, no hashes computed; an empty one stored, which
the schema's check against servers older than the chain asks for). It gives the same
numbers (1..N, checked after each run); its entries have no hash, so it is
never a product mode, only this baseline.
"""

from __future__ import annotations

import sys

from ledger_service import cli
from ledger_service.domain import chain
from ledger_service.storage import dialect, loop_writer, numbering

# The write statement as it was before the chain (storage/numbering.py),
# answering an empty string of hashes.
UNCHAINED = f"""
    WITH deadline AS (
        SELECT set_config('lock_timeout', %(lock_timeout)s::TEXT, true) AS lock_timeout
    ), totals AS (
        INSERT INTO ledger_account_totals (ledger, account, asset, debits, credits)
        SELECT %(ledger)s::TEXT, t.account, t.asset, t.debits, t.credits
        FROM unnest(%(accounts)b::TEXT[], %(account_assets)b::TEXT[],
                    %(debits)b::BIGINT[], %(credits)b::BIGINT[])
             WITH ORDINALITY AS t(account, asset, debits, credits, ord)
        WHERE EXISTS (SELECT 1 FROM ledger_counters WHERE ledger = %(ledger)s::TEXT)
          AND (SELECT lock_timeout FROM deadline) IS NOT NULL
        ORDER BY t.ord
        ON CONFLICT (ledger, account, asset) DO UPDATE
        SET debits = ledger_account_totals.debits + excluded.debits,
            credits = ledger_account_totals.credits + excluded.credits
        RETURNING 1
    ), bump AS (
        UPDATE ledger_counters SET value = value + %(n)s
        WHERE ledger = %(ledger)s::TEXT AND (SELECT count(*) FROM totals) = %(n_totals)s
        RETURNING value, clock_timestamp() AS at
    ), ins AS (
        INSERT INTO ledger_entries (
            ledger, sequence, idempotency_key, debit_account, credit_account,
            amount, asset, entry_type, description, metadata, created_at, wire, posted_by,
            hash)
        SELECT %(ledger)s::TEXT, bump.value - %(n)s + t.ord, t.idempotency_key, t.debit_account,
               t.credit_account, t.amount, t.asset, COALESCE(t.entry_type, ''),
               COALESCE(t.description, ''), CAST(COALESCE(NULLIF(t.metadata, ''), '{{}}') AS JSONB),
               bump.at, t.wire, COALESCE(t.posted_by, ''), ''::BYTEA
        FROM bump, unnest(
            string_to_array(%(idempotency_keys)s::TEXT, chr(31)),
            string_to_array(%(debit_accounts)s::TEXT, chr(31)),
            string_to_array(%(credit_accounts)s::TEXT, chr(31)),
            %(amounts)b::BIGINT[],
            string_to_array(%(assets)s::TEXT, chr(31)),
            string_to_array(%(entry_types)s::TEXT, chr(31)),
            %(descriptions)b::TEXT[],
            string_to_array(%(metadatas)s::TEXT, chr(31)),
            %(wires)b::BYTEA[],
            string_to_array(%(posted_bys)s::TEXT, chr(31))
        ) WITH ORDINALITY AS t(idempotency_key, debit_account, credit_account, amount,
                               asset, entry_type, description, metadata, wire, posted_by,
                               ord)
    )
    SELECT bump.value, CAST(EXTRACT(EPOCH FROM bump.at) * 1000000 AS BIGINT), ''::BYTEA
    FROM bump CROSS JOIN (
        SELECT pg_notify('{dialect.NOTIFY_CHANNEL}', %(ledger)s::TEXT || ':' || value) FROM bump
    ) AS notified
"""


def main() -> None:
    # Where the write path looks them up: the module globals that use them.
    numbering.TAKE_AND_INSERT_PG = UNCHAINED
    vars(loop_writer)["TAKE_AND_INSERT_PG"] = UNCHAINED
    vars(numbering)["body_of"] = lambda entry: b""  # no canonical bytes either
    assert chain.body_of is not vars(numbering)["body_of"]
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
