"""A real primary and hot standby (physical streaming replication) of a
test's own, on free loopback ports, for the reads of `--read-database-url`.

    from .. import standby
    from ..standby import ReplicatedPair

    standby_pair = standby.standby_pair  # the fixture, one pair per module

    def test_reads(standby_pair: ReplicatedPair) -> None:
        ...  # write through standby_pair.primary_url
        standby_pair.wait_caught_up()
        ...  # read through standby_pair.standby_url

or `with replicated_pair() as pair:` where a fixture does not fit. Both
clusters live in one temporary directory under /tmp and are stopped
(immediate mode, standby first) and removed afterwards, also when the setup
fails halfway; an atexit hook is the last resort. Without the PostgreSQL 15
binaries (or, as root, without runuser) the tests skip, or fail under CI=true.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from .conftest import free_port, migrated, missing_requirement

BINDIR = Path("/usr/lib/postgresql/15/bin")
_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
DATABASE = "ledger"
# Bounds of the setup's steps (seconds); generous: the machine is shared.
_STEP_TIMEOUT = 60
_READY_TIMEOUT = 30.0
_POLL = 0.02


def pair_unavailable() -> str | None:
    """Why a primary and standby cannot be made here, or None."""
    missing = [tool for tool in _TOOLS if not os.access(BINDIR / tool, os.X_OK)]
    if missing:
        return f"PostgreSQL 15 binaries missing under {BINDIR}: {', '.join(missing)}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "initdb refuses root and runuser is missing"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "initdb refuses root and there is no postgres user to run it as"
    return None


def _connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class ReplicatedPair:
    """A running primary and its hot standby (`standby_url` is read-only)."""

    primary_url: str
    standby_url: str
    primary_port: int
    standby_port: int
    directory: Path

    def primary_lsn(self) -> str:
        """The primary's current WAL write position (pg_current_wal_lsn)."""
        with _connect(self.primary_url) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def replay_lsn(self) -> str | None:
        """What the standby has replayed (pg_last_wal_replay_lsn)."""
        with _connect(self.standby_url) as conn:
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
        assert row is not None
        return None if row[0] is None else str(row[0])

    def replay_pause_state(self) -> str:
        """'not paused', 'pause requested' or 'paused'."""
        with _connect(self.standby_url) as conn:
            row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
        assert row is not None
        return str(row[0])

    def pause_replay(self) -> None:
        """Asks the standby to stop applying WAL (it still receives it): reads
        there then see the data as of now. wait_replay_paused() confirms."""
        with _connect(self.standby_url) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        with _connect(self.standby_url) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def wait_replay_paused(self, timeout: float = 10.0) -> None:
        """Polls until the standby's replay is paused; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with _connect(self.standby_url) as conn:
            while True:
                row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                state = None if row is None else row[0]
                if state == "paused":
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"standby replay not paused after {timeout} s: {state}")
                time.sleep(_POLL)

    def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Polls until the standby has replayed everything the primary had
        written when called; TimeoutError otherwise (as while paused)."""
        target = self.primary_lsn()
        deadline = time.monotonic() + timeout
        with _connect(self.standby_url) as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text,"
                    " coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)",
                    (target,),
                ).fetchone()
                assert row is not None
                replayed, done = row
                if done:
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"standby replayed up to {replayed}, not the primary's {target},"
                        f" after {timeout} s (state: {self.replay_pause_state()})"
                    )
                time.sleep(_POLL)


class _Clusters:
    """Runs the binaries (as postgres when root) in one temporary directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ledger-standby-", dir="/tmp"))
        # initdb refuses root: the clusters then belong to postgres.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def hand_over(self) -> None:
        if self._as:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def run(self, tool: str, *args: str, log: Path | None = None) -> None:
        try:
            subprocess.run(
                [*self._as, str(BINDIR / tool), *args],
                check=True,
                timeout=_STEP_TIMEOUT,
                capture_output=True,
                text=True,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip()
            if log is not None:
                detail += f"\n--- {log.name} ---\n{_tail(log)}"
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {detail}") from exc

    def start(self, name: str) -> None:
        log = self.root / f"{name}.log"
        data = str(self.root / name)
        self.run("pg_ctl", "-D", data, "-l", str(log), "-t", "30", "-w", "start", log=log)

    def stop(self, name: str) -> None:
        """Immediate stop; quiet when it never started. Kills the postmaster
        by its pid should pg_ctl fail to stop it."""
        data = self.root / name
        if not (data / "postmaster.pid").exists():
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.run("pg_ctl", "-D", str(data), "-m", "immediate", "-t", "30", "-w", "stop")
        self._kill_leftover(data)

    @staticmethod
    def _kill_leftover(data: Path) -> None:
        try:
            pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # stopped: no pid file, or no such process
        if str(data).encode() in cmdline:  # ours, not a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _configure(conf: Path, **settings: str) -> None:
    # Appended: a later line wins over initdb's (or the copied primary's).
    with conf.open("a") as f:
        f.write("\n# tests/standby.py\n")
        for key, value in settings.items():
            f.write(f"{key} = {value}\n")


def _wait_streaming(url: str, log: Path) -> None:
    """Until the standby accepts connections, is in recovery, and streams."""
    deadline = time.monotonic() + _READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with _connect(url) as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1)"
                ).fetchone()
            assert row is not None
            if row[0] and row[1] == "streaming":
                return
            last = f"in recovery: {row[0]}, wal receiver: {row[1]}"
        except psycopg.OperationalError as exc:
            last = str(exc).strip()
        time.sleep(_POLL * 5)
    raise RuntimeError(f"standby not streaming after {_READY_TIMEOUT} s ({last}):\n{_tail(log)}")


@contextlib.contextmanager
def replicated_pair(
    *, database: str = DATABASE, migrate_it: bool = True
) -> Iterator[ReplicatedPair]:
    """A primary with `database` (migrated unless told not to) and a hot
    standby streaming from it; both stopped and removed on exit."""
    reason = pair_unavailable()
    if reason is not None:
        missing_requirement(reason)
    cleanup = contextlib.ExitStack()
    atexit.register(cleanup.close)
    try:
        clusters = _Clusters()
        cleanup.callback(clusters.remove)
        clusters.hand_over()
        root = clusters.root
        primary_port, standby_port = free_port(), free_port()
        while standby_port == primary_port:
            standby_port = free_port()

        clusters.run(
            "initdb", "-D", str(root / "primary"), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        _configure(
            root / "primary" / "postgresql.conf",
            listen_addresses="'127.0.0.1'",
            port=str(primary_port),
            unix_socket_directories=f"'{root}'",
            wal_level="replica",
            max_wal_senders="4",
            max_replication_slots="4",
            hot_standby="on",
            hot_standby_feedback="on",
            fsync="off",
            # On, unlike the other speed settings: with it off, commits reach
            # the WAL sender only when the WAL writer flushes (up to ~0.6 s
            # later), which would slow every wait_caught_up. fsync=off makes
            # the flush cheap anyway.
            synchronous_commit="on",
            full_page_writes="off",
            shared_buffers="32MB",
            max_connections="60",
        )
        hba = root / "primary" / "pg_hba.conf"
        if not re.search(
            r"^host\s+replication\s+all\s+127\.0\.0\.1/32\s+trust", hba.read_text(), re.M
        ):
            with hba.open("a") as f:
                f.write("host replication all 127.0.0.1/32 trust\n")

        cleanup.callback(clusters.stop, "primary")  # registered first: stopped last
        clusters.start("primary")
        primary_url = f"postgresql://postgres@127.0.0.1:{primary_port}/{database}"
        with _connect(f"postgresql://postgres@127.0.0.1:{primary_port}/postgres") as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        if migrate_it:
            migrated(primary_url)

        # The base backup already holds the database and its schema.
        clusters.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
            "-D", str(root / "standby"), "-R", "-X", "stream", "-C", "-S", "standby",
            "-c", "fast", "--no-sync",
        )  # fmt: skip
        _configure(root / "standby" / "postgresql.conf", port=str(standby_port))
        cleanup.callback(clusters.stop, "standby")
        clusters.start("standby")
        standby_url = f"postgresql://postgres@127.0.0.1:{standby_port}/{database}"
        _wait_streaming(standby_url, root / "standby.log")

        pair = ReplicatedPair(
            primary_url=primary_url,
            standby_url=standby_url,
            primary_port=primary_port,
            standby_port=standby_port,
            directory=root,
        )
        yield pair
    finally:
        try:
            cleanup.close()
        finally:
            atexit.unregister(cleanup.close)


@pytest.fixture(scope="module")
def standby_pair() -> Iterator[ReplicatedPair]:
    """One primary and hot standby per test module. Make it the module's
    with `standby_pair = standby.standby_pair` (an import of the name works
    too, but trips ruff's F811 on every parameter named after it)."""
    with replicated_pair() as pair:
        yield pair
