"""Per-principal limits: how many following streams each principal may hold
open in this process (beyond it, RESOURCE_EXHAUSTED, TOO_MANY_STREAMS)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..domain.errors import TooManyStreams


class FollowQuota:
    def __init__(self, per_principal: int) -> None:
        if per_principal < 1:
            raise ValueError("the following streams per principal must be >= 1")
        self.per_principal = per_principal
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, principal: str | None) -> Iterator[None]:
        """One following stream of `principal` (None: auth is off, no quota)."""
        if principal is None:
            yield
            return
        count = self._open.get(principal, 0)
        if count >= self.per_principal:
            raise TooManyStreams(principal, self.per_principal)
        self._open[principal] = count + 1
        try:
            yield
        finally:
            left = self._open[principal] - 1
            if left:
                self._open[principal] = left
            else:
                del self._open[principal]
