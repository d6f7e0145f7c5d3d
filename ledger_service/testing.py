"""Runs `ledger-service serve` as a child process on loopback: for the tests,
the benchmark, and anyone testing against a real server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from ledger.v1 import ledger_pb2_grpc

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


def _checkout_root() -> Path | None:
    """The source checkout this package lives in, else None (the current directory):
    the children run there so `python -m bench.servers` and relative paths resolve."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


class ServerProcess:
    """`with ServerProcess(db_url) as server: server.stub.PostEntry(...)`.

    `start` launches `command` (by default `python -m ledger_service serve`) with
    `--listen 127.0.0.1:PORT --database-url URL` and `extra_args`, and returns once
    the server logs "listening on HOST:PORT" (port 0: a free one, kept on restart).
    Its stderr is drained into `.lines` for as long as it runs. `terminate` is
    SIGTERM and wait, `kill` SIGKILL, `close` (also on leaving `with`) either;
    `channel` and `stub` reach the server at `address`.
    """

    def __init__(
        self,
        database_url: str,
        *,
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command: Sequence[str] = (sys.executable, "-m", "ledger_service", "serve"),
    ) -> None:
        self.command = list(command)
        self.database_url = database_url
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.port = 0
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.lines = []
        self.proc = subprocess.Popen(
            [
                *self.command,
                "--listen",
                f"127.0.0.1:{self.requested_port or self.port}",
                "--database-url",
                self.database_url,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
            cwd=_checkout_root(),
        )
        found = threading.Event()

        def drain() -> None:
            # Keep reading so the pipe never fills and blocks the server.
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                match = _LISTENING.search(line)
                if match and not found.is_set():
                    self.port = int(match.group(2))
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + "".join(self.lines))
        return self

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_channel()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._close_channel()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops the server if it runs: gracefully, else by force."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_channel()
