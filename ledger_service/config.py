"""Settings from the environment (LEDGER_*), overridable by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .domain.limits import max_request_bytes
from .observability.logs import check_format, check_level
from .storage import dialect
from .storage.timeouts import DbTimeouts
from .storage.uow import normalize_url
from .tls import TlsFiles

DEFAULT_DATABASE_URL = "sqlite:///ledger.sqlite3"
DEFAULT_LISTEN = "127.0.0.1:50051"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}: not a number: {raw!r}") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}: not a whole number: {raw!r}") from None


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """("host", port) of "host:port" ("[::1]:port" for IPv6; port 0: any
    free one); ValueError naming `what` (the flag) otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{what}: expected host:port, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass
class Settings:
    # Any SQLAlchemy URL: postgresql://... (psycopg 3) or sqlite:///path.
    # Unset: the embedded SQLite file ./ledger.sqlite3.
    database_url: str = field(
        default_factory=lambda: os.environ.get("LEDGER_DATABASE_URL") or DEFAULT_DATABASE_URL
    )
    listen: str = field(default_factory=lambda: os.environ.get("LEDGER_LISTEN") or DEFAULT_LISTEN)
    log_level: str = field(default_factory=lambda: os.environ.get("LEDGER_LOG_LEVEL") or "INFO")
    # The principals (TOML, docs/security.md); unset: auth is off, which
    # serve allows only on a loopback address unless `insecure`.
    auth_file: str = field(default_factory=lambda: os.environ.get("LEDGER_AUTH_FILE") or "")
    # TLS (PEM files): a certificate and its key turn it on; a client CA
    # turns on mutual TLS (client certificates required and verified).
    tls_cert: str = field(default_factory=lambda: os.environ.get("LEDGER_TLS_CERT") or "")
    tls_key: str = field(default_factory=lambda: os.environ.get("LEDGER_TLS_KEY") or "")
    tls_client_ca: str = field(default_factory=lambda: os.environ.get("LEDGER_TLS_CLIENT_CA") or "")
    insecure: bool = field(
        default_factory=lambda: (
            os.environ.get("LEDGER_INSECURE", "").lower() in ("1", "true", "yes", "on")
        )
    )
    # Seconds the database may take to accept a connection or answer a
    # statement before that connection is abandoned (closed, never reused);
    # callers with an earlier deadline have it abandoned at their deadline.
    db_timeout: float = field(default_factory=lambda: _env_float("LEDGER_DB_TIMEOUT", 10.0))
    # TCP keepalives and tcp_user_timeout: the kernel drops a connection
    # whose peer stops acknowledging for this many seconds (0: its defaults).
    db_tcp_timeout: float = field(default_factory=lambda: _env_float("LEDGER_DB_TCP_TIMEOUT", 10.0))
    # A Postgres streaming replica (hot standby) of database_url that serves
    # the reads: streams, GetAccount, GetEntry, ListAccounts, GetLedger,
    # ListConsumers. Unset: everything reads the primary.
    read_database_url: str = field(
        default_factory=lambda: os.environ.get("LEDGER_READ_DATABASE_URL") or ""
    )
    # Seconds a read may wait for the standby to replay what the primary
    # already has (a new counter, a position, a key) before UNAVAILABLE.
    read_replay_wait: float = field(
        default_factory=lambda: _env_float("LEDGER_READ_REPLAY_WAIT", 5.0)
    )
    # Worker processes sharing the listen port (SO_REUSEPORT) under one
    # supervisor: a number, or "auto" for the CPU count.
    workers: str = field(default_factory=lambda: os.environ.get("LEDGER_WORKERS") or "1")
    # Database connections (and threads running statements) per process.
    pool_size: int = field(default_factory=lambda: _env_int("LEDGER_POOL_SIZE", 16))
    # Seconds SIGTERM waits for in-flight calls before cancelling them.
    shutdown_grace: float = field(default_factory=lambda: _env_float("LEDGER_SHUTDOWN_GRACE", 10.0))
    # Following streams re-read this often even without a notification.
    poll_interval: float = field(default_factory=lambda: _env_float("LEDGER_POLL_INTERVAL", 1.0))
    # Concurrent PostEntry calls of one ledger share a transaction. Off: one
    # transaction per call (slower; kept for comparison).
    group_commit: bool = field(
        default_factory=lambda: (
            os.environ.get("LEDGER_GROUP_COMMIT", "1").lower() not in ("0", "false", "no", "off")
        )
    )
    # Under concurrent load a group's transaction waits up to this many
    # seconds for as many posts as the previous one carried (0: never waits).
    group_commit_max_wait: float = field(
        default_factory=lambda: _env_float("LEDGER_GROUP_COMMIT_MAX_WAIT", 0.003)
    )
    # Posts waiting for their group's transaction, per process; beyond it
    # PostEntry answers RESOURCE_EXHAUSTED (retry later with the same key).
    max_pending_posts: int = field(
        default_factory=lambda: _env_int("LEDGER_MAX_PENDING_POSTS", 10_000)
    )
    # Most entries per StreamEntries message (1-256).
    stream_batch: int = field(default_factory=lambda: _env_int("LEDGER_STREAM_BATCH", 256))
    # Abuse limits (docs/security.md): the largest request accepted (the
    # largest valid PostEntries by default), concurrent calls on one
    # connection, following streams per principal, how often a client may
    # ping, and how long a connection lives (then a grace for its calls).
    max_request_bytes: int = field(
        default_factory=lambda: _env_int("LEDGER_MAX_REQUEST_BYTES", 0) or max_request_bytes()
    )
    max_streams_per_connection: int = field(
        default_factory=lambda: _env_int("LEDGER_MAX_STREAMS_PER_CONNECTION", 100)
    )
    max_follows_per_principal: int = field(
        default_factory=lambda: _env_int("LEDGER_MAX_FOLLOWS_PER_PRINCIPAL", 100)
    )
    min_ping_interval: float = field(
        default_factory=lambda: _env_float("LEDGER_MIN_PING_INTERVAL", 10.0)
    )
    max_connection_age: float = field(
        default_factory=lambda: _env_float("LEDGER_MAX_CONNECTION_AGE", 1800.0)
    )
    max_connection_age_grace: float = field(
        default_factory=lambda: _env_float("LEDGER_MAX_CONNECTION_AGE_GRACE", 30.0)
    )
    # An idle following stream gets a heartbeat message this often.
    heartbeat_interval: float = field(
        default_factory=lambda: _env_float("LEDGER_HEARTBEAT_INTERVAL", 15.0)
    )
    # host:port of the Prometheus endpoint (/metrics over HTTP); unset: none.
    metrics_listen: str = field(
        default_factory=lambda: os.environ.get("LEDGER_METRICS_LISTEN") or ""
    )
    # text, or json: one object per line (time, level, logger, message, fields).
    log_format: str = field(default_factory=lambda: os.environ.get("LEDGER_LOG_FORMAT") or "text")
    # A call that takes longer than this (ms) is logged, as a failed one is; 0: none.
    slow_call_ms: float = field(default_factory=lambda: _env_float("LEDGER_SLOW_CALL_MS", 1000.0))

    def validate(self, *, serving: bool, database: bool = True) -> None:
        """ValueError naming the first setting that cannot work, so that a
        start fails in one line instead of a traceback or a wrong server.
        `serving`: also the settings only `serve` reads; `database`: the URL."""
        check_level(self.log_level)
        check_format(self.log_format)
        if not database:
            return
        try:
            url = normalize_url(self.database_url)
        except (ValueError, sa.exc.ArgumentError):
            # Not echoed: a URL may hold a password.
            raise ValueError(
                "--database-url (LEDGER_DATABASE_URL) is not a database URL; expected e.g. "
                "postgresql://user@host/db or sqlite:///path"
            ) from None
        if url.get_backend_name() not in (dialect.POSTGRES, dialect.SQLITE):
            raise ValueError(
                f"unsupported database {url.get_backend_name()!r}: use postgresql or sqlite"
            )
        if not serving:
            return
        split_host_port(self.listen, "--listen")
        self.worker_count()
        if self.read_database_url:
            self._check_read_url()
        if self.metrics_listen:
            split_host_port(self.metrics_listen, "--metrics-listen")
        if self.slow_call_ms < 0:
            raise ValueError("--slow-call-ms: must be >= 0 (0: no slow-call log)")

    def worker_count(self) -> int:
        """--workers as a number ("auto": the CPU count); ValueError if neither."""
        raw = str(self.workers).strip().lower()
        if raw == "auto":
            return os.cpu_count() or 1
        if not raw.isdigit() or not 1 <= int(raw) <= 256:
            raise ValueError(f"--workers: expected a number 1-256 or auto, got {self.workers!r}")
        return int(raw)

    def _check_read_url(self) -> None:
        try:
            url = normalize_url(self.read_database_url)
        except (ValueError, sa.exc.ArgumentError):
            raise ValueError(
                "--read-database-url (LEDGER_READ_DATABASE_URL) is not a database URL"
            ) from None
        primary = normalize_url(self.database_url).get_backend_name()
        if url.get_backend_name() != dialect.POSTGRES or primary != dialect.POSTGRES:
            raise ValueError("--read-database-url: a Postgres standby of a Postgres --database-url")
        if self.read_replay_wait < 0:
            raise ValueError("--read-replay-wait: must be >= 0")

    def tls_files(self) -> TlsFiles | None:
        """The TLS files, None without TLS; ValueError if they do not go together."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        client_ca = Path(self.tls_client_ca) if self.tls_client_ca else None
        return TlsFiles(Path(self.tls_cert), Path(self.tls_key), client_ca)

    def db_timeouts(self) -> DbTimeouts:
        return DbTimeouts(answer=self.db_timeout, tcp=self.db_tcp_timeout)
