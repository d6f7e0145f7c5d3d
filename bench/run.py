"""`make bench` / `python -m bench.run [--quick]`.

Starts every server it measures as a separate process on one throwaway
Postgres database (127.0.0.1:5432, or LEDGER_BENCH_DATABASE_URL), drives them
with load generators in other processes (bench/load.py), runs every scenario
REPS times interleaved, and reports medians and ratios against baselines
measured in the same run:

  (a) naive gap-free: a plain server, one transaction per request written
      the obvious way (key lookup, counter bump, inserts, commit; the counter
      row locked from the bump to the commit) -- the issue's "plain Python
      gRPC server with psycopg" (bench/servers.py)
  (a') this server without group commit (--no-group-commit): one transaction
      per request, but the service's own one-statement write (counter taken
      last, one round trip); what group commit alone adds, and the path the
      single-caller latency is held to
  (b) not gap-free: a Postgres SEQUENCE per request (bench/servers.py)
  (c) the gRPC ceiling: PostEntry answered without database work
  (d) the database ceiling: psycopg clients, no gRPC, the server's own write
      statement (one round trip, autocommit)

Full run: docs/BENCHMARKS.md, docs/benchmarks.png, bench/results/latest.json.
--quick: one repetition of short runs into bench/results/quick/ (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.load import planned_posts
from ledger_service.storage import migrate
from ledger_service.storage.timeouts import libpq_conninfo
from ledger_service.storage.uow import create_engine
from tests.e2e.harness import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# PostEntry servers, in the order of the tables and the chart.
POST_MODES = ("ledger", "unbatched", "plain", "sequence", "noop")
GAP_FREE = ("ledger", "unbatched", "plain")


@contextmanager
def bench_database() -> Iterator[str]:
    given = os.environ.get("LEDGER_BENCH_DATABASE_URL")
    if given:
        yield given
        return
    name = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def load(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs load processes together, aligned on one start time."""
    start_at = time.time() + 1.5  # time for the processes to import and connect
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                json.dumps({**s, "start_at": start_at, "process": i}),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i, s in enumerate(specs)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"load process failed ({p.returncode})")
        results.append(json.loads(out))
    return results


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    entries = sum(r["entries"] for r in results)
    seconds = max(r["seconds"] for r in results)
    lat = [x for r in results for x in r.get("latencies", [])]
    return {
        "entries_per_s": entries / seconds,
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
    }


def check_gap_free(url: str, ledger: str) -> None:
    """A gap-free server's run must leave its ledger numbered exactly 1..N,
    N being the counter's value: a baseline that skipped the guarantee would
    be measuring something else."""
    import psycopg

    with psycopg.connect(libpq_conninfo(sa.make_url(url))) as conn:
        row = conn.execute(
            "SELECT c.value, count(e.sequence), coalesce(min(e.sequence), 1),"
            " coalesce(max(e.sequence), 0)"
            " FROM ledger_counters c LEFT JOIN ledger_entries e ON e.ledger = c.ledger"
            " WHERE c.ledger = %s GROUP BY c.value",
            (ledger,),
        ).fetchone()
    if row is None:
        raise RuntimeError(f"{ledger}: no counter")
    value, count, first, last = row
    if not (count == value == last and first == 1 and count > 0):
        raise RuntimeError(
            f"{ledger}: counter {value}, {count} entries numbered {first}..{last}: not 1..N"
        )


def new_ledger(server: ServerProcess, prefix: str) -> str:
    from ledger.v1 import ledger_pb2

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    server.stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=name), timeout=30)
    return name


def seed(url: str, ledger: str, n: int) -> None:
    """n entries straight into the tables, stored encodings included (posting a
    million through the API would measure the write path again, not the
    stream)."""
    import psycopg

    from ledger_service.api import wire
    from ledger_service.domain.validation import validate_new_entry

    conninfo = libpq_conninfo(sa.make_url(url))
    with psycopg.connect(conninfo) as conn:
        for start in range(1, n + 1, 50_000):
            sequences = list(range(start, min(n, start + 49_999) + 1))
            payloads = [
                wire.payload(
                    validate_new_entry(
                        ledger=ledger,
                        idempotency_key=f"seed-{s}",
                        debit_account="cash",
                        credit_account="sales",
                        amount=1 + s % 1000,
                        asset="USD",
                        entry_type="sale",
                        description="seeded entry",
                        metadata={"order": "42"},
                    )
                )
                for s in sequences
            ]
            conn.execute(
                "INSERT INTO ledger_entries (ledger, sequence, idempotency_key, debit_account,"
                " credit_account, amount, asset, entry_type, description, metadata, created_at,"
                " wire)"
                " SELECT %(l)s, t.s, 'seed-' || t.s, 'cash', 'sales', 1 + t.s %% 1000, 'USD',"
                " 'sale', 'seeded entry', '{\"order\": \"42\"}'::jsonb, clock_timestamp(), t.w"
                " FROM unnest(%(s)b::bigint[], %(w)b::bytea[]) AS t(s, w)",
                {"l": ledger, "s": sequences, "w": payloads},
            )
        conn.execute(
            "INSERT INTO ledger_counters (ledger, value, created_at) VALUES (%s, %s, now())",
            (ledger, n),
        )
        conn.execute("ANALYZE ledger_entries")


def run(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 3
    duration, warmup = (1.0, 0.3) if quick else (5.0, 1.0)
    catchup_n = 50_000 if quick else 1_000_000
    one_per_message_n = 20_000 if quick else 100_000
    samples: dict[str, list[dict[str, float]]] = {}

    def record(name: str, value: dict[str, float]) -> None:
        samples.setdefault(name, []).append(value)
        print(f"  {name}: " + ", ".join(f"{k}={v:,.1f}" for k, v in value.items()), flush=True)

    with bench_database() as url, ExitStack() as stack:
        engine = create_engine(url, pool_size=1)
        migrate.upgrade(engine)
        engine.dispose()
        # 8 connections (+8 overflow) per server: all of them, the psycopg
        # clients and the stream readers stay under Postgres' 100 connections.
        pool = ["--pool-size", "8"]
        servers: dict[str, ServerProcess] = {
            "ledger": ServerProcess(url, extra_args=pool),
            "unbatched": ServerProcess(url, extra_args=[*pool, "--no-group-commit"]),
            "one_per_message": ServerProcess(url, extra_args=[*pool, "--stream-batch", "1"]),
        }
        for mode in ("plain", "sequence", "noop"):
            servers[mode] = _baseline_server(url, mode)
        for s in servers.values():
            stack.enter_context(s)
        catchup_ledger = f"catchup-{uuid.uuid4().hex[:8]}"
        seed(url, catchup_ledger, catchup_n)

        for rep in range(1, reps + 1):
            print(f"repetition {rep}/{reps}", flush=True)
            for callers in (1, 16, 64):
                procs = 1 if callers == 1 else 2
                for mode in POST_MODES:
                    server = servers[mode]
                    ledger = new_ledger(servers["ledger"], "post")
                    specs = [
                        {
                            "kind": "post",
                            "address": server.address,
                            "ledger": ledger,
                            "concurrency": c,
                            "duration": duration,
                            "warmup": warmup,
                        }
                        for c in split(callers, procs)
                    ]
                    record(f"post_{mode}_{callers}", summarize(load(specs)))
                    if mode in GAP_FREE:
                        check_gap_free(url, ledger)
            ledger = new_ledger(servers["ledger"], "db")
            specs = [
                {
                    "kind": "db",
                    "url": url,
                    "ledger": ledger,
                    "size": 1,
                    "concurrency": c,
                    "duration": duration,
                    "warmup": warmup,
                }
                for c in split(16, 2)
            ]
            record("db_single_16", summarize(load(specs)))
            for size in (100, 1000):
                ledger = new_ledger(servers["ledger"], "batch")
                specs = [
                    {
                        "kind": "post",
                        "address": servers["ledger"].address,
                        "ledger": ledger,
                        "batch": size,
                        "concurrency": 2,
                        "duration": duration,
                        "warmup": warmup,
                    }
                    for _ in range(2)
                ]
                record(f"post_entries_{size}", summarize(load(specs)))
            ledger = new_ledger(servers["ledger"], "db")
            specs = [
                {
                    "kind": "db",
                    "url": url,
                    "ledger": ledger,
                    "size": 1000,
                    "concurrency": 2,
                    "duration": duration,
                    "warmup": warmup,
                }
                for _ in range(2)
            ]
            record("db_batch_1000", summarize(load(specs)))
            for mode, limit in (("ledger", catchup_n), ("one_per_message", one_per_message_n)):
                (r,) = load(
                    [
                        {
                            "kind": "catch_up",
                            "address": servers[mode].address,
                            "ledger": catchup_ledger,
                            "limit": limit,
                        }
                    ]
                )
                assert r["entries"] == limit, r
                record(f"catch_up_{mode}", {"entries_per_s": r["entries"] / r["seconds"]})
            rate = 0.5 * samples["post_ledger_16"][-1]["entries_per_s"]
            record("live_tail_16", live_tail(servers["ledger"], rate, duration))

    medians = {
        name: {k: statistics.median(v[k] for v in values) for k in values[0]}
        for name, values in samples.items()
    }
    return {"samples": samples, "medians": medians}


def _baseline_server(url: str, mode: str) -> ServerProcess:
    return ServerProcess(
        url, command=[sys.executable, "-m", "bench.servers", "--mode", mode, "--pool-size", "8"]
    )


def live_tail(server: ServerProcess, rate: float, duration: float) -> dict[str, float]:
    """16 followers (2 processes) while one writer process posts at `rate`.

    The followers stop once the writer's last planned entry has reached them
    (the ledger is new, so that is sequence N), or at a deadline far past the
    writer's planned end: on an overloaded machine the writer itself runs
    late, and a fixed deadline would count entries not yet posted as lost.
    """
    ledger = new_ledger(server, "tail")
    concurrency = 16
    planned = planned_posts(rate, duration, concurrency)
    deadline = time.time() + 1.5 + 4 * duration + 10.0
    followers = {
        "kind": "followers",
        "address": server.address,
        "ledger": ledger,
        "after": 0,
        "streams": 8,
        "until": planned,
        "deadline": deadline,
    }
    writer = {
        "kind": "rate_writer",
        "address": server.address,
        "ledger": ledger,
        "rate": rate,
        "duration": duration,
        "concurrency": concurrency,
    }
    results = load([followers, followers, writer])
    acks = {int(k): v for k, v in results[2]["acks"].items()}
    if sorted(acks) != list(range(1, planned + 1)):
        raise RuntimeError(f"live tail: the writer got {len(acks)} numbers, not 1..{planned}")
    delays = []
    missing = 0
    gaps = []
    for r in results[:2]:
        for arrivals in r["arrivals"]:
            got = {int(k): v for k, v in arrivals.items()}
            lost = sorted(seq for seq in acks if seq not in got)
            for seq, acked in acks.items():
                if seq in got:
                    # Negative: the follower had it before the writer's ack arrived.
                    delays.append(max(0.0, got[seq] - acked))
            missing += len(lost)
            if lost:
                gaps.append(
                    f"{len(lost)} of {len(acks)} (sequences {lost[0]}..{lost[-1]}; "
                    f"the stream got {len(got)}, up to {max(got, default=0)})"
                )
    if missing:
        late = max(acks.values(), default=0.0) - deadline
        raise RuntimeError(
            f"live tail: {missing} deliveries missing; the writer's last ack came "
            f"{late:+.1f} s from the followers' deadline; per stream: " + "; ".join(gaps)
        )
    return {
        # What the writer achieved: below `rate` when the machine fell behind.
        "rate_per_s": len(acks) / max(duration, results[2]["seconds"]),
        "p50_ms": percentile(delays, 0.50) * 1000,
        "p99_ms": percentile(delays, 0.99) * 1000,
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    engine = create_engine(ADMIN_URL, pool_size=1)
    with engine.connect() as conn:
        pg = conn.exec_driver_sql("SHOW server_version").scalar_one()
    engine.dispose()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgres": pg,
        "grpcio": version("grpcio"),
        "sqlalchemy": version("SQLAlchemy"),
        "psycopg": version("psycopg"),
    }


TARGETS = [
    # (name, numerator, denominator or None, threshold, unit)
    (
        "PostEntry @64 vs (a) naive gap-free (plain server)",
        "post_ledger_64",
        "post_plain_64",
        3.0,
        "x",
    ),
    ("PostEntry @64 vs (b) SEQUENCE", "post_ledger_64", "post_sequence_64", 1.0, "x"),
    ("PostEntry @64 vs (c) gRPC ceiling", "post_ledger_64", "post_noop_64", 0.7, "x"),
    ("PostEntries 1000 vs (d) DB batch ceiling", "post_entries_1000", "db_batch_1000", 0.8, "x"),
    ("StreamEntries catch-up, entries/s", "catch_up_ledger", None, 100_000, "/s"),
    ("Catch-up vs one entry per message", "catch_up_ledger", "catch_up_one_per_message", 5.0, "x"),
]


# Ratios reported beside the targets, without a threshold of their own.
COMPARISONS = [
    (
        "PostEntry @64 vs (a') this server without group commit",
        "post_ledger_64",
        "post_unbatched_64",
    ),
    (
        "PostEntry @16 vs (a') this server without group commit",
        "post_ledger_16",
        "post_unbatched_16",
    ),
    (
        "PostEntry @64, (a') vs (a): the one-statement write alone",
        "post_unbatched_64",
        "post_plain_64",
    ),
    # One process's gRPC work bounds any PostEntry server at about (c), so
    # this is the most group commit could reach over (a') in one process.
    (
        "PostEntry @64, (c) vs (a'): the bound on the first line here",
        "post_noop_64",
        "post_unbatched_64",
    ),
]


def compare(medians: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "value": medians[num]["entries_per_s"] / medians[den]["entries_per_s"]}
        for name, num, den in COMPARISONS
    ]


def evaluate(medians: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for name, num, den, threshold, unit in TARGETS:
        value = medians[num]["entries_per_s"]
        if den is not None:
            value /= medians[den]["entries_per_s"]
        rows.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "unit": unit,
                "met": value >= threshold,
            }
        )
    p99 = medians["live_tail_16"]["p99_ms"]
    rows.append(
        {
            "target": "Live tail p99 with 16 followers (ms)",
            "value": p99,
            "threshold": 50.0,
            "unit": "ms",
            "met": p99 <= 50.0,
        }
    )
    latency_ratio = medians["post_ledger_1"]["p50_ms"] / medians["post_unbatched_1"]["p50_ms"]
    rows.append(
        {
            "target": "Single-caller p50 latency vs one transaction per request (a')",
            "value": latency_ratio,
            "threshold": 1.10,
            "unit": "x (<=)",
            "met": latency_ratio <= 1.10,
        }
    )
    return rows


def write_report(result: dict[str, Any], out_dir: Path, md_path: Path, png_path: Path) -> None:
    medians = result["medians"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {result['date']} ({'quick' if result['quick'] else 'full'}"
        f" run, {result['reps']} repetition(s) interleaved, medians).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()) + ".",
        "Everything (Postgres, servers, load generators) shares this machine, so absolute",
        "numbers are noisy; the ratios against baselines run in the same run are what to read.",
        "",
        "## Targets",
        "",
        "| target | reached | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for row in result["targets"]:
        sign = "<=" if row["unit"] in ("ms", "x (<=)") else ">="
        unit = row["unit"].replace(" (<=)", "")
        lines.append(
            f"| {row['target']} | {row['value']:,.2f} {unit} | {sign} {row['threshold']:,} {unit}"
            f" | {'yes' if row['met'] else 'NO'} |"
        )
    lines += ["", "Also measured (no target):", ""]
    lines += [f"- {c['name']}: {c['value']:,.2f} x" for c in result["comparisons"]]
    lines += [
        "",
        "## Scenarios",
        "",
        "| scenario | entries/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, m in sorted(medians.items()):
        rate = m.get("entries_per_s", m.get("rate_per_s", float("nan")))
        lines.append(
            f"| {name} | {rate:,.0f} | {m.get('p50_ms', float('nan')):,.1f} |"
            f" {m.get('p99_ms', float('nan')):,.1f} |"
        )
    lines += [
        "",
        "Scenario names: `post_<server>_<callers>` is PostEntry, one entry per call, where",
        "`ledger` is this service (group commit); `plain` a plain server doing one",
        "transaction per call the obvious way, the counter row locked from its bump to the",
        "commit (baseline a); `unbatched` this service with `--no-group-commit`, one",
        "transaction per call through its own one-statement write (a'); `sequence` a",
        "Postgres SEQUENCE (b); `noop` no database work (c). Every gap-free run is checked",
        "afterwards: its ledger holds exactly 1..N. `db_*` are psycopg clients without gRPC",
        "running the server's own write statement with its parameter encodings, each",
        "statement its own transaction (d); `post_entries_<n>` is PostEntries with n",
        "entries per call; `catch_up_*` reads a seeded ledger from the start",
        "(`one_per_message` is the server with `--stream-batch 1`); `live_tail_16` is the",
        "delay from a post's acknowledgement to its arrival at each of 16 followers while a",
        "writer posts at half the 16-caller rate (its entries/s: the rate it achieved).",
        "",
        f"![throughput]({png_path.name})",
        "",
    ]
    md_path.write_text("\n".join(lines))
    (out_dir / ("quick.json" if result["quick"] else "latest.json")).write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n"
    )
    chart(medians, png_path)


def chart(medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    callers = [1, 16, 64]
    width = 0.16
    for i, mode in enumerate(POST_MODES):
        values = [medians[f"post_{mode}_{c}"]["entries_per_s"] for c in callers]
        left.bar([x + i * width for x in range(3)], values, width, label=mode)
    left.set_xticks([x + 2 * width for x in range(3)], [f"{c} callers" for c in callers])
    left.set_ylabel("entries/s")
    left.set_title("PostEntry, one entry per call")
    left.legend()
    names = [
        "db_single_16",
        "post_entries_100",
        "post_entries_1000",
        "db_batch_1000",
        "catch_up_one_per_message",
        "catch_up_ledger",
    ]
    right.barh(names, [medians[n]["entries_per_s"] for n in names])
    right.set_xscale("log")
    right.set_xlabel("entries/s (log)")
    right.set_title("Batches and streams")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
    result["targets"] = evaluate(result["medians"])
    result["comparisons"] = compare(result["medians"])
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
