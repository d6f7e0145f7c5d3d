"""Named consumers: a position per consumer and ledger, stored by AckEntries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ConsumerPosition:
    """`consumer` has processed every entry of its ledger up to `sequence`."""

    consumer: str
    sequence: int
    acked_at: datetime


@dataclass(frozen=True)
class Acked:
    """What AckEntries stored, and the head it was checked against."""

    position: ConsumerPosition
    head: int
