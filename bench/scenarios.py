"""What the benchmark runs: the servers it starts, the load specs of every
scenario, and the interleaved repetitions whose samples the report reads."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.database import (
    RARE,
    bench_database,
    check_gap_free,
    entries_per_write,
    rare_entries,
    seed,
)
from bench.load import READY, planned_posts, worker_name
from ledger_service.integrity import verify
from ledger_service.storage import migrate
from ledger_service.storage.uow import create_engine
from ledger_service.testing import ServerProcess

# A server's metrics, recorded and served (unscraped) on a free port.
METRICS_ARGS = ("--metrics-listen", "127.0.0.1:0")
# PostEntry servers, in the order of the tables and the chart.
POST_MODES = (
    "ledger",
    "secured",
    "metrics",
    "unchained",
    "unbatched",
    "plain",
    "sequence",
    "noop",
)
GAP_FREE = ("ledger", "secured", "metrics", "unchained", "unbatched", "plain")
# This server under other PostEntry loads, at 64 callers only, each run right
# after post_ledger_64 (the same load, one posting, no limits) of the same
# repetition: `limits` posts to accounts that all have balance limits (never
# reached), `multi` posts entries of MULTI_POSTINGS postings.
VARIANTS_64 = ("limits", "multi")
MULTI_POSTINGS = 4
# Wide enough never to be reached: what is measured is the check, not a refusal.
WIDE_LIMIT = 10**15
# The ListAccounts ledger: entry s debits acct-<s> and credits "sales", so it
# has LIST_ENTRIES + 1 accounts, listed a page of LIST_PAGE at a time.
LIST_ENTRIES = 20_000
LIST_PAGE = 1000
# Concurrent callers of the read scenarios (one load process each).
AS_OF_CALLERS = 4
LIST_CALLERS = 2
# PostEntry at 64 callers spread over LEDGERS ledgers (caller i posts to
# ledger i % LEDGERS), against 64 on one, side by side on the same server.
LEDGERS = 8
# Seconds from the moment every load process of a run has started (imported)
# to their common start: time to connect and be waiting.
START_MARGIN = 0.5
# This server as a supervisor of WORKERS processes sharing its port
# (`serve --workers`), against one process; both driven over
# SPREAD_CHANNELS connections per load process, so that the kernel has
# connections to spread over the workers (bench/load.py: `channels`).
WORKERS = 2
SPREAD_CHANNELS = 32


def alternating(pair: tuple[int, int], rep: int) -> tuple[int, ...]:
    """An A/B pair in the order of repetition `rep`: baseline first in odd
    ones, last in even ones, so that neither side always runs first."""
    return pair if rep % 2 else pair[::-1]


def load(
    specs: list[dict[str, Any]], during: Callable[[], None] | None = None
) -> list[dict[str, Any]]:
    """Runs load processes together, aligned on one start time, given once
    all of them have started (bench/load.py); `during` is called in the
    middle of their measurement window."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.load", json.dumps({**s, "process": i})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i, s in enumerate(specs)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != READY:
                raise RuntimeError(f"load process failed to start ({p.wait(60)})")
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    start_at = time.time() + START_MARGIN
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"{start_at!r}\n")
        p.stdin.flush()
    if during is not None:
        middle = start_at + specs[0].get("warmup", 0.0) + specs[0].get("duration", 0.0) / 2
        time.sleep(max(0.0, middle - time.time()))
        during()
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


def summarize(results: list[dict[str, Any]], rate: str = "entries_per_s") -> dict[str, float]:
    """The load processes' count per second (named `rate`: what the
    processes counted as "entries", e.g. calls or accounts listed) and the
    latency percentiles of their calls."""
    entries = sum(r["entries"] for r in results)
    seconds = max(r["seconds"] for r in results)
    lat = [x for r in results for x in r.get("latencies", [])]
    return {
        rate: entries / seconds,
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
    }


def server_cpu_seconds(server: ServerProcess) -> float:
    """CPU (user + system, every thread) the server process has used so far."""
    assert server.proc is not None
    stat = Path(f"/proc/{server.proc.pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def connection_spread(port: int) -> list[int]:
    """The established TCP connections to `port` per process serving them,
    most first (from `ss`; empty if it cannot tell)."""
    try:
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    pids = Counter(m.group(1) for m in re.finditer(r"pid=(\d+)", out))
    return sorted(pids.values(), reverse=True)


def load_watching(specs: list[dict[str, Any]], port: int) -> tuple[list[dict[str, Any]], list[int]]:
    """load(), and the connection_spread() of `port` in the middle of its window."""
    spread: list[int] = []
    results = load(specs, during=lambda: spread.extend(connection_spread(port)))
    return results, spread


def first_callers(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbers the callers of a load's processes across all of them (caller
    i of process k is caller sum(concurrencies before k) + i)."""
    first = 0
    for spec in specs:
        spec["first_caller"] = first
        first += spec["concurrency"]
    return specs


def new_ledger(server: ServerProcess, prefix: str) -> str:
    from ledger.v1 import ledger_pb2

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    server.stub.InitializeCounter(ledger_pb2.InitializeCounterRequest(ledger=name), timeout=30)
    return name


def run(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 3
    rounds = 2 if quick else RATE_ROUNDS
    duration, warmup = (1.0, 0.3) if quick else (5.0, 1.0)
    catchup_n = 50_000 if quick else 1_000_000
    one_per_message_n = 20_000 if quick else 100_000
    samples: dict[str, list[dict[str, float]]] = {}

    def timed(concurrencies: list[int], **spec: Any) -> list[dict[str, Any]]:
        """One load process per entry of `concurrencies`, measuring the same window."""
        return [
            {**spec, "concurrency": c, "duration": duration, "warmup": warmup}
            for c in concurrencies
        ]

    def record(name: str, value: dict[str, float]) -> None:
        samples.setdefault(name, []).append(value)
        print(f"  {name}: " + ", ".join(f"{k}={v:,.1f}" for k, v in value.items()), flush=True)

    with bench_database() as url, ExitStack() as stack:
        engine = create_engine(url, pool_size=1)
        migrate.upgrade(engine)
        engine.dispose()
        # 8 connections (+8 overflow) per server process, opened as used:
        # all of them, the psycopg clients and the stream readers stay under
        # Postgres' 100 connections.
        pool = ["--pool-size", "8"]
        servers: dict[str, ServerProcess] = {
            "ledger": ServerProcess(url, extra_args=pool),
            # The same with its metrics recorded (and served, unscraped).
            "metrics": ServerProcess(url, extra_args=[*pool, *METRICS_ARGS]),
            # The same without its hash chain (bench/unchained.py): what the chain costs.
            "unchained": ServerProcess(
                url, command=[sys.executable, "-m", "bench.unchained", "serve", *pool]
            ),
            "unbatched": ServerProcess(url, extra_args=[*pool, "--no-group-commit"]),
            "one_per_message": ServerProcess(url, extra_args=[*pool, "--stream-batch", "1"]),
            # A supervisor of WORKERS such processes on one port.
            "workers": ServerProcess(url, extra_args=[*pool, "--workers", str(WORKERS)]),
        }
        for mode in ("plain", "sequence", "noop"):
            servers[mode] = _baseline_server(url, mode)
        secure_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        servers["secured"], secured_spec = _secured_server(url, pool, secure_dir)
        for s in servers.values():
            stack.enter_context(s)
        catchup_ledger = f"catchup-{uuid.uuid4().hex[:8]}"
        seed(url, catchup_ledger, catchup_n)
        # Seeded whole (entries, history, totals), so that it verifies clean
        # too, should anything verify every ledger of the database.
        list_ledger = f"accounts-{uuid.uuid4().hex[:8]}"
        seed(url, list_ledger, LIST_ENTRIES, debit_of=lambda s: f"acct-{s:06d}")

        for rep in range(1, reps + 1):
            print(f"repetition {rep}/{reps}", flush=True)
            for callers in (1, 16, 64):
                procs = 1 if callers == 1 else 2
                # The metrics A/B side by side, its order alternating, as
                # the other pairs: its 3% budget is below the drift between
                # runs further apart on this shared machine.
                pair = ("ledger", "metrics") if rep % 2 else ("metrics", "ledger")
                rest = tuple(m for m in POST_MODES if m not in pair)
                modes: tuple[str, ...] = (*pair, *rest)
                if callers == 64:
                    modes = (*pair, *VARIANTS_64, *rest)
                for mode in modes:
                    server = servers["ledger" if mode in VARIANTS_64 else mode]
                    ledger = new_ledger(servers["ledger"], "post")
                    concurrencies = split(callers, procs)
                    extra: dict[str, Any] = {}
                    if mode == "secured":
                        extra = secured_spec
                    elif mode == "limits":
                        set_wide_limits(server, ledger, concurrencies)
                    elif mode == "multi":
                        extra = {"postings": MULTI_POSTINGS}
                    specs = timed(
                        concurrencies, kind="post", address=server.address, ledger=ledger, **extra
                    )
                    cpu = server_cpu_seconds(server)
                    value = summarize(load(specs))
                    cpu = server_cpu_seconds(server) - cpu
                    if mode == "multi":
                        value["postings_per_s"] = value["entries_per_s"] * MULTI_POSTINGS
                    record(f"post_{mode}_{callers}", value)
                    if mode in GAP_FREE or mode in VARIANTS_64:
                        posted = check_gap_free(url, ledger)
                        # Its whole run's CPU (warm-up included) over every
                        # entry it posted: steadier than entries/s here.
                        value["cpu_us_per_entry"] = cpu / posted * 1e6
            rate = RATE_SHARE * samples["post_ledger_64"][-1]["entries_per_s"]
            for name, value in at_fixed_rate(url, pool, rate, duration, rounds):
                record(name, value)
            for name, value in many_ledgers(url, servers["ledger"], timed, rep):
                record(name, value)
            # One transaction per post: the counter row alone is the limit.
            for name, value in many_ledgers(url, servers["unbatched"], timed, rep, "unbatched_"):
                record(name, value)
            for name, value in workers_pairs(url, servers, timed, rep):
                record(name, value)
            ledger = new_ledger(servers["ledger"], "db")
            specs = timed(split(16, 2), kind="db", url=url, ledger=ledger, size=1)
            record("db_single_16", summarize(load(specs)))
            for size, mode in ((100, "ledger"), (1000, "ledger"), (1000, "unchained")):
                ledger = new_ledger(servers["ledger"], "batch")
                address = servers[mode].address
                specs = timed([2, 2], kind="post", address=address, ledger=ledger, batch=size)
                suffix = "" if mode == "ledger" else f"_{mode}"
                record(f"post_entries_{size}{suffix}", summarize(load(specs)))
                check_gap_free(url, ledger)
            ledger = new_ledger(servers["ledger"], "db")
            specs = timed([2, 2], kind="db", url=url, ledger=ledger, size=1000)
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
            unfiltered = catchup_n / samples["catch_up_ledger"][-1]["entries_per_s"]
            record(
                "stream_account_1pct",
                filtered_catch_up(servers["ledger"], catchup_ledger, catchup_n, unfiltered),
            )
            record("verify_ledger", verify_rate(url, catchup_ledger, catchup_n))
            # The latency target at one caller (the read itself); at
            # AS_OF_CALLERS too, where the callers, the server and Postgres
            # share the two cores.
            for callers, suffix in ((1, "_1"), (AS_OF_CALLERS, "")):
                specs = timed(
                    [callers],
                    kind="as_of",
                    address=servers["ledger"].address,
                    ledger=catchup_ledger,
                    head=catchup_n,
                )
                record(f"get_account_as_of{suffix}", summarize(load(specs), "calls_per_s"))
                specs = [{**specs[0], "current": True}]
                record(f"get_account_current{suffix}", summarize(load(specs), "calls_per_s"))
            specs = timed(
                [LIST_CALLERS],
                kind="list_accounts",
                address=servers["ledger"].address,
                ledger=list_ledger,
                page_size=LIST_PAGE,
                accounts=LIST_ENTRIES + 1,
            )
            record(f"list_accounts_{LIST_PAGE}", summarize(load(specs), "accounts_per_s"))
            rate = 0.5 * samples["post_ledger_16"][-1]["entries_per_s"]
            record("live_tail_16", live_tail(servers["ledger"], rate, duration))

    medians = {
        name: {k: statistics.median(v[k] for v in values) for k in values[0]}
        for name, values in samples.items()
    }
    return {"samples": samples, "medians": medians}


# A load spec for every process, given each one's callers (run.timed).
Timed = Callable[..., list[dict[str, Any]]]


def many_ledgers(
    url: str, server: ServerProcess, timed: Timed, rep: int, label: str = ""
) -> list[tuple[str, dict[str, float]]]:
    """PostEntry at 64 callers on one ledger and on LEDGERS (caller i to
    ledger i % LEDGERS), side by side on the same server, over the same
    connections as every other post run; every ledger checked 1..N. The
    rows are post_{label}ledgers_{count}_64."""
    out = []
    for count in alternating((1, LEDGERS), rep):
        ledgers = [new_ledger(server, "many") for _ in range(count)]
        specs = first_callers(
            timed(split(64, 2), kind="post", address=server.address, ledgers=ledgers)
        )
        value = summarize(load(specs))
        for ledger in ledgers:
            check_gap_free(url, ledger)
        value["entries_per_write"] = entries_per_write(url, ledgers)
        out.append((f"post_{label}ledgers_{count}_64", value))
    return out


# The cost of the metrics as server CPU per entry at a fixed rate below
# saturation, where group sizes follow the rate, not the server's speed:
# RATE_SERVERS driven at once, RATE_CALLERS callers each, so that the
# machine's other load falls on all of them alike. They are new processes
# of the same history (started for the measurement, warmed up alike):
# the long-running servers have served different loads, and a server's
# CPU per entry moves with that by about as much as the budget. `twin` is
# a second `ledger`: `metrics` is held against the two (their mean, per
# round), and `ledger` against `twin` is the A/A control, how far two
# identical servers differ under this measurement. Each is posted to at
# RATE_SHARE of the repetition's post_ledger_64 entries/s, RATE_ROUNDS
# times per repetition: the three at once stay below what the machine can do.
RATE_SERVERS = ("ledger", "twin", "metrics")
RATE_CALLERS = 64
RATE_SHARE = 0.1
RATE_ROUNDS = 6


def at_fixed_rate(
    url: str, server_args: list[str], rate: float, duration: float, rounds: int
) -> list[tuple[str, dict[str, float]]]:
    """RATE_SERVERS started with `server_args` (`metrics` with
    --metrics-listen too), warmed up by one round, then `rounds` measured
    (rate_rounds()); stopped after."""
    with ExitStack() as stack:
        servers = {
            m: stack.enter_context(
                ServerProcess(
                    url, extra_args=[*server_args, *(METRICS_ARGS if m == "metrics" else [])]
                )
            )
            for m in RATE_SERVERS
        }
        rate_rounds(url, servers, rate, duration, 1)
        return rate_rounds(url, servers, rate, duration, rounds)


def rate_rounds(
    url: str, servers: dict[str, ServerProcess], rate: float, duration: float, rounds: int
) -> list[tuple[str, dict[str, float]]]:
    """`rounds` runs of RATE_SERVERS at once, each posted to at `rate`
    entries/s by a load process of its own (bench/load.py rate_writer:
    every planned entry, late ones too), their order rotating from round to
    round. Rows post_rate_{server}_64: the server's CPU over the run per
    entry, the rate reached, the posts sent again after UNAVAILABLE and the
    entries per write; and post_rate_baseline_64, the mean CPU per entry of
    `ledger` and `twin` in the round. Every ledger is checked 1..N with
    every planned entry in it."""
    out = []
    planned = planned_posts(rate, duration, RATE_CALLERS)
    for i in range(rounds):
        k = i % len(RATE_SERVERS)
        order = RATE_SERVERS[k:] + RATE_SERVERS[:k]
        ledgers = {m: new_ledger(servers[m], "rate") for m in order}
        specs = [
            {
                "kind": "rate_writer",
                "address": servers[m].address,
                "ledger": ledgers[m],
                "rate": rate,
                "duration": duration,
                "concurrency": RATE_CALLERS,
            }
            for m in order
        ]
        before = {m: server_cpu_seconds(servers[m]) for m in order}
        results = dict(zip(order, load(specs), strict=True))
        cpu = {m: server_cpu_seconds(servers[m]) - before[m] for m in order}
        values = {}
        for m in RATE_SERVERS:
            posted = check_gap_free(url, ledgers[m])
            if posted != planned:
                raise RuntimeError(f"{m} at a fixed rate: {posted} entries, {planned} planned")
            values[m] = {
                "cpu_us_per_entry": cpu[m] / posted * 1e6,
                "rate_per_s": posted / max(duration, results[m]["seconds"]),
                "retries": float(results[m]["retries"]),
                "entries_per_write": entries_per_write(url, [ledgers[m]]),
            }
            out.append((f"post_rate_{m}_64", values[m]))
        baseline = (values["ledger"]["cpu_us_per_entry"] + values["twin"]["cpu_us_per_entry"]) / 2
        out.append(("post_rate_baseline_64", {"cpu_us_per_entry": baseline}))
    return out


# The workers' A/B loads: (name, callers per load process, PostEntries batch
# or 0 for PostEntry).
WORKER_LOADS: tuple[tuple[str, Sequence[int], int], ...] = (
    ("post_workers_{}_64", split(64, 2), 0),
    ("post_entries_1000_workers_{}", [2, 2], 1000),
)


def workers_pairs(
    url: str, servers: dict[str, ServerProcess], timed: Timed, rep: int
) -> list[tuple[str, dict[str, float]]]:
    """Each of WORKER_LOADS against this server in one process and as
    WORKERS workers, side by side, both over SPREAD_CHANNELS connections per
    load process. The workers' runs say how the kernel spread the
    connections: `busiest_share`, the busiest worker's share of them
    (1/WORKERS: even); each ledger checked 1..N."""
    out = []
    if rep == 1:
        # The workers are new processes: warmed up as the one process has
        # been by every run before, by one such run, not measured.
        ledger = new_ledger(servers["ledger"], "warm")
        address = servers["workers"].address
        load(
            timed(
                split(64, 2), kind="post", address=address, ledger=ledger, channels=SPREAD_CHANNELS
            )
        )
    for name, callers, batch in WORKER_LOADS:
        for workers in alternating((1, WORKERS), rep):
            server = servers["ledger" if workers == 1 else "workers"]
            ledger = new_ledger(servers["ledger"], "workers")
            extra = {"batch": batch} if batch else {}
            specs = timed(
                list(callers),
                kind="post",
                address=server.address,
                ledger=ledger,
                channels=SPREAD_CHANNELS,
                **extra,
            )
            results, spread = load_watching(specs, server.port)
            value = summarize(results)
            if workers > 1:  # NaN if `ss` could not tell
                value["busiest_share"] = spread[0] / sum(spread) if spread else float("nan")
            check_gap_free(url, ledger)
            value["entries_per_write"] = entries_per_write(url, [ledger])
            out.append((name.format(workers), value))
    return out


# Reads of the filtered catch-up per repetition, one after the other: the
# median is its time (a read is short; one would be mostly noise).
FILTERED_READS = 3


def filtered_catch_up(
    server: ServerProcess, ledger: str, n: int, unfiltered_s: float
) -> dict[str, float]:
    """StreamEntries of the seeded ledger filtered to its rare account (1%
    of its entries), read to the caught_up marker FILTERED_READS times, each
    checked (bench/load.py: every entry the account's; here: all of them,
    through the head); and `unfiltered_ms`, the whole ledger read
    unfiltered in the same repetition (catch_up_ledger): what a client that
    filters on its side waits for, at least."""
    expected = rare_entries(n)
    (r,) = load(
        [
            {
                "kind": "catch_up",
                "address": server.address,
                "ledger": ledger,
                "account": RARE,
                "reads": FILTERED_READS,
            }
        ]
    )
    if (r["entries"], r["last"], r["through"]) != (len(expected), expected[-1], n):
        raise RuntimeError(
            f"filtered stream: {r['entries']} entries up to {r['last']}, through"
            f" {r['through']}; the seed has {len(expected)} up to {expected[-1]}, head {n}"
        )
    return {
        "entries_per_s": len(expected) / r["seconds"],
        "caught_up_ms": r["seconds"] * 1000,
        "unfiltered_ms": unfiltered_s * 1000,
    }


def set_wide_limits(server: ServerProcess, ledger: str, concurrencies: list[int]) -> None:
    """Limits on both accounts of every caller of a post load (see
    bench/load.py): a maximum net debit on the one it debits, a maximum net
    credit on the one it credits, both WIDE_LIMIT."""
    from ledger.v1 import ledger_pb2

    for process, callers in enumerate(concurrencies):
        for i in range(callers):
            worker = worker_name(process, i)
            debited = server.stub.SetAccountLimits(
                ledger_pb2.SetAccountLimitsRequest(
                    ledger=ledger, account=f"d-{worker}", asset="USD", max_net_debit=WIDE_LIMIT
                ),
                timeout=30,
            ).balance
            credited = server.stub.SetAccountLimits(
                ledger_pb2.SetAccountLimitsRequest(
                    ledger=ledger, account=f"c-{worker}", asset="USD", max_net_credit=WIDE_LIMIT
                ),
                timeout=30,
            ).balance
            if not (
                debited.HasField("max_net_debit")
                and debited.max_net_debit == WIDE_LIMIT
                and not debited.HasField("max_net_credit")
                and credited.HasField("max_net_credit")
                and credited.max_net_credit == WIDE_LIMIT
                and not credited.HasField("max_net_debit")
            ):
                raise RuntimeError(
                    f"SetAccountLimits for {worker}'s accounts answered {debited} and {credited}"
                )


def _secured_server(
    url: str, pool: list[str], directory: Path
) -> tuple[ServerProcess, dict[str, str]]:
    """This server with an auth file and TLS, and what a load spec needs to
    call it (the token, the CA): the cost of the checks, side by side."""
    import trustme

    from ledger_service.auth.principals import token_digest
    from ledger_service.auth.tokens import new_token

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, root = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    root.write_bytes(ca.cert_pem.bytes())
    token = new_token()
    auth = directory / "auth.toml"
    auth.write_text(
        f'[[principal]]\nname = "bench"\ntoken_sha256 = ["{token_digest(token)}"]\n'
        'roles = ["writer:*"]\n'
    )
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth)]
    return ServerProcess(url, extra_args=[*pool, *tls]), {"token": token, "root_ca": str(root)}


def _baseline_server(url: str, mode: str) -> ServerProcess:
    return ServerProcess(
        url, command=[sys.executable, "-m", "bench.servers", "--mode", mode, "--pool-size", "8"]
    )


def verify_rate(url: str, ledger: str, n: int) -> dict[str, float]:
    """`ledger-service verify` of the seeded ledger (chain, numbers, totals),
    as the command runs it, minus process start."""
    engine = create_engine(url, pool_size=verify.WORKERS + 2)
    try:
        started = time.perf_counter()
        problems = list(verify.verify(engine, [ledger]))
        seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    assert not problems, problems[:5]
    return {"entries_per_s": n / seconds}


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
