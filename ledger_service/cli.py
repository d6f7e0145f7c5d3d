"""`ledger-service serve | migrate | init-counter | verify` (also `python -m ledger_service`)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import logging
import sys

import sqlalchemy as sa

from . import workers
from .auth.tokens import new_token, token_digest
from .config import Settings
from .domain.errors import LedgerError
from .domain.validation import validate_ledger
from .integrity import verify
from .observability import logs
from .server import StartupError, serve
from .service import use_cases
from .storage import migrate
from .storage.readiness import SchemaNotCurrent
from .storage.uow import SqlUnitOfWork, create_engine, normalize_url

log = logging.getLogger("ledger_service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger-service", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        help="SQLAlchemy URL, e.g. postgresql://user@host/db (env LEDGER_DATABASE_URL; "
        "default: the embedded SQLite file ./ledger.sqlite3)",
    )
    common.add_argument("--log-level", help="DEBUG, INFO, WARNING... (env LEDGER_LOG_LEVEL)")
    common.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="text, or json: one object per line (env LEDGER_LOG_FORMAT, default text)",
    )
    common.add_argument(
        "--db-timeout",
        type=float,
        help="seconds the database may take to accept a connection or answer a statement "
        "before the connection is abandoned (env LEDGER_DB_TIMEOUT, default 10)",
    )
    common.add_argument(
        "--db-tcp-timeout",
        type=float,
        help="seconds of silence after which TCP keepalives and tcp_user_timeout drop a "
        "database connection; 0 keeps the kernel's defaults (env LEDGER_DB_TCP_TIMEOUT, "
        "default 10)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", parents=[common], help="run the gRPC server")
    serve_p.add_argument("--listen", help="host:port (env LEDGER_LISTEN, default 127.0.0.1:50051)")
    serve_p.add_argument(
        "--auth-file",
        help="TOML file of principals, their token digests and roles (env LEDGER_AUTH_FILE); "
        "re-read when it changes and on SIGHUP. Without it, auth is off",
    )
    serve_p.add_argument(
        "--tls-cert", help="PEM certificate chain: turns on TLS (env LEDGER_TLS_CERT)"
    )
    serve_p.add_argument("--tls-key", help="PEM private key of --tls-cert (env LEDGER_TLS_KEY)")
    serve_p.add_argument(
        "--tls-client-ca",
        help="PEM CA of the client certificates: turns on mutual TLS (env LEDGER_TLS_CLIENT_CA)",
    )
    serve_p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve without auth on a non-loopback address (env LEDGER_INSECURE=1)",
    )
    serve_p.add_argument(
        "--read-database-url",
        help="URL of a Postgres hot standby of --database-url that serves streams and "
        "the other reads; writes stay on the primary (env LEDGER_READ_DATABASE_URL)",
    )
    serve_p.add_argument(
        "--read-replay-wait",
        type=float,
        help="seconds a read on the standby may wait for it to replay what the primary "
        "has before UNAVAILABLE STANDBY_BEHIND (env LEDGER_READ_REPLAY_WAIT, default 5)",
    )
    serve_p.add_argument(
        "--workers",
        help="worker processes sharing the port (SO_REUSEPORT) under a supervisor that "
        "restarts them; a number or auto, the CPU count (env LEDGER_WORKERS, default 1)",
    )
    serve_p.add_argument(
        "--pool-size", type=int, help="database connections (env LEDGER_POOL_SIZE)"
    )
    serve_p.add_argument(
        "--shutdown-grace",
        type=float,
        help="seconds to drain on SIGTERM (env LEDGER_SHUTDOWN_GRACE)",
    )
    serve_p.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between re-reads of a following stream (env LEDGER_POLL_INTERVAL)",
    )
    serve_p.add_argument(
        "--heartbeat-interval",
        type=float,
        help="seconds of idle before a heartbeat message (env LEDGER_HEARTBEAT_INTERVAL)",
    )
    serve_p.add_argument(
        "--no-group-commit",
        dest="group_commit",
        action="store_false",
        default=None,
        help="one transaction per PostEntry call (env LEDGER_GROUP_COMMIT=0)",
    )
    serve_p.add_argument(
        "--group-commit-max-wait",
        type=float,
        help="seconds a group's transaction may wait, under concurrent load, for as many "
        "posts as the previous one carried; 0 never waits "
        "(env LEDGER_GROUP_COMMIT_MAX_WAIT, default 0.003)",
    )
    serve_p.add_argument(
        "--max-pending-posts",
        type=int,
        help="posts queued for group commit before RESOURCE_EXHAUSTED "
        "(env LEDGER_MAX_PENDING_POSTS)",
    )
    serve_p.add_argument(
        "--max-request-bytes",
        type=int,
        help="largest request accepted (env LEDGER_MAX_REQUEST_BYTES; default: the largest "
        "valid PostEntries, 10 MiB)",
    )
    serve_p.add_argument(
        "--max-streams-per-connection",
        type=int,
        help="concurrent calls on one connection (env LEDGER_MAX_STREAMS_PER_CONNECTION, "
        "default 100)",
    )
    serve_p.add_argument(
        "--max-follows-per-principal",
        type=int,
        help="following streams one principal may hold open; beyond it RESOURCE_EXHAUSTED "
        "TOO_MANY_STREAMS (env LEDGER_MAX_FOLLOWS_PER_PRINCIPAL, default 100)",
    )
    serve_p.add_argument(
        "--min-ping-interval",
        type=float,
        help="seconds a client must leave between keepalive pings, else GOAWAY "
        "(env LEDGER_MIN_PING_INTERVAL, default 10)",
    )
    serve_p.add_argument(
        "--max-connection-age",
        type=float,
        help="seconds a connection lives before GOAWAY, so rotated credentials reach it "
        "(env LEDGER_MAX_CONNECTION_AGE, default 1800)",
    )
    serve_p.add_argument(
        "--max-connection-age-grace",
        type=float,
        help="seconds an aged connection's calls may finish; followers then resume "
        "elsewhere (env LEDGER_MAX_CONNECTION_AGE_GRACE, default 30)",
    )
    serve_p.add_argument(
        "--stream-batch",
        type=int,
        help="most entries per StreamEntries message, 1-256 (env LEDGER_STREAM_BATCH)",
    )
    serve_p.add_argument(
        "--metrics-listen",
        help="host:port to serve Prometheus metrics on, at /metrics over HTTP "
        "(env LEDGER_METRICS_LISTEN; default: no metrics)",
    )
    serve_p.add_argument(
        "--slow-call-ms",
        type=float,
        help="log a call that takes longer than this many milliseconds, as a failed one is; "
        "0: none (env LEDGER_SLOW_CALL_MS, default 1000)",
    )
    sub.add_parser("migrate", parents=[common], help="apply the schema migrations")
    sub.add_parser(
        "new-token", help="print a new 256-bit bearer token and the digest the auth file holds"
    )
    sub.add_parser("hash-token", help="read a token on stdin, print its digest for the auth file")
    init_p = sub.add_parser(
        "init-counter", parents=[common], help="create a ledger's counter (idempotent)"
    )
    init_p.add_argument("--ledger", required=True)
    verify_p = sub.add_parser(
        "verify",
        parents=[common],
        help="check the books: numbers 1..N, the hash chain, account totals (docs/integrity.md)",
    )
    which = verify_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ledger", help="the ledger to check")
    which.add_argument("--all", action="store_true", help="every ledger")
    verify_p.add_argument(
        "--from",
        dest="from_sequence",
        type=int,
        default=1,
        metavar="N",
        help="check the chain from entry N on (trusting entry N-1's hash); totals need 1",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    for name in (
        "database_url",
        "log_level",
        "auth_file",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "insecure",
        "db_timeout",
        "db_tcp_timeout",
        "listen",
        "pool_size",
        "shutdown_grace",
        "poll_interval",
        "heartbeat_interval",
        "group_commit",
        "group_commit_max_wait",
        "stream_batch",
        "max_pending_posts",
        "max_request_bytes",
        "max_streams_per_connection",
        "max_follows_per_principal",
        "min_ping_interval",
        "max_connection_age",
        "max_connection_age_grace",
        "log_format",
        "metrics_listen",
        "slow_call_ms",
        "read_database_url",
        "read_replay_wait",
        "workers",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        settings.validate(
            serving=args.command == "serve",
            database=args.command not in ("new-token", "hash-token"),
        )
    except ValueError as exc:  # before logging is set up: plain
        print(f"ledger-service: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "new-token":
        token = new_token()
        # The token goes to whoever runs this, once; the file keeps the digest.
        print(f"token:  {token}\nsha256: {token_digest(token)}")
        return 0
    if args.command == "hash-token":
        token = sys.stdin.readline().strip()
        if not token:
            print("ledger-service: no token on stdin", file=sys.stderr)
            return 2
        print(token_digest(token))
        return 0
    try:
        timeouts = settings.db_timeouts()
    except ValueError as exc:
        return _failed(settings, exc, 2)
    try:
        if args.command == "serve":
            if settings.worker_count() > 1:
                # A supervisor of worker processes, each a `serve` with --workers 1.
                return workers.supervise(settings, sys.argv[1:] if argv is None else argv)
            asyncio.run(serve(settings))
        elif args.command == "migrate":
            engine = create_engine(settings.database_url, pool_size=1, timeouts=timeouts)
            migrate.upgrade(engine)
            engine.dispose()
            log.info("database migrated")
        elif args.command == "init-counter":
            ledger = validate_ledger(args.ledger)
            engine = create_engine(settings.database_url, pool_size=1, timeouts=timeouts)
            _reach(engine)
            uow = functools.partial(SqlUnitOfWork, engine, timeouts=timeouts)
            # Whoever holds the database credentials is an admin already.
            counter = use_cases.initialize_counter(uow, ledger, f"cli:{getpass.getuser()}")
            engine.dispose()
            state = "created" if counter.created else "already existed"
            print(f"ledger {counter.ledger}: counter {state}, value {counter.value}")
        elif args.command == "verify":
            # One connection for the ledger list, one per range, one for the totals.
            engine = create_engine(
                settings.database_url, pool_size=verify.WORKERS + 2, timeouts=timeouts
            )
            ledgers = None if args.all else [validate_ledger(args.ledger)]
            try:
                return verify.run(engine, ledgers, from_sequence=args.from_sequence)
            finally:
                engine.dispose()
    except (LedgerError, SchemaNotCurrent) as exc:
        return _failed(settings, exc, 1)
    except StartupError as exc:
        return _failed(settings, exc, 2)
    except sa.exc.SQLAlchemyError as exc:  # the database refused, or could not be reached
        where = normalize_url(settings.database_url).render_as_string()  # hides a password
        return _failed(settings, f"database {where}: {_first_line(exc)}", 1)
    return 0


def _failed(settings: Settings, problem: object, code: int) -> int:
    """One line on stderr, not a traceback: a log line of JSON with
    --log-format json, else plain."""
    if settings.log_format == "json":
        log.error("%s", problem)
    else:
        print(f"ledger-service: {problem}", file=sys.stderr)
    return code


def _reach(engine: sa.Engine) -> None:
    """Connects once first: an unreachable database is then one line, where
    the unit of work would log a warning before the error."""
    with engine.connect():
        pass


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
