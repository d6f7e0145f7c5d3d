"""Starts real `ledger-service serve` processes on loopback for end-to-end tests."""

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


class ServerProcess:
    """`with ServerProcess(db_url) as server: server.stub.PostEntry(...)`."""

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
            cwd=Path(__file__).resolve().parents[2],
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
