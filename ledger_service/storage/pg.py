"""Postgres hot path: the write on the psycopg connection itself.

A post's write is ONE statement (account totals, counter, insert:
storage/numbering.py) run in autocommit mode, so it is its own transaction:
psycopg sends it with its Sync in one round trip, and Postgres commits as the
statement ends. The counter lock is thus held only while the server runs the
insert and the commit; it never waits on this process, whose thread may have
to wait for the GIL before it can send or read anything. (An explicit
BEGIN ... COMMIT, even pipelined, did: psycopg sends the statement as soon as
it is queued, Postgres runs it at once, and the lock then waits for the
COMMIT.) The statement writes all or nothing, so nothing needs to look at its
result before it commits.

SQLAlchemy's execution machinery costs more Python CPU per statement than a
CPU-bound server can spare on its hot path (docs/performance.md), so these
statements go straight to psycopg: driver SQL, parameters bound by psycopg,
prepared automatically after a few runs. SQLAlchemy still owns the pool, the
schema and everything off the hot path. Errors arrive as psycopg's own;
dialect.py recognises both kinds.

Array parameters are wrapped in the types below, whose dumpers write
Postgres' binary array format directly. psycopg's generic list dumper
inspects every list on every call to find its element type, which cost more
than the encoding itself for the small arrays of a group commit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy.engine import Connection

# OIDs of the built-in element and array types.
_TEXT, _TEXT_ARRAY = 25, 1009
_INT8, _INT8_ARRAY = 20, 1016
_BYTEA, _BYTEA_ARRAY = 17, 1001

# Binary array: ndim, has-nulls flag, element oid, then (length, lower bound)
# for the one dimension, then each element as (byte length, bytes).
_HEADER = struct.Struct("!iiIii")
_EMPTY = struct.Struct("!iiI")
_LENGTH = struct.Struct("!i").pack


class TextArray(list[str]):
    """A text[] parameter (no NULL elements)."""


class BigintArray(list[int]):
    """A bigint[] parameter (no NULL elements)."""


class ByteaArray(list[bytes]):
    """A bytea[] parameter (no NULL elements)."""


def _elements(oid: int, items: list[bytes]) -> bytes:
    if not items:
        return _EMPTY.pack(0, 0, oid)
    return _HEADER.pack(1, 0, oid, len(items), 1) + b"".join(
        [_LENGTH(len(item)) + item for item in items]
    )


class _TextArrayDumper(Dumper):
    format = Format.BINARY
    oid = _TEXT_ARRAY

    def dump(self, obj: Any) -> bytes:
        return _elements(_TEXT, [s.encode() for s in obj])


class _ByteaArrayDumper(Dumper):
    format = Format.BINARY
    oid = _BYTEA_ARRAY

    def dump(self, obj: Any) -> bytes:
        return _elements(_BYTEA, obj)


class _BigintArrayDumper(Dumper):
    format = Format.BINARY
    oid = _INT8_ARRAY

    def dump(self, obj: Any) -> bytes:
        n = len(obj)
        if not n:
            return _EMPTY.pack(0, 0, _INT8)
        # Every element is (length 8, value): one pack call for all of them.
        pairs = [part for value in obj for part in (8, value)]
        return _HEADER.pack(1, 0, _INT8, n, 1) + struct.pack("!" + "iq" * n, *pairs)


# Global registration is safe: only these private types are affected.
psycopg.adapters.register_dumper(TextArray, _TextArrayDumper)
psycopg.adapters.register_dumper(BigintArray, _BigintArrayDumper)
psycopg.adapters.register_dumper(ByteaArray, _ByteaArrayDumper)


def driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a checked-out SQLAlchemy connection."""
    return cast(psycopg.Connection[Any], conn.connection.driver_connection)


def lock_timeout(timeout: float | None) -> str:
    """A deadline `timeout` seconds away as a lock_timeout setting:
    milliseconds, at least 1 ("0" would mean no limit); "0" for None."""
    return "0" if timeout is None else str(max(1, int(timeout * 1000)))


class WriteTransaction:
    """One write transaction in one round trip: `commit_with(sql, params)`
    runs a statement that is its own transaction (autocommit) and returns
    its rows. The statement must write all or nothing, and bound its own lock
    waits by `lock_timeout` (the caller's deadline, as a lock_timeout value:
    milliseconds, "0" for none), which it sets for itself (numbering.py):
    Postgres arms a statement_timeout before the statement starts, so only a
    separate statement, hence a separate round trip, could set that."""

    def __init__(
        self,
        raw: psycopg.Connection[Any],
        timeout: float | None,
        before_commit: Callable[[], None],
    ) -> None:
        self._raw = raw
        self.lock_timeout = lock_timeout(timeout)
        self._before_commit = before_commit  # e.g. refuses once the deadline has passed
        self.committed = False

    def commit_with(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        assert not self.committed, "one statement per transaction"
        assert self._raw.autocommit, "the statement must be its own transaction"
        self._before_commit()
        with self._raw.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall()
        self.committed = True
        return rows
