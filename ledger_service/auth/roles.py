"""Roles, per ledger, and what each RPC needs: one table, deny by default.

    admin              everything, on every ledger, InitializeCounter included
    writer:<ledger>    PostEntry, PostEntries, ReverseEntry, SetAccountLimits,
                       and every read of that ledger
    reader:<ledger>    the reads of that ledger (StreamEntries, GetAccount, ...)

`<ledger>` may be `*`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..domain.limits import LEDGER


class Access(enum.Enum):
    """What a call does to its ledger; a role grants some of these."""

    ADMIN = "admin"
    WRITE = "writer"
    READ = "reader"


# Every LedgerService method, and what it needs. A method missing here is
# refused to everyone (tests/unit/test_auth.py checks that none is missing).
NEEDS: dict[str, Access] = {
    "InitializeCounter": Access.ADMIN,
    "PostEntry": Access.WRITE,
    "PostEntries": Access.WRITE,
    "StreamEntries": Access.READ,
    "GetAccount": Access.READ,
    "GetLedger": Access.READ,
    "SetAccountLimits": Access.WRITE,
    "ReverseEntry": Access.WRITE,
    "GetEntry": Access.READ,
    "ListAccounts": Access.READ,
    # A consumer's position is the reader's own bookkeeping: readers ack.
    "AckEntries": Access.READ,
    "ListConsumers": Access.READ,
}


@dataclass(frozen=True)
class Role:
    access: Access
    ledger: str | None  # None for admin; "*" for every ledger

    def grants(self, need: Access, ledger: str) -> bool:
        if self.access is Access.ADMIN:
            return True
        if self.ledger not in ("*", ledger):
            return False
        # A writer reads what it writes.
        return need is self.access or (need is Access.READ and self.access is Access.WRITE)


def parse_role(text: str) -> Role:
    """`admin`, `writer:<ledger>` or `reader:<ledger>` (`<ledger>` may be `*`)."""
    if text == "admin":
        return Role(Access.ADMIN, None)
    kind, sep, ledger = text.partition(":")
    named = ledger == "*" or (bool(ledger) and LEDGER.violation(ledger) is None)
    if sep and kind in ("writer", "reader") and named:
        return Role(Access(kind), ledger)
    raise ValueError(
        f"role {text!r}: must be admin, writer:<ledger> or reader:<ledger> (<ledger> may be *)"
    )


def needed(method: str, ledger: str) -> str:
    """The roles that would allow `method` on `ledger`, for a refusal's message."""
    need = NEEDS.get(method)
    if need is Access.WRITE:
        return f"writer:{ledger} or admin"
    if need is Access.READ:
        return f"reader:{ledger}, writer:{ledger} or admin"
    return "admin"
