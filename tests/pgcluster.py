"""A Postgres cluster of a test's own, on a free loopback port: for faults
the shared server must not suffer (a shutdown, max_connections reached)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .conftest import free_port


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def cluster_unavailable() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if _bindir() is None:
        return "no initdb under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "initdb refuses root and runuser is missing"
    return None


class PgCluster:
    """`with PgCluster(max_connections=12) as cluster: cluster.url("postgres")`;
    stop() and start() as an operator would; removed afterwards."""

    def __init__(self, *, max_connections: int = 20) -> None:
        bindir = _bindir()
        assert bindir is not None, cluster_unavailable()
        self._bin = bindir
        self._dir = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        self._data = self._dir / "data"
        self.port = free_port()
        self._max_connections = max_connections
        # initdb refuses to run as root: the files belong to postgres then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self._dir, "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as, *args], check=True, timeout=60, capture_output=True, cwd=self._dir
        )

    def __enter__(self) -> PgCluster:
        self._run(
            str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres",
            "--auth=trust", "-N", "-E", "UTF8",
        )  # fmt: skip
        self.start()
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self._dir}"
            f" -c max_connections={self._max_connections} -c fsync=off"
        )
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self._data), "-o", options,
            "-l", str(self._dir / "log"), "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", mode, "-w", "stop")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
