"""A TCP proxy on loopback, between a server and Postgres, that can stall,
reset or black-hole connections, as a failing network would.

    with FaultProxy() as proxy:            # forwards to 127.0.0.1:5432
        url = proxy.url(database_url)      # the same database, through the proxy
        proxy.stall(); proxy.resume()      # hold every byte, then deliver it
        proxy.reset()                      # RST every open connection
        proxy.black_hole()                 # open connections go silent; new ones pass
        proxy.drop()                       # the same, in the kernel: packets dropped

`black_hole` swallows bytes in the proxy, so the kernel still acknowledges
them: only the application's own bounds can notice. `drop` has the kernel
drop the packets of the open connections (nftables, as root), as a lost NAT
entry would: TCP keepalives and tcp_user_timeout notice that.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from types import TracebackType

import sqlalchemy as sa

_TABLE_PREFIX = "ledger_faultproxy_"
_live_tables: set[str] = set()  # this process's, in use


def kernel_drop_unavailable() -> str | None:
    """Why drop() cannot work here, or None."""
    if os.geteuid() != 0:
        return "dropping packets needs root (nftables)"
    if shutil.which("nft") is None:
        return "dropping packets needs nft (Debian package nftables)"
    return None


@dataclass
class Link:
    """One proxied connection."""

    client: socket.socket  # from the server under test
    upstream: socket.socket  # to Postgres
    client_port: int = 0  # the server's side of it
    upstream_port: int = 0  # as Postgres sees it (pg_stat_activity.client_port)
    silent: bool = False
    closed: bool = False
    threads: list[threading.Thread] = field(default_factory=list)

    def close(self, *, shutdown: bool = True) -> None:
        """Closes both ends; `shutdown` first wakes a thread blocked on them
        (a reset must skip it: it would send a FIN before the RST)."""
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                if shutdown:
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._links: list[Link] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._table: str | None = None

    def url(self, database_url: str) -> str:
        """`database_url` (a Postgres URL on the upstream) through the proxy."""
        parsed = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def __enter__(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def links(self) -> list[Link]:
        with self._lock:
            return [link for link in self._links if not link.closed]

    # -- faults ------------------------------------------------------------

    def stall(self) -> None:
        """Every connection, new ones too, stops moving; bytes are held."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def reset(self) -> None:
        """Every open connection is reset (RST to both of its ends)."""
        for link in self.links():
            for sock in (link.client, link.upstream):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            link.close(shutdown=False)

    def black_hole(self, upstream_port: int | None = None) -> list[Link]:
        """Open connections (or the one Postgres sees from `upstream_port`)
        swallow everything from now on, in both directions, and never close;
        new connections pass. Returns the links made silent."""
        chosen = [
            link
            for link in self.links()
            if upstream_port is None or link.upstream_port == upstream_port
        ]
        for link in chosen:
            link.silent = True
        return chosen

    def drop(self) -> None:
        """The kernel drops every packet of the open connections from now
        on (until stop()); new connections pass."""
        reason = kernel_drop_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        ports = ", ".join(str(link.client_port) for link in self.links())
        self._remove_stale_tables()
        self._table = f"{_TABLE_PREFIX}{self.port}"
        _live_tables.add(self._table)
        script = (
            f"add table inet {self._table}\n"
            f"add chain inet {self._table} out {{ type filter hook output priority 0 ; }}\n"
            f"add rule inet {self._table} out tcp sport {{ {ports} }} tcp dport {self.port} drop\n"
            f"add rule inet {self._table} out tcp sport {self.port} tcp dport {{ {ports} }} drop\n"
        )
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=30)

    def stop(self) -> None:
        self._stopped.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=10)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        for link in links:
            for thread in link.threads:
                thread.join(timeout=10)
        if self._table is not None:
            subprocess.run(["nft", "delete", "table", "inet", self._table], check=False, timeout=30)
            _live_tables.discard(self._table)
            self._table = None

    # -- forwarding --------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], 0.1)
                if not readable:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):
                return  # closed by stop()
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = Link(client, upstream, client.getpeername()[1], upstream.getsockname()[1])
            link.threads = [
                threading.Thread(target=self._pump, args=(link, a, b), daemon=True)
                for a, b in ((client, upstream), (upstream, client))
            ]
            with self._lock:
                self._links.append(link)
            for thread in link.threads:
                thread.start()

    def _pump(self, link: Link, source: socket.socket, target: socket.socket) -> None:
        """Moves bytes one way, holding them while stalled and swallowing
        them once the link is silent. Every wait is bounded (stop() ends it)."""
        while not self._stopped.is_set() and not link.closed:
            try:
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable:
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):
                break
            if not data:  # one end closed
                if link.silent:
                    return  # a black hole passes no FIN on either
                break
            while not self._flowing.wait(0.1) and not self._stopped.is_set():
                pass
            if link.silent:
                continue
            try:
                target.sendall(data)
            except (OSError, ValueError):
                break
        if not link.silent:
            link.close()

    @staticmethod
    def _remove_stale_tables() -> None:
        """Tables left by a test process that died before its stop()."""
        listed = subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, check=True, timeout=30
        )
        for line in listed.stdout.splitlines():
            parts = line.split()
            if (
                len(parts) == 3
                and parts[2].startswith(_TABLE_PREFIX)
                and parts[2] not in _live_tables
            ):
                subprocess.run(["nft", "delete", "table", parts[1], parts[2]], timeout=30)
