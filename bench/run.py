"""`make bench` / `python -m bench.run [--quick]`.

Starts every server it measures as a separate process on one throwaway
Postgres database (127.0.0.1:5432, or LEDGER_BENCH_DATABASE_URL), drives them
with load generators in other processes (bench/load.py), runs every scenario
REPS times interleaved (bench/scenarios.py), and reports medians and ratios
against baselines measured in the same run (bench/targets.py, bench/report.py):

  (a) plain gap-free server: one transaction per request written the obvious
      way (key lookup, counter bump, inserts, commit; the counter row locked
      from the bump to the commit) -- the issue's "plain Python gRPC server
      with psycopg" (bench/servers.py)
  (a') this server without group commit (--no-group-commit): one transaction
      per request, but the service's own one-statement write (counter taken
      last, one round trip); what group commit alone adds, and the path the
      single-caller latency is held to
  (b) Postgres SEQUENCE, not gap-free: a SEQUENCE per request (bench/servers.py)
  (c) gRPC without database work: PostEntry answered without database work,
      the gRPC ceiling
  (d) psycopg clients without gRPC: the server's own write statement (one
      round trip, autocommit), the database ceiling

and this server with tokens and TLS against the same without: the cost of
authentication, roles and encryption on every call; and with --metrics-listen
against the same without: the cost of recording the metrics; and without
the hash chain (bench/unchained.py) against the same with: its cost. Side
by side too: 64 callers on 8 ledgers against 64 on one; this server as 2
worker processes on one port (`serve --workers 2`) against one process,
over many connections; and a catch-up filtered to one account by the
server against reading the whole ledger.

Full run: docs/BENCHMARKS.md, docs/benchmarks.png, bench/results/latest.json.
--quick: one repetition of short runs into bench/results/quick/ (a smoke test).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from bench import ROOT
from bench.report import machine, write_report
from bench.scenarios import run
from bench.targets import compare, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition (smoke test)")
    args = parser.parse_args()
    started = time.time()
    measured = run(args.quick)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "reps": 1 if args.quick else 3,
        "machine": machine(),
        **measured,
    }
    result["targets"] = evaluate(result["medians"], result["samples"])
    result["comparisons"] = compare(result["medians"], result["samples"])
    if args.quick:
        out_dir = ROOT / "bench" / "results" / "quick"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_report(result, out_dir, out_dir / "BENCHMARKS.md", out_dir / "benchmarks.png")
    else:
        write_report(
            result,
            ROOT / "bench" / "results",
            ROOT / "docs" / "BENCHMARKS.md",
            ROOT / "docs" / "benchmarks.png",
        )
    for row in result["targets"]:
        print(f"{'ok ' if row['met'] else 'LOW'} {row['target']}: {row['value']:,.2f}")
    for c in result["comparisons"]:
        print(f"    {c['name']}: {c['value']:,.2f}")
    print(f"bench finished in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
