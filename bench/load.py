"""Load generator: one process of a scenario, started by bench/run.py.

`python -m bench.load '<json spec>'` prints READY once imported, reads the
run's wall-clock `start_at` from its standard input, and prints one JSON
line of results. Every process of a run waits for that same `start_at`,
warms up, then counts only what completes inside the measurement window, so
several load processes measure the same interval.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import grpc
import psycopg
import sqlalchemy as sa
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from bench.database import HOT, hot_debits
from ledger_service.domain.balances import Movements
from ledger_service.domain.validation import validate_new_entry
from ledger_service.storage.numbering import TAKE_AND_INSERT_PG, statement_params
from ledger_service.storage.timeouts import libpq_conninfo

# What a load process prints once it is ready to be given its start time.
READY = "ready"


def worker_name(process: int, caller: int) -> str:
    """Caller `caller` of load process `process`: its accounts are
    d-<name> (debited) and c-<name> (credited)."""
    return f"{process}-{caller}"


def _request(ledger: str, key: str, worker: str, postings: int = 0) -> ledger_pb2.PostEntryRequest:
    """One posting in the single pair of fields; with `postings`, that many
    in `postings`, each between two accounts of the caller's own
    (d<j>-<worker> and c<j>-<worker>), so each is a plain post's work on the
    accounts and a posting's cost compares with a one-posting entry's."""
    if postings:
        return ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key=key,
            postings=[
                ledger_pb2.Posting(
                    debit_account=f"d{j}-{worker}",
                    credit_account=f"c{j}-{worker}",
                    amount=1,
                    asset="USD",
                )
                for j in range(postings)
            ],
        )
    return ledger_pb2.PostEntryRequest(
        ledger=ledger,
        idempotency_key=key,
        debit_account=f"d-{worker}",
        credit_account=f"c-{worker}",
        amount=1,
        asset="USD",
    )


def _channel(spec: dict[str, Any], own_connection: bool = False) -> grpc.aio.Channel:
    """TLS when the spec names a CA to trust (the server's certificate is for
    localhost). `own_connection`: a TCP connection of the channel's own (gRPC
    otherwise shares one between the channels of a process to one address)."""
    options: list[tuple[str, Any]] = []
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if "root_ca" not in spec:
        return grpc.aio.insecure_channel(spec["address"], options=options)
    with open(spec["root_ca"], "rb") as ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    options.append(("grpc.ssl_target_name_override", "localhost"))
    return grpc.aio.secure_channel(spec["address"], credentials, options=options)


def _loop_time(t: float) -> float:
    """The event loop's clock at wall-clock time `t`."""
    return asyncio.get_running_loop().time() + t - time.time()


async def _wait_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


async def post_load(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers posting one entry per call (or `batch` per
    PostEntries call) as fast as they can; each entry of one posting, or of
    `postings` (PostEntry only).

    `ledgers` (instead of `ledger`): caller i of the run (`first_caller` + i
    of this process) posts to ledgers[i % len(ledgers)]. `channels` (default
    1): that many channels, each its own TCP connection, all connected
    before the measurement window; caller i's n-th call goes on channel
    (i + n) % channels, so that every caller's calls spread over all the
    connections (and so over the workers a kernel spreads them to)."""
    start, end = (
        spec["start_at"] + spec["warmup"],
        spec["start_at"] + spec["warmup"] + spec["duration"],
    )
    batch = spec.get("batch", 0)
    postings = spec.get("postings", 0)
    ledgers: list[str] = spec.get("ledgers") or [spec["ledger"]]
    first = spec.get("first_caller", 0)
    count = spec.get("channels", 1)
    latencies: list[float] = []
    done: list[float] = []  # when each call completed, from the start
    entries = 0
    metadata = (("authorization", f"Bearer {spec['token']}"),) if "token" in spec else None
    channels = [_channel(spec, own_connection=count > 1) for _ in range(count)]
    try:
        if count > 1:
            # Connected by the start, as a rule (bench/scenarios.py
            # START_MARGIN); late into the warm-up is fine still.
            try:
                async with asyncio.timeout_at(_loop_time(start)):
                    await asyncio.gather(*(c.channel_ready() for c in channels))
            except TimeoutError:
                raise RuntimeError(
                    f"{count} connections not ready when the measurement window opened"
                ) from None
        stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]

        async def caller(i: int) -> None:
            nonlocal entries
            worker = worker_name(spec["process"], i)
            ledger = ledgers[(first + i) % len(ledgers)]
            n = 0
            await _wait_until(spec["start_at"])
            while time.time() < end:
                n += 1
                stub = stubs[(i + n) % count]
                t0 = time.time()
                if batch:
                    await stub.PostEntries(
                        ledger_pb2.PostEntriesRequest(
                            ledger=ledger,
                            entries=[
                                ledger_pb2.EntryInput(
                                    idempotency_key=f"{worker}-{n}-{j}",
                                    debit_account=f"d-{worker}",
                                    credit_account=f"c-{worker}",
                                    amount=1,
                                    asset="USD",
                                )
                                for j in range(batch)
                            ],
                        ),
                        timeout=60,
                        metadata=metadata,
                    )
                else:
                    await stub.PostEntry(
                        _request(ledger, f"{worker}-{n}", worker, postings),
                        timeout=60,
                        metadata=metadata,
                    )
                t1 = time.time()
                done.append(t1 - spec["start_at"])
                if start <= t1 <= end:
                    latencies.append(t1 - t0)
                    entries += batch or 1

        await asyncio.gather(*(caller(i) for i in range(spec["concurrency"])))
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    if not entries:  # a stall, counted as such; said, so that it is not taken for noise
        print(
            f"load process {spec['process']}: not one call completed inside the measurement"
            f" window ({spec['warmup']:.1f} s to {spec['warmup'] + spec['duration']:.1f} s"
            f" from the start); {len(done)} completed, at {[round(t, 2) for t in done[:5]]}"
            f"..{[round(t, 2) for t in done[-5:]]} s",
            file=sys.stderr,
        )
    return {"entries": entries, "seconds": spec["duration"], "latencies": latencies}


def slots(caller: int, rate: float, duration: float, concurrency: int) -> list[float]:
    """When (seconds after the start) caller `caller` of `concurrency` posts,
    for a total `rate` over `duration`: callers staggered, each on its own
    fixed interval."""
    interval = concurrency / rate
    t, out = caller * interval / concurrency, []
    while t < duration:
        out.append(t)
        t += interval
    return out


def planned_posts(rate: float, duration: float, concurrency: int) -> int:
    return sum(len(slots(i, rate, duration, concurrency)) for i in range(concurrency))


# A post refused UNAVAILABLE is sent again with its key, as the clients do
# (ledger_client: RETRYABLE), up to this many times, RETRY_PAUSE apart: on
# an overloaded machine gRPC's core was seen to refuse streams (RST_STREAM
# REFUSED_STREAM) below the per-connection limit (docs/security.md).
RETRIES = 10
RETRY_PAUSE = 0.02


async def rate_writer(spec: dict[str, Any]) -> dict[str, Any]:
    """Posts every planned entry (slots()) -- late ones too, if the machine
    falls behind; returns each entry's acknowledgement time by sequence, the
    seconds from the start to the last one and the posts sent again."""
    acks: dict[int, float] = {}
    retries = 0
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def post(request: ledger_pb2.PostEntryRequest) -> ledger_pb2.PostEntryResponse:
            nonlocal retries
            for attempt in range(RETRIES + 1):
                try:
                    return await stub.PostEntry(request, timeout=60)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == RETRIES:
                        raise
                    retries += 1
                    await asyncio.sleep(RETRY_PAUSE)
            raise AssertionError("unreachable")

        async def caller(i: int) -> None:
            worker = worker_name(spec["process"], i)
            plan = slots(i, spec["rate"], spec["duration"], spec["concurrency"])
            for n, offset in enumerate(plan, 1):
                await _wait_until(spec["start_at"] + offset)
                r = await post(_request(spec["ledger"], f"{worker}-{n}", worker))
                acks[r.entry.sequence] = time.time()

        await asyncio.gather(*(caller(i) for i in range(spec["concurrency"])))
    seconds = max(acks.values(), default=0.0) - spec["start_at"]
    return {"acks": acks, "seconds": seconds, "retries": retries}


async def followers(spec: dict[str, Any]) -> dict[str, Any]:
    """`streams` following streams from `after`; arrival time of every entry
    per stream, until `until` arrived or `deadline` passed."""
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def follow() -> dict[int, float]:
            seen: dict[int, float] = {}
            call = stub.StreamEntries(
                ledger_pb2.StreamEntriesRequest(
                    ledger=spec["ledger"], after_sequence=spec["after"], follow=True
                )
            )
            try:
                async with asyncio.timeout(max(1.0, spec["deadline"] - time.time())):
                    async for message in call:
                        now = time.time()
                        for e in message.entries:
                            seen[e.sequence] = now
                        if spec["until"] and spec["until"] in seen:
                            break
            except TimeoutError:
                pass
            call.cancel()
            return seen

        results = await asyncio.gather(*(follow() for _ in range(spec["streams"])))
    return {"arrivals": results}


async def catch_up(spec: dict[str, Any]) -> dict[str, Any]:
    """Reads a ledger from the start (follow=false), up to `limit` entries.

    With `account`: the stream filtered to that account's entries, read to
    its caught_up marker, `reads` times one after the other (`seconds`: the
    median); every entry must have a posting of the account, and the
    marker's message must say the stream has looked through the head."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    account = spec.get("account", "")
    async with grpc.aio.insecure_channel(spec["address"], options=options) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        if not account:
            return await _read_from_start(stub, spec["ledger"], "", spec["limit"])
        await channel.channel_ready()
        reads = [
            await _read_from_start(stub, spec["ledger"], account, 0)
            for _ in range(spec.get("reads", 1))
        ]
    if any(r != {**reads[0], "seconds": r["seconds"]} for r in reads):
        raise RuntimeError(f"the stream filtered to {account} read differently: {reads}")
    return {**reads[0], "seconds": statistics.median(r["seconds"] for r in reads)}


async def _read_from_start(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub, ledger: str, account: str, limit: int
) -> dict[str, Any]:
    """One catch-up: to `limit` entries, or with `account` to the marker."""
    t0 = time.time()
    call = stub.StreamEntries(ledger_pb2.StreamEntriesRequest(ledger=ledger, account=account))
    count, last, through, head, caught_up = 0, 0, 0, 0, False
    async for message in call:
        if message.entries:
            count += len(message.entries)
            last = message.entries[-1].sequence
            if account and not all(_touches(e, account) for e in message.entries):
                raise RuntimeError(f"the stream filtered to {account} sent another's entry")
        through, head = message.through_sequence, message.head_sequence
        if account and message.caught_up:
            caught_up = True
            break
        if not account and count >= limit:
            call.cancel()
            break
    elapsed = time.time() - t0
    if account and not (caught_up and through == head):
        raise RuntimeError(
            f"the stream filtered to {account} ended through {through}"
            f" (caught up: {caught_up}), the head being {head}"
        )
    return {"entries": count, "last": last, "through": through, "seconds": elapsed}


def _touches(entry: ledger_pb2.Entry, account: str) -> bool:
    pairs = [(p.debit_account, p.credit_account) for p in entry.postings]
    pairs.append((entry.debit_account, entry.credit_account))
    return any(account in pair for pair in pairs)


async def as_of_load(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers reading GetAccount(the hot account, as_of_sequence
    = a random number in 1..`head`) of the seeded ledger as fast as they can
    (with `current`: as_of_sequence 0, its current totals, the same call
    without the history); every answer is checked against the seed
    (bench/database.py)."""
    start, end = (
        spec["start_at"] + spec["warmup"],
        spec["start_at"] + spec["warmup"] + spec["duration"],
    )
    head = spec["head"]
    current = spec.get("current", False)
    expected = hot_debits(head)
    latencies: list[float] = []
    calls = 0
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def caller(i: int) -> None:
            nonlocal calls
            rng = random.Random(f"{spec['process']}-{i}")
            await _wait_until(spec["start_at"])
            while time.time() < end:
                as_of = head if current else rng.randint(1, head)
                t0 = time.time()
                r = await stub.GetAccount(
                    ledger_pb2.GetAccountRequest(
                        ledger=spec["ledger"], account=HOT, as_of_sequence=0 if current else as_of
                    ),
                    timeout=60,
                )
                t1 = time.time()
                _check_as_of(r, as_of, expected[as_of // 10])
                if start <= t1 <= end:
                    latencies.append(t1 - t0)
                    calls += 1

        await asyncio.gather(*(caller(i) for i in range(spec["concurrency"])))
    return {"entries": calls, "seconds": spec["duration"], "latencies": latencies}


def _check_as_of(r: ledger_pb2.GetAccountResponse, as_of: int, debits: int) -> None:
    """The hot account as of `as_of`: `debits`, no credits (no balance at
    all before its first entry, number 10)."""
    got = [(b.asset, b.total_debits, b.total_credits, b.balance) for b in r.balances]
    want = [("USD", debits, 0, debits)] if debits else []
    if r.as_of_sequence != as_of or got != want:
        raise RuntimeError(
            f"GetAccount as of {as_of}: got as_of_sequence {r.as_of_sequence}, "
            f"balances {got}; the seed says {want}"
        )


async def list_load(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers paging through the ledger's accounts with
    ListAccounts (`page_size` a page), from the first page again after the
    last, as fast as they can: accounts listed and each page's latency.
    Every full pass must list exactly `accounts` accounts, in order."""
    start, end = (
        spec["start_at"] + spec["warmup"],
        spec["start_at"] + spec["warmup"] + spec["duration"],
    )
    latencies: list[float] = []
    listed = 0
    async with grpc.aio.insecure_channel(
        spec["address"], options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def caller() -> None:
            nonlocal listed
            token, seen, last = "", 0, ""
            await _wait_until(spec["start_at"])
            while time.time() < end:
                t0 = time.time()
                r = await stub.ListAccounts(
                    ledger_pb2.ListAccountsRequest(
                        ledger=spec["ledger"], page_size=spec["page_size"], page_token=token
                    ),
                    timeout=60,
                )
                t1 = time.time()
                names = [a.account for a in r.accounts]
                if names != sorted(names) or (names and names[0] <= last):
                    raise RuntimeError(f"ListAccounts: a page out of order after {last!r}")
                if r.next_page_token and len(names) != spec["page_size"]:
                    raise RuntimeError(f"ListAccounts: a page of {len(names)} before the last")
                seen += len(names)
                token, last = r.next_page_token, names[-1] if names else last
                if not token:
                    if seen != spec["accounts"]:
                        raise RuntimeError(
                            f"ListAccounts: a pass listed {seen} accounts, "
                            f"not the {spec['accounts']} seeded"
                        )
                    seen, last = 0, ""
                if start <= t1 <= end:
                    latencies.append(t1 - t0)
                    listed += len(names)

        await asyncio.gather(*(caller() for _ in range(spec["concurrency"])))
    return {"entries": listed, "seconds": spec["duration"], "latencies": latencies}


def db_load(spec: dict[str, Any]) -> dict[str, Any]:
    """psycopg clients, no gRPC: the ledger's write as its common case runs
    it (its very statement and parameters: totals, counter, insert; committed
    with it; no key lookup, as in the server's optimistic write) with `size`
    entries each, as fast as they can; parameters are made before the clock
    starts (psycopg still encodes them inside it, as for the server)."""
    start, end = (
        spec["start_at"] + spec["warmup"],
        spec["start_at"] + spec["warmup"] + spec["duration"],
    )
    size = spec["size"]
    latencies: list[float] = []
    counts = [0] * spec["concurrency"]

    def client(i: int) -> None:
        worker = f"{spec['process']}-{i}-{uuid.uuid4().hex[:6]}"
        # Autocommit: the statement is its own transaction, one round trip.
        conninfo = libpq_conninfo(sa.make_url(spec["url"]))  # keepalives, as the server's
        with psycopg.connect(conninfo, autocommit=True) as conn:
            time.sleep(max(0.0, spec["start_at"] - time.time()))
            n = 0
            while time.time() < end:
                n += 1
                batch = [
                    validate_new_entry(
                        ledger=spec["ledger"],
                        idempotency_key=f"{worker}-{n}-{j}",
                        debit_account=f"d-{worker}",
                        credit_account=f"c-{worker}",
                        amount=1,
                        asset="USD",
                    )
                    for j in range(size)
                ]
                params, _ = statement_params(spec["ledger"], batch, Movements(batch))
                t0 = time.time()
                conn.execute(TAKE_AND_INSERT_PG, params).fetchall()
                t1 = time.time()
                if start <= t1 <= end:
                    counts[i] += size
                    latencies.append(t1 - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(spec["concurrency"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"entries": sum(counts), "seconds": spec["duration"], "latencies": latencies}


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Imported: say so, and get the start time of all the run's processes
    # (bench/scenarios.py load()), so that a process slow to start on a busy
    # machine does not begin inside the measurement window.
    print(READY, flush=True)
    spec["start_at"] = float(sys.stdin.readline())
    kind = spec["kind"]
    if kind == "db":
        result = db_load(spec)
    else:
        runner = {
            "post": post_load,
            "rate_writer": rate_writer,
            "followers": followers,
            "catch_up": catch_up,
            "as_of": as_of_load,
            "list_accounts": list_load,
        }[kind]
        result = asyncio.run(runner(spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
