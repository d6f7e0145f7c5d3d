"""The check every LedgerService call passes first (api/errors.map_errors
runs it): who is calling, and may they, by roles.NEEDS. A refusal writes
nothing and is logged with the principal, method, peer and reason; a token
never is."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..domain.errors import PermissionDenied, Unauthenticated
from .principals import AuthFile, Principal
from .roles import NEEDS, needed

log = logging.getLogger(__name__)

# The principal of the call being served (None: auth is off); the servicer
# reads it to record who posted an entry.
CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ledger_caller", default=None
)

_BEARER = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header, if any."""
    for key, value in metadata or ():
        bearer = isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER
        if key == "authorization" and bearer:
            return str(value)[len(_BEARER) :].strip() or None
    return None


class Gate:
    """`check(method, request, context)`: the caller's principal, or a
    refusal. `identities(context)` gives a call's mTLS identities (None:
    no client certificates are required)."""

    def __init__(
        self,
        auth_file: AuthFile,
        identities: Callable[[Any], Sequence[str]] | None = None,
    ) -> None:
        self._file = auth_file
        self._identities = identities

    def check(self, method: str, request: Any, context: Any) -> Principal:
        principals = self._file.principals  # the file's latest good version
        # A token names the caller; without one, its certificate does.
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            principal = principals.by_token(token)
            if principal is None:
                raise self._refused(None, method, context, Unauthenticated("unknown token"))
        elif self._identities is not None:
            identities = self._identities(context)
            principal = principals.by_identities(identities)
            if principal is None:
                names = ", ".join(identities) or "none"
                why = f"no principal has this client certificate's identity ({names})"
                raise self._refused(None, method, context, Unauthenticated(why))
        else:
            why = "no credentials: send `authorization: Bearer <token>`"
            raise self._refused(None, method, context, Unauthenticated(why))
        ledger = getattr(request, "ledger", "")
        need = NEEDS.get(method)
        if need is None or not any(role.grants(need, ledger) for role in principal.roles):
            why = (
                f"{principal.name} may not call {method} on ledger {ledger!r}:"
                f" needs {needed(method, ledger)}"
            )
            raise self._refused(principal, method, context, PermissionDenied(why))
        CALLER.set(principal)
        return principal

    @staticmethod
    def _refused(
        principal: Principal | None, method: str, context: Any, error: Exception
    ) -> Exception:
        name = principal.name if principal else "anonymous"
        peer = context.peer()
        log.warning(
            "refused %s from %s (%s): %s",
            method,
            name,
            peer,
            error,
            # Fields of their own in JSON logs (observability/logs.py).
            extra={"method": method, "principal": name, "peer": peer},
        )
        return error
