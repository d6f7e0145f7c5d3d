"""What the benchmark must reach: the thresholds on ratios against the
baselines of the same run, and the ratios reported beside them."""

from __future__ import annotations

import statistics
from typing import Any

from bench.scenarios import LEDGERS, SPREAD_CHANNELS, WORKERS

# Named in the report, so that it reads without the key; the letters stay
# because readers know them (bench/run.py describes each baseline).
A = "plain gap-free server (a)"
A_PRIME = "this server without group commit (a')"
B = "Postgres SEQUENCE, not gap-free (b)"
C = "gRPC without database work (c)"
D = "psycopg clients without gRPC (d)"

# (name, numerator, denominator or None, threshold, unit[, (its key, the
# denominator's key)]; entries/s by default).
TARGETS: list[tuple[Any, ...]] = [
    (f"PostEntry @64 vs {A}", "post_ledger_64", "post_plain_64", 3.0, "x"),
    (f"PostEntry @64 vs {B}", "post_ledger_64", "post_sequence_64", 1.0, "x"),
    (f"PostEntry @64 vs {C}, its ceiling", "post_ledger_64", "post_noop_64", 0.7, "x"),
    (
        "PostEntry @64 with tokens and TLS vs without",
        "post_secured_64",
        "post_ledger_64",
        0.85,
        "x",
    ),
    # Its cost as server CPU per entry (without / with), at a fixed rate,
    # beside two servers without at once (scenarios.at_fixed_rate): the 3%
    # budget is below what entries/s at saturation can tell apart here (the
    # comparison below, and the A/A control beside it).
    (
        "PostEntry @64 at a fixed rate with --metrics-listen vs without:"
        " server CPU per entry, without / with",
        "post_rate_baseline_64",
        "post_rate_metrics_64",
        0.97,
        "x",
        ("cpu_us_per_entry", "cpu_us_per_entry"),
    ),
    (
        "PostEntry @64 to accounts with balance limits vs without",
        "post_limits_64",
        "post_ledger_64",
        0.9,
        "x",
    ),
    (
        "PostEntry @64 with the hash chain vs without",
        "post_ledger_64",
        "post_unchained_64",
        0.95,
        "x",
    ),
    (
        "PostEntries 1000 with the hash chain vs without",
        "post_entries_1000",
        "post_entries_1000_unchained",
        0.90,
        "x",
    ),
    (
        f"PostEntries 1000 vs {D}, 1000 per statement, its ceiling",
        "post_entries_1000",
        "db_batch_1000",
        0.8,
        "x",
    ),
    ("StreamEntries catch-up, entries/s", "catch_up_ledger", None, 100_000, "/s"),
    ("Catch-up vs one entry per message", "catch_up_ledger", "catch_up_one_per_message", 5.0, "x"),
    (
        "ledger-service verify over the seeded ledger, entries/s",
        "verify_ledger",
        None,
        200_000,
        "/s",
    ),
]

# Ratios reported beside the targets, without a threshold of their own:
# (name, numerator, denominator, the value compared: key of the numerator's
# median, key of the denominator's).
RATE = ("entries_per_s", "entries_per_s")
COMPARISONS = [
    (f"PostEntry @64 vs {A_PRIME}", "post_ledger_64", "post_unbatched_64", RATE),
    (f"PostEntry @16 vs {A_PRIME}", "post_ledger_16", "post_unbatched_16", RATE),
    # Server CPU per entry over each whole run (without / with): another
    # view of what a feature costs, less moved by the machine's other load
    # than entries/s, but still by group sizes.
    (
        "PostEntry @64 at saturation with --metrics-listen vs without: entries/s",
        "post_metrics_64",
        "post_ledger_64",
        RATE,
    ),
    (
        "PostEntry @64 at saturation with --metrics-listen vs without: server CPU per entry,"
        " without / with",
        "post_ledger_64",
        "post_metrics_64",
        ("cpu_us_per_entry", "cpu_us_per_entry"),
    ),
    # Two identical servers measured as the metrics target is: the noise
    # of that measurement (1.00 would be none).
    (
        "A/A control of the fixed-rate target: server CPU per entry, ledger / its twin",
        "post_rate_ledger_64",
        "post_rate_twin_64",
        ("cpu_us_per_entry", "cpu_us_per_entry"),
    ),
    (
        "PostEntry @64 with tokens and TLS vs without: server CPU per entry, without / with",
        "post_ledger_64",
        "post_secured_64",
        ("cpu_us_per_entry", "cpu_us_per_entry"),
    ),
    (
        "PostEntry @64 with the hash chain vs without: server CPU per entry, without / with",
        "post_unchained_64",
        "post_ledger_64",
        ("cpu_us_per_entry", "cpu_us_per_entry"),
    ),
    (
        f"PostEntry @64, {A_PRIME} vs {A}: the one-statement write alone",
        "post_unbatched_64",
        "post_plain_64",
        RATE,
    ),
    # One process's gRPC work bounds any PostEntry server at about (c), so
    # this is the most group commit could reach over (a') in one process.
    (
        f"PostEntry @64, {C} vs {A_PRIME}: the bound on the first line here",
        "post_noop_64",
        "post_unbatched_64",
        RATE,
    ),
    # Each of the four postings moves two accounts of the caller's own, as a
    # one-posting entry does: postings/s against entries/s is what carrying
    # four movements in one entry (one number, one hash, one row) saves.
    (
        "PostEntry @64, entries of 4 postings vs of 1: entries/s",
        "post_multi_64",
        "post_ledger_64",
        RATE,
    ),
    (
        "PostEntry @64, entries of 4 postings vs of 1: postings/s",
        "post_multi_64",
        "post_ledger_64",
        ("postings_per_s", "entries_per_s"),
    ),
    # The same call on the same account without the history (as_of_sequence
    # 0): what the as-of read adds to a GetAccount, apart from the gRPC and
    # Python work of any call, which on a small machine under several
    # callers is most of its latency.
    (
        "GetAccount as-of vs current totals, same account and callers: p50",
        "get_account_as_of",
        "get_account_current",
        ("p50_ms", "p50_ms"),
    ),
    (
        "GetAccount as-of vs current totals, same account and callers: p99",
        "get_account_as_of",
        "get_account_current",
        ("p99_ms", "p99_ms"),
    ),
    # Each ledger is a serialization domain of its own (its counter row),
    # so LEDGERS of them are held back by the database and the process, not
    # by one counter row; but each one's group is a LEDGERS-th of the
    # callers (entries per write, below).
    (
        f"PostEntry @64 on {LEDGERS} ledgers (caller i to ledger i % {LEDGERS}) vs on 1,"
        " same server, side by side",
        f"post_ledgers_{LEDGERS}_64",
        "post_ledgers_1_64",
        RATE,
    ),
    # Without group commit each post is a transaction of its own, so one
    # ledger is held to one counter-row lock at a time: there, LEDGERS
    # ledgers are LEDGERS locks taken at once.
    (
        f"PostEntry @64, one transaction per post (--no-group-commit), on {LEDGERS} ledgers"
        " vs on 1, side by side",
        f"post_unbatched_ledgers_{LEDGERS}_64",
        "post_unbatched_ledgers_1_64",
        RATE,
    ),
    # The kernel spreads connections, not calls, over the workers: both
    # sides of these pairs go over the same many connections.
    (
        f"PostEntry @64 over {2 * SPREAD_CHANNELS} connections, {WORKERS} workers"
        " (serve --workers) vs 1 process",
        f"post_workers_{WORKERS}_64",
        "post_workers_1_64",
        RATE,
    ),
    (
        f"PostEntries 1000 over {2 * SPREAD_CHANNELS} connections, {WORKERS} workers vs 1 process",
        f"post_entries_1000_workers_{WORKERS}",
        "post_entries_1000_workers_1",
        RATE,
    ),
    # What the workers' connection pattern costs one process by itself (not
    # side by side: the 2-connection run is earlier in the repetition).
    (
        f"PostEntry @64, 1 process: over {2 * SPREAD_CHANNELS} connections vs over 2",
        "post_workers_1_64",
        "post_ledger_64",
        RATE,
    ),
    # Lower is better: the time a consumer of one account waits to be
    # caught up, filtered by the server (its index) against reading the
    # whole ledger, as a client filtering on its side must.
    (
        "StreamEntries catch-up on an account with 1% of the seeded ledger's entries, filtered"
        " by the server vs the whole ledger unfiltered (catch_up_ledger): time to caught up",
        "stream_account_1pct",
        "stream_account_1pct",
        ("caught_up_ms", "unfiltered_ms"),
    ),
]

# Values reported on their own: (name, scenario, its value, unit). ListAccounts
# is not held against posts: a page lists accounts, a post writes an entry,
# and the ratio of the two would move with the page size and the number of
# assets per account, nothing the write path does.
MEASURED = [
    ("GetAccount as-of p50, hot account of the seeded ledger", "get_account_as_of", "p50_ms", "ms"),
    (
        "GetAccount as-of p99 at 4 callers, sharing the cores with the server and Postgres",
        "get_account_as_of",
        "p99_ms",
        "ms",
    ),
    (
        "ListAccounts, pages of 1000 accounts: accounts/s",
        "list_accounts_1000",
        "accounts_per_s",
        "/s",
    ),
    ("ListAccounts, pages of 1000 accounts: p99 per page", "list_accounts_1000", "p99_ms", "ms"),
    (
        "PostEntry @64 at the fixed rate of the metrics target: entries/s per server",
        "post_rate_ledger_64",
        "rate_per_s",
        "/s",
    ),
    (
        "PostEntry @64 at the fixed rate: entries per write, without metrics",
        "post_rate_ledger_64",
        "entries_per_write",
        "",
    ),
    (
        "PostEntry @64 at the fixed rate: entries per write, with metrics",
        "post_rate_metrics_64",
        "entries_per_write",
        "",
    ),
    (
        "PostEntry @64 on 1 ledger: entries per write (group commit's groups)",
        "post_ledgers_1_64",
        "entries_per_write",
        "",
    ),
    (
        f"PostEntry @64 on {LEDGERS} ledgers: entries per write",
        f"post_ledgers_{LEDGERS}_64",
        "entries_per_write",
        "",
    ),
    (
        f"PostEntry @64 over {2 * SPREAD_CHANNELS} connections: entries per write, 1 process",
        "post_workers_1_64",
        "entries_per_write",
        "",
    ),
    (
        f"PostEntry @64 over {2 * SPREAD_CHANNELS} connections: entries per write,"
        f" {WORKERS} workers",
        f"post_workers_{WORKERS}_64",
        "entries_per_write",
        "",
    ),
    (
        f"PostEntry @64, {WORKERS} workers: the busiest worker's share of the connections",
        f"post_workers_{WORKERS}_64",
        "busiest_share",
        "",
    ),
    (
        "StreamEntries filtered to an account with 1% of the seeded ledger's entries:"
        " its entries/s",
        "stream_account_1pct",
        "entries_per_s",
        "/s",
    ),
    (
        "StreamEntries filtered to an account with 1% of the seeded ledger's entries:"
        " time to caught up",
        "stream_account_1pct",
        "caught_up_ms",
        "ms",
    ),
]


Samples = dict[str, list[dict[str, float]]]


def ratio(
    medians: dict[str, dict[str, float]],
    samples: Samples | None,
    num: str,
    den: str,
    top: str = "entries_per_s",
    bottom: str = "entries_per_s",
) -> float:
    """num/den: the median of the ratios within each repetition when both
    have one sample per repetition (an A/B pair measured side by side stays
    a pair; on this shared machine the drift between runs further apart is
    larger than some budgets), else the ratio of the medians."""
    a, b = (samples or {}).get(num, []), (samples or {}).get(den, [])
    if a and len(a) == len(b) and num != den:
        return statistics.median(x[top] / y[bottom] for x, y in zip(a, b, strict=True))
    return medians[num][top] / medians[den][bottom]


def compare(
    medians: dict[str, dict[str, float]], samples: Samples | None = None
) -> list[dict[str, Any]]:
    rows = [
        {"name": name, "value": ratio(medians, samples, num, den, top, bottom), "unit": "x"}
        for name, num, den, (top, bottom) in COMPARISONS
    ]
    rows += [
        {"name": name, "value": medians[scenario][key], "unit": unit}
        for name, scenario, key, unit in MEASURED
    ]
    return rows


def evaluate(
    medians: dict[str, dict[str, float]], samples: Samples | None = None
) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        name, num, den, threshold, unit = target[:5]
        top, bottom = target[5] if len(target) > 5 else ("entries_per_s", "entries_per_s")
        rate = medians[num][top]
        value = rate if den is None else ratio(medians, samples, num, den, top, bottom)
        rows.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "unit": unit,
                "met": value >= threshold,
            }
        )
    # Upper bounds, in ms: (name, scenario, percentile, bound).
    for name, scenario, key, bound in (
        ("Live tail p99 with 16 followers (ms)", "live_tail_16", "p99_ms", 50.0),
        # The account with 100k entries in a 1M-entry ledger (quick
        # runs seed fewer: 5k in 50k).
        (
            "GetAccount as-of p99, one caller, hot account (1/10 of the seeded ledger's"
            " entries) (ms)",
            "get_account_as_of_1",
            "p99_ms",
            10.0,
        ),
    ):
        value = medians[scenario][key]
        rows.append(
            {
                "target": name,
                "value": value,
                "threshold": bound,
                "unit": "ms",
                "met": value <= bound,
            }
        )
    latency_ratio = medians["post_ledger_1"]["p50_ms"] / medians["post_unbatched_1"]["p50_ms"]
    rows.append(
        {
            "target": f"Single-caller p50 latency vs {A_PRIME}",
            "value": latency_ratio,
            "threshold": 1.10,
            "unit": "x (<=)",
            "met": latency_ratio <= 1.10,
        }
    )
    return rows
