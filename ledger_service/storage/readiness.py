"""Whether the server has reached its database and found its schema current:
until then every call is refused with UNAVAILABLE (server.py)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..domain.errors import StorageUnavailable
from . import migrate
from .uow import unreachable


class SchemaNotCurrent(RuntimeError):
    pass


class Readiness:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.ready = False
        self.problem: str | None = None  # why not, while not ready

    def check_schema(self) -> None:
        """Sets `ready` if the database is reachable and migrated; raises
        SchemaNotCurrent if it is reachable but not migrated."""
        try:
            current = migrate.is_current(self._engine)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            self.problem = unreachable(exc).message
            return
        if not current:
            url = self._engine.url.render_as_string()
            raise SchemaNotCurrent(f"database {url} is not migrated: run `ledger-service migrate`")
        self.ready = True
        self.problem = None

    def require_ready(self) -> None:
        if not self.ready:
            raise StorageUnavailable(
                f"the server has not reached its database yet ({self.problem}); retry"
            )
