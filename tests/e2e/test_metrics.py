"""Prometheus metrics of a real server process, scraped over real HTTP
after known calls: every count is exact."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ledger.v1 import ledger_pb2
from prometheus_client.parser import text_string_to_metric_families

from ledger_service.auth.principals import token_digest
from ledger_service.testing import ServerProcess

from .conftest import FAST, batch_request, post_request

TOKEN = f"metrics-token-{uuid.uuid4().hex}"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
N = 5  # new entries posted one per PostEntry call
PROC = Path("/proc")
Samples = dict[str, list[tuple[dict[str, str], float]]]  # name -> [(labels, value)]


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.toml"
    path.write_text(
        f'[[principal]]\nname = "ops"\ntoken_sha256 = ["{token_digest(TOKEN)}"]\n'
        'roles = ["admin"]\n'
    )
    return path


@pytest.fixture
def server(pg_url: str, auth_file: Path) -> Iterator[ServerProcess]:
    args = [*FAST, "--auth-file", str(auth_file), "--metrics-listen", "127.0.0.1:0"]
    with ServerProcess(pg_url, extra_args=args) as server:
        yield server


def metrics_port(server: ServerProcess) -> int:
    (port,) = re.findall(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", "".join(server.lines))
    return int(port)


def scrape(port: int) -> Samples:
    """The samples of /metrics, read over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        v for have, v in samples.get(name, []) if all(have.get(k) == w for k, w in labels.items())
    )


def handled(samples: Samples, method: str, code: str) -> float:
    return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc (Linux)."""
    inodes = set()
    for fd in (PROC / str(pid) / "fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_count_exactly_the_calls_made(server: ServerProcess, ledger: str) -> None:
    stub = server.stub
    stub.InitializeCounter(
        ledger_pb2.InitializeCounterRequest(ledger=ledger), metadata=AUTH, timeout=10
    )
    for i in range(N):
        stub.PostEntry(post_request(ledger, f"k{i}"), metadata=AUTH, timeout=10)
    assert stub.PostEntry(post_request(ledger, "k0"), metadata=AUTH, timeout=10).replayed
    stub.PostEntries(batch_request(ledger, ["b1", "b2", "b3"]), metadata=AUTH, timeout=10)
    failures = [
        (post_request(ledger, "bad", amount=0), AUTH),  # INVALID_FIELD
        (post_request(ledger, "anon"), ()),  # UNAUTHENTICATED
        (post_request(f"{ledger}-none", "k"), AUTH),  # COUNTER_NOT_INITIALIZED
    ]
    for request, metadata in failures:
        with pytest.raises(grpc.RpcError):
            stub.PostEntry(request, metadata=metadata, timeout=10)
    list(
        stub.StreamEntries(
            ledger_pb2.StreamEntriesRequest(ledger=ledger), metadata=AUTH, timeout=10
        )
    )
    port = metrics_port(server)

    # A follower: counted while open, and its live entry's lag observed.
    follow = stub.StreamEntries(
        ledger_pb2.StreamEntriesRequest(ledger=ledger, after_sequence=0, follow=True),
        metadata=AUTH,
        timeout=60,
    )
    for message in follow:
        if message.caught_up:
            break
    assert value(scrape(port), "ledger_following_streams") == 1
    live = stub.PostEntry(post_request(ledger, "live"), metadata=AUTH, timeout=10).entry.sequence
    for message in follow:
        if message.entries and message.entries[-1].sequence == live:
            break
    follow.cancel()

    deadline = time.monotonic() + 30  # the server sees the cancel a moment later
    samples = scrape(port)
    while handled(samples, "StreamEntries", "CANCELLED") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(port)

    assert handled(samples, "InitializeCounter", "OK") == 1
    assert handled(samples, "PostEntry", "OK") == N + 2  # the new ones, the replay, the live one
    assert handled(samples, "PostEntries", "OK") == 1
    assert handled(samples, "PostEntry", "INVALID_ARGUMENT") == 1
    assert handled(samples, "PostEntry", "UNAUTHENTICATED") == 1
    assert handled(samples, "PostEntry", "FAILED_PRECONDITION") == 1
    assert handled(samples, "StreamEntries", "OK") == 1
    assert handled(samples, "StreamEntries", "CANCELLED") == 1
    latency = "grpc_server_handling_seconds_count"
    assert value(samples, latency, grpc_method="PostEntry") == N + 5
    assert value(samples, latency, grpc_method="StreamEntries") == 2

    refused = "ledger_refused_calls_total"
    assert value(samples, refused, grpc_method="PostEntry", reason="INVALID_FIELD") == 1
    assert value(samples, refused, grpc_method="PostEntry", reason="UNAUTHENTICATED") == 1
    assert value(samples, refused, grpc_method="PostEntry", reason="COUNTER_NOT_INITIALIZED") == 1
    assert value(samples, refused) == 3

    assert value(samples, "ledger_entries_posted_total") == N + 3 + 1
    assert value(samples, "ledger_entries_replayed_total") == 1
    # Sequential calls: each PostEntry that reached group commit went alone.
    assert value(samples, "ledger_group_commit_batch_size_count") == N + 3
    assert value(samples, "ledger_group_commit_batch_size_sum") == N + 3
    assert value(samples, "ledger_write_duration_seconds_count", kind="atomic") == 1

    assert value(samples, "ledger_following_streams") == 0
    assert value(samples, "ledger_stream_lag_entries_count") == 1  # the live entry, caught up
    assert value(samples, "ledger_stream_lag_entries_sum") == 0

    assert value(samples, "process_cpu_seconds_total") > 0
    assert samples["python_info"]


def test_without_the_flag_the_server_listens_on_its_grpc_port_only(sqlite_url: str) -> None:
    if not (PROC / "self" / "net" / "tcp").exists():
        pytest.skip("needs Linux /proc to list a process's listening sockets")
    with ServerProcess(sqlite_url, extra_args=FAST) as plain:
        assert plain.proc is not None
        assert listening_ports(plain.proc.pid) == {plain.port}
        assert "metrics at" not in "".join(plain.lines)
    with ServerProcess(sqlite_url, extra_args=[*FAST, "--metrics-listen", "127.0.0.1:0"]) as on:
        assert on.proc is not None
        assert listening_ports(on.proc.pid) == {on.port, metrics_port(on)}
