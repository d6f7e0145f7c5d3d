"""Named consumers through real server processes: a consumer process killed
mid-stream and restarted sees every entry at least once, in order, and what it
sees twice is exactly its unacknowledged tail; filtered (account) and live
consumers alike. Also AckEntries and ListConsumers through the clients, the
resume rules of `consumer` and `account` against a scripted server, and the
TypeScript client's consumer tests (src/test/consumer.test.ts).

Run as a module (`python -m tests.e2e.test_consumer_helper ...`) it is the
consumer process the tests start and kill."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_client import AsyncLedgerClient, LedgerClient, error_info

from ledger_service.testing import ServerProcess

from ..conftest import missing_requirement
from .conftest import FAST

ROOT = Path(__file__).resolve().parents[2]
TS_DIR = ROOT / "clients" / "typescript"
ACK_EVERY = 25


def _consumer_main(argv: list[str]) -> None:
    """The consumer process: processes each entry by appending its number to
    `out` (fsynced), then, as told, kills itself with SIGKILL after
    `--kill-after` entries or stops after entry `--stop-at`."""
    parser = argparse.ArgumentParser()
    for name in ("address", "ledger", "consumer", "out"):
        parser.add_argument(name)
    parser.add_argument("--account", default="")
    parser.add_argument("--ack-every", type=int, default=ACK_EVERY)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--stop-at", type=int, default=0)
    parser.add_argument("--follow", action="store_true")
    args = parser.parse_args(argv)
    with (
        LedgerClient(args.address) as client,
        client.consume(
            args.ledger,
            args.consumer,
            ack_every=args.ack_every,
            ack_interval=3600.0,  # by count only: the kill point decides the last ack
            account=args.account,
            follow=args.follow,
        ) as stream,
        open(args.out, "a") as out,
    ):
        for processed, entry in enumerate(stream, 1):
            out.write(f"{entry.sequence}\n")
            out.flush()
            os.fsync(out.fileno())
            if processed == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no close, no last ack
            if args.stop_at and entry.sequence >= args.stop_at:
                break  # leaving the block acknowledges this entry too


def _start_consumer(
    server: ServerProcess, ledger: str, consumer: str, out: Path, *options: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.e2e.test_consumer_helper",
            server.address,
            ledger,
            consumer,
            str(out),
            *options,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"consumer did not finish:\n{output}") from None
    return proc.returncode, output


def _run_consumer(
    server: ServerProcess, ledger: str, consumer: str, out: Path, *options: str
) -> tuple[int, str]:
    return _finish(_start_consumer(server, ledger, consumer, out, *options))


def _seen(out: Path) -> list[int]:
    return [int(line) for line in out.read_text().split()] if out.exists() else []


def _wait_for(
    out: Path, count: int, proc: subprocess.Popen[str] | None = None, timeout: float = 60
) -> None:
    """Until `out` lists `count` entries or `proc` exits; `timeout` only guards a hang."""
    deadline = time.monotonic() + timeout
    while len(_seen(out)) < count and (proc is None or proc.poll() is None):
        if time.monotonic() > deadline:
            raise AssertionError(f"{out.name}: {len(_seen(out))} of {count} entries")
        time.sleep(0.05)


def _post(
    client: LedgerClient, ledger: str, n: int, bank: Callable[[int], bool] | None = None
) -> None:
    """Posts n more entries, 100 a call; entry number i debits "bank" if bank(i),
    else "cash"."""
    head = client.get_ledger(ledger).head_sequence
    numbers = list(range(head + 1, head + n + 1))
    for start in range(0, n, 100):
        batch = [
            {
                "debit_account": "bank" if bank is not None and bank(i) else "cash",
                "credit_account": "sales",
                "amount": 1,
                "asset": "USD",
            }
            for i in numbers[start : start + 100]
        ]
        results = client.post_entries(ledger, batch).results
        assert [r.entry.sequence for r in results] == numbers[start : start + 100]


def _stored(client: LedgerClient, ledger: str, consumer: str) -> ledger_pb2.Consumer:
    listed = {c.consumer: c for c in client.list_consumers(ledger).consumers}
    return listed[consumer]


def test_a_killed_consumer_restarts_after_its_last_ack_and_sees_exactly_its_tail_again(
    pg_server: ServerProcess, ledger: str, tmp_path: Path
) -> None:
    n, kill_after = 300, 130
    first, second = tmp_path / "first", tmp_path / "second"
    with LedgerClient(pg_server.address) as client:
        client.initialize_counter(ledger)
        _post(client, ledger, n)

        code, output = _run_consumer(
            pg_server, ledger, "books", first, f"--kill-after={kill_after}"
        )
        assert code == -signal.SIGKILL, output
        assert _seen(first) == list(range(1, kill_after + 1))
        # Entry 125 counted as processed when entry 126 was asked for, and that
        # was the 5th ack of 25; 126..130 were processed, never acknowledged.
        stored = _stored(client, ledger, "books")
        assert stored.sequence == (kill_after - 1) // ACK_EVERY * ACK_EVERY == 125
        assert stored.lag == n - stored.sequence

        code, output = _run_consumer(pg_server, ledger, "books", second)
        assert code == 0, output
        assert _seen(second) == list(range(stored.sequence + 1, n + 1))
        twice = sorted(set(_seen(first)) & set(_seen(second)))
        assert twice == list(range(stored.sequence + 1, kill_after + 1))
        assert set(_seen(first)) | set(_seen(second)) == set(range(1, n + 1))
        # The second run ended caught up: closing acknowledged everything.
        final = _stored(client, ledger, "books")
        assert (final.sequence, final.lag) == (n, 0)


def test_a_killed_filtered_consumer_resumes_after_its_last_ack_and_moves_over_other_entries(
    pg_server: ServerProcess, ledger: str, tmp_path: Path
) -> None:
    n, kill_after, every = 302, 23, 5
    matching = [i for i in range(1, n + 1) if i % 3 == 0]  # 3, 6, ..., 300
    first, second = tmp_path / "first", tmp_path / "second"
    with LedgerClient(pg_server.address) as client:
        client.initialize_counter(ledger)
        _post(client, ledger, n, bank=lambda i: i % 3 == 0)
        options = ("--account=bank", f"--ack-every={every}")

        code, output = _run_consumer(
            pg_server, ledger, "bank-feed", first, *options, f"--kill-after={kill_after}"
        )
        assert code == -signal.SIGKILL, output
        assert _seen(first) == matching[:kill_after]
        # The 4th ack of 5 covers the 20th matching entry (and, if it ended its
        # message, the entries the filter looked at after it), not the 21st.
        stored = _stored(client, ledger, "bank-feed").sequence
        acked = kill_after - 1 - (kill_after - 1) % every  # 20 entries
        assert matching[acked - 1] <= stored < matching[acked]

        code, output = _run_consumer(pg_server, ledger, "bank-feed", second, *options)
        assert code == 0, output
        assert _seen(second) == [m for m in matching if m > stored]
        twice = sorted(set(_seen(first)) & set(_seen(second)))
        assert twice == matching[acked:kill_after]
        assert set(_seen(first)) | set(_seen(second)) == set(matching)
        # Entries 301 and 302 do not match: the position still reached them.
        assert _stored(client, ledger, "bank-feed").sequence == n


def test_a_killed_live_consumer_restarts_and_follows_entries_posted_meanwhile(
    pg_server: ServerProcess, ledger: str, tmp_path: Path
) -> None:
    kill_after, n = 70, 150
    first, second = tmp_path / "first", tmp_path / "second"
    with LedgerClient(pg_server.address) as client:
        client.initialize_counter(ledger)
        _post(client, ledger, 40)
        proc = _start_consumer(
            pg_server, ledger, "live", first, "--follow", f"--kill-after={kill_after}"
        )
        try:
            _wait_for(first, 40, proc)  # caught up: from here on it follows
            while proc.poll() is None and client.get_ledger(ledger).head_sequence < 120:
                _post(client, ledger, 10)
                head = client.get_ledger(ledger).head_sequence
                _wait_for(first, min(head, kill_after), proc)
            code, output = _finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == -signal.SIGKILL, output
        assert _seen(first) == list(range(1, kill_after + 1))
        stored = _stored(client, ledger, "live").sequence
        assert stored == (kill_after - 1) // ACK_EVERY * ACK_EVERY == 50

        proc = _start_consumer(pg_server, ledger, "live", second, "--follow", f"--stop-at={n}")
        try:
            head = client.get_ledger(ledger).head_sequence
            _wait_for(second, head - stored, proc)
            while client.get_ledger(ledger).head_sequence < n:
                _post(client, ledger, 10)
                head = client.get_ledger(ledger).head_sequence
                _wait_for(second, head - stored, proc)
            code, output = _finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, output
        assert _seen(second) == list(range(stored + 1, n + 1))
        assert sorted(set(_seen(first)) & set(_seen(second))) == list(
            range(stored + 1, kill_after + 1)
        )
        assert _stored(client, ledger, "live").sequence == n  # stopped after n: acknowledged


def test_heartbeats_move_an_idle_filtered_consumers_position_over_other_entries(
    pg_url: str, ledger: str
) -> None:
    with (
        ServerProcess(pg_url, extra_args=[*FAST, "--heartbeat-interval", "0.2"]) as server,
        LedgerClient(server.address) as client,
    ):
        client.initialize_counter(ledger)
        _post(client, ledger, 10)  # none debits "bank"
        got: list[int] = []
        failed: list[BaseException] = []

        def consume() -> None:
            try:
                stream = client.consume(
                    ledger, "bank-idle", account="bank", ack_every=1000, ack_interval=0.05
                )
                with stream:
                    for entry in stream:
                        got.append(entry.sequence)
                        break
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            deadline = time.monotonic() + 30  # guards a hang only
            while time.monotonic() < deadline and not failed:
                listed = {c.consumer: c for c in client.list_consumers(ledger).consumers}
                if "bank-idle" in listed and listed["bank-idle"].sequence == 10:
                    break
                time.sleep(0.05)
            # No entry matched, yet the heartbeats' through_sequence was acknowledged.
            assert _stored(client, ledger, "bank-idle").sequence == 10, failed
        finally:
            _post(client, ledger, 1, bank=lambda i: True)  # entry 11: ends the thread
            thread.join(60)
        assert not thread.is_alive() and not failed, failed
        assert got == [11]
        assert _stored(client, ledger, "bank-idle").sequence == 11


def test_ack_entries_and_list_consumers_keep_positions_moving_forward(
    server: ServerProcess, ledger: str
) -> None:
    with LedgerClient(server.address) as client:
        client.initialize_counter(ledger)
        _post(client, ledger, 6, bank=lambda i: i in (2, 5))
        acked = client.ack_entries(ledger, "b-reader", 2)
        assert (acked.sequence, acked.head_sequence) == (2, 6)
        assert client.ack_entries(ledger, "b-reader", 2).sequence == 2  # the same again
        client.ack_entries(ledger, "a-reader", 4)
        with pytest.raises(grpc.RpcError) as behind:
            client.ack_entries(ledger, "b-reader", 1)
        assert behind.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(behind.value)
        assert info is not None and info.reason == "CONSUMER_POSITION_BEHIND"
        with pytest.raises(grpc.RpcError) as ahead:
            client.ack_entries(ledger, "b-reader", 7)
        assert ahead.value.code() == grpc.StatusCode.OUT_OF_RANGE
        listed = client.list_consumers(ledger)
        assert listed.head_sequence == 6
        rows = [(c.consumer, c.sequence, c.lag) for c in listed.consumers]
        assert rows == [("a-reader", 4, 2), ("b-reader", 2, 4)]

        # A consumer's stream starts after its stored position; a given position wins.
        assert [e.sequence for e in client.stream_entries(ledger, consumer="b-reader")] == [
            3,
            4,
            5,
            6,
        ]
        by_position = client.stream_entries(ledger, consumer="b-reader", after_sequence=4)
        assert [e.sequence for e in by_position] == [5, 6]
        assert [e.sequence for e in client.stream_entries(ledger, account="bank")] == [2, 5]
        both = client.stream_entries(ledger, consumer="b-reader", account="bank")
        assert [e.sequence for e in both] == [5]
        messages = list(client.stream_messages(ledger, account="bank", after_sequence=5))
        assert [e.sequence for m in messages for e in m.entries] == []
        assert messages[-1].caught_up and messages[-1].through_sequence == 6
        # The chain check needs every entry from a known start.
        with pytest.raises(ValueError, match="account"):
            next(client.stream_entries(ledger, verify=True, account="bank"))
        with pytest.raises(ValueError, match="known start"):
            next(client.stream_entries(ledger, verify=True, consumer="b-reader"))
        verified = client.stream_entries(ledger, verify=True, consumer="b-reader", after_sequence=4)
        assert [e.sequence for e in verified] == [5, 6]


def test_the_async_consumer_acknowledges_what_was_processed(
    server: ServerProcess, ledger: str
) -> None:
    async def run() -> tuple[list[int], int, list[int], int]:
        async with AsyncLedgerClient(server.address) as client:
            await client.initialize_counter(ledger)
            await client.post_entries(
                ledger,
                [
                    {
                        "debit_account": "cash",
                        "credit_account": "sales",
                        "amount": 1,
                        "asset": "USD",
                    }
                    for _ in range(12)
                ],
            )
            first: list[int] = []
            async with client.consume(ledger, "async", ack_every=4, follow=False) as stream:
                async for entry in stream:
                    first.append(entry.sequence)
                    if entry.sequence == 10:
                        break  # leaving the block normally counts entry 10
            after_first = (await client.list_consumers(ledger)).consumers[0].sequence
            rest: list[int] = []
            async with client.consume(ledger, "async", ack_every=4, follow=False) as stream:
                rest.extend([entry.sequence async for entry in stream])
            after_rest = (await client.list_consumers(ledger)).consumers[0].sequence
            return first, after_first, rest, after_rest

    assert asyncio.run(run()) == (list(range(1, 11)), 10, [11, 12], 12)


def test_a_consumer_that_fails_on_an_entry_gets_it_again(
    server: ServerProcess, ledger: str
) -> None:
    with LedgerClient(server.address) as client:
        client.initialize_counter(ledger)
        _post(client, ledger, 5)
        with (
            pytest.raises(KeyError),
            client.consume(ledger, "fails", ack_every=100, follow=False) as stream,
        ):
            for entry in stream:
                if entry.sequence == 3:
                    raise KeyError("cannot process 3")
        assert (stream.position, stream.acked) == (2, 2)
        assert [e.sequence for e in client.consume(ledger, "fails", follow=False)] == [3, 4, 5]


# The resume rules against a scripted server: what each reconnect asks for.


class _Streams:
    """StreamEntries as scripted: `script(call number, request, context)`
    yields messages, then aborts or returns; the other methods UNIMPLEMENTED."""

    def __init__(self, script: Callable[[int, Any, Any], Iterator[Any]]) -> None:
        self.requests: list[ledger_pb2.StreamEntriesRequest] = []
        self._script = script

    def StreamEntries(self, request: Any, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        yield from self._script(len(self.requests), request, context)

    def __getattr__(self, name: str) -> Any:
        return getattr(ledger_pb2_grpc.LedgerServiceServicer, name).__get__(self)


def _message(*sequences: int, through: int = 0, **fields: Any) -> ledger_pb2.StreamEntriesResponse:
    entries = [ledger_pb2.Entry(sequence=s) for s in sequences]
    return ledger_pb2.StreamEntriesResponse(
        entries=entries, through_sequence=through or (sequences[-1] if sequences else 0), **fields
    )


def _read(target: str, kind: str, **options: Any) -> list[int]:
    settings: dict[str, Any] = {"backoff": 0.01, "max_backoff": 0.05}
    if kind == "sync":
        with LedgerClient(target, **settings) as client:
            return [e.sequence for e in client.stream_entries("l", **options)]

    async def run() -> list[int]:
        async with AsyncLedgerClient(target, **settings) as client:
            return [e.sequence async for e in client.stream_entries("l", **options)]

    return asyncio.run(run())


def _dropped(context: Any) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, "dropped")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_consumers_stream_names_it_until_a_message_came_then_resumes_from_its_position(
    serve: Callable[[object], str], kind: str
) -> None:
    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        if call == 1:
            _dropped(context)  # before any message: the server still picks the start
        if call == 2:
            yield _message(6, 7)  # the server started after the stored position, 5
            _dropped(context)
        yield _message(8, caught_up=True)

    servicer = _Streams(script)
    assert _read(serve(servicer), kind, consumer="c") == [6, 7, 8]
    asked = [(r.consumer, r.after_sequence) for r in servicer.requests]
    assert asked == [("c", 0), ("c", 0), ("", 7)]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_filtered_stream_resumes_from_through_sequence_and_checks_entries_only_increase(
    serve: Callable[[object], str], kind: str
) -> None:
    def script(call: int, request: Any, context: Any) -> Iterator[Any]:
        if call == 1:
            yield _message(2, 5, through=6)
            yield _message(through=9, heartbeat=True)  # the filter looked further
            _dropped(context)
        yield _message(12, through=14, caught_up=True)

    servicer = _Streams(script)
    assert _read(serve(servicer), kind, account="cash", follow=True) == [2, 5, 12]
    asked = [(r.account, r.after_sequence) for r in servicer.requests]
    assert asked == [("cash", 0), ("cash", 9)]

    def backwards(call: int, request: Any, context: Any) -> Iterator[Any]:
        yield _message(4, through=6)
        yield _message(6, through=8)  # not above the position, 6

    with pytest.raises(RuntimeError, match="expected above 6, got 6"):
        _read(serve(_Streams(backwards)), kind, account="cash")


def test_the_typescript_consumer_helper_passes_its_tests_against_a_real_server(
    pg_server: ServerProcess,
) -> None:
    """clients/typescript's src/test/consumer.test.ts: ackEntries, listConsumers,
    consumer and account streams, consume() with a restart after a break."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None or not (TS_DIR / "node_modules" / "typescript").is_dir():
        missing_requirement(
            "npm or clients/typescript/node_modules missing (make test runs npm ci)"
        )
    assert npm is not None and node is not None
    build = subprocess.run(
        [npm, "run", "--silent", "build"], cwd=TS_DIR, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stdout + build.stderr
    result = subprocess.run(
        [node, "--test", "dist/test/consumer.test.js"],
        cwd=TS_DIR,
        env={**os.environ, "LEDGER_ADDRESS": pg_server.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


if __name__ == "__main__":
    _consumer_main(sys.argv[1:])
