"""Everything that differs between Postgres and SQLite, in one place.

The repository is written once against these few helpers: the database clock,
the upsert construct, how a unique-key violation is recognised, and how errors
map to "unavailable" / "deadline exceeded".
"""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

POSTGRES = "postgresql"
SQLITE = "sqlite"

# Channel of the NOTIFY sent by each commit that adds entries; payload
# "<ledger>:<last sequence>". One LISTEN connection per server process.
NOTIFY_CHANNEL = "ledger_entries"


def name_of(conn: Connection) -> str:
    return conn.dialect.name


def now(dialect_name: str) -> sa.ColumnElement[Any]:
    """The database clock at the moment the statement runs (not transaction start),
    so created_at grows with the sequence taken under the counter lock."""
    if dialect_name == POSTGRES:
        return sa.func.clock_timestamp()
    # SQLite's clock in UTC with milliseconds, in the format SQLAlchemy parses.
    return sa.func.strftime("%Y-%m-%d %H:%M:%f", "now")


def epoch_micros(dialect_name: str, column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """A timestamp column as integer microseconds since the epoch: streams
    turn it into a protobuf Timestamp with two integer operations instead of
    parsing a datetime per row."""
    if dialect_name == POSTGRES:
        return sa.cast(sa.extract("epoch", column) * 1_000_000, sa.BigInteger)
    # SQLite keeps milliseconds (see now()); julianday() is a float, so round.
    return (
        sa.cast(
            sa.func.round((sa.func.julianday(column) - 2440587.5) * 86_400_000.0), sa.BigInteger
        )
        * 1000
    )


def insert(dialect_name: str, table: sa.Table) -> Any:
    """INSERT that supports ON CONFLICT (same API on both dialects)."""
    if dialect_name == POSTGRES:
        return postgresql.insert(table)
    return sqlite.insert(table)


# The Postgres hot path runs on the psycopg connection itself (see
# storage/pg.py), so its errors arrive unwrapped: every helper below takes
# either a SQLAlchemy error or the driver's own.


def _driver_error(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def violated_constraint(exc: BaseException) -> str:
    """Name (Postgres) or column list (SQLite) of the violated constraint."""
    orig = _driver_error(exc)
    name = getattr(getattr(orig, "diag", None), "constraint_name", None)
    if name:
        return str(name)
    # SQLite: "UNIQUE constraint failed: ledger_entries.ledger, ledger_entries.idempotency_key"
    return str(orig)


def is_idempotency_key_violation(exc: BaseException) -> bool:
    text = violated_constraint(exc)
    return text == "uq_ledger_entries_idempotency_key" or "ledger_entries.idempotency_key" in text


def is_reversal_violation(exc: BaseException) -> bool:
    text = violated_constraint(exc)
    return text == "uq_ledger_entries_reverses" or "ledger_entries.reverses_sequence" in text


def is_limit_violation(exc: BaseException) -> bool:
    """A balance limit's check on the account totals refused a write."""
    text = violated_constraint(exc)
    return "ck_ledger_account_totals_max_net_" in text or text == "ledger_balance_limit"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error; None for errors of the client side
    (a connection lost, refused or timed out) and for SQLite."""
    state = getattr(_driver_error(exc), "sqlstate", None)
    return state if isinstance(state, str) else None


def is_query_canceled(exc: BaseException) -> bool:
    """A Postgres statement gave up at its deadline: statement_timeout
    (SQLSTATE 57014) or the write's lock_timeout (55P03)."""
    return sqlstate(exc) in ("57014", "55P03")


# Failures of the database, not of the request, which a retry can outlive:
# connection, insufficient resources (disk, memory, connections), I/O, a
# shutdown or restart, a read-only database (a standby, say).
_UNAVAILABLE_CLASSES = ("08", "53", "58")
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "25006"})
# Of those, the ones after which the connection itself is gone.
_SESSION_ENDED = frozenset({"57P01", "57P02"})


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached, dropped the connection, or cannot
    do the work for now; safe to retry."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
    # No SQLSTATE: the client side lost or could not open the connection
    # (SQLite: "database is locked" after busy_timeout, also worth a retry).
    if isinstance(exc, sa.exc.OperationalError | psycopg.OperationalError):
        return True
    return isinstance(exc, sa.exc.TimeoutError)  # pool exhausted


def is_connection_lost(exc: BaseException) -> bool:
    """The error ended the connection (rather than only its statement)."""
    state = sqlstate(exc)
    if state is None:
        return isinstance(_driver_error(exc), psycopg.OperationalError)
    return state.startswith("08") or state in _SESSION_ENDED
