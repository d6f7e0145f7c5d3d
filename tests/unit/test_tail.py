"""The shared tail: one reader per ledger, consecutive rows for every follower
(an in-memory reader stands in for the database; tests/e2e covers the rest)."""

from __future__ import annotations

import asyncio

import pytest

from ledger_service.domain.errors import StorageUnavailable
from ledger_service.service.ports import StoredRow as Row
from ledger_service.streaming.tail import Tails, _Tail
from ledger_service.streaming.watch import HeadWatcher


def rows(first: int, last: int) -> list[Row]:
    return [(s, s * 1000, b"p%d" % s) for s in range(first, last + 1)]


def test_a_tail_serves_exactly_the_rows_after_a_position() -> None:
    tail = _Tail(last=10, rows=rows(8, 10))
    assert [r[0] for r in tail.after(7, 10) or []] == [8, 9, 10]
    assert [r[0] for r in tail.after(8, 1) or []] == [9]
    assert tail.after(10, 10) == []  # nothing new yet
    assert tail.after(12, 10) == []  # ahead of the tail: wait for it
    assert tail.after(6, 10) is None  # older than the buffer: read the database
    assert _Tail(last=5).after(5, 10) == []
    assert _Tail(last=5).after(4, 10) is None


class Ledger:
    """Entries 1..n that grow; counts the reads."""

    def __init__(self) -> None:
        self.n = 0
        self.reads = 0
        self.fail: Exception | None = None

    async def read(self, ledger: str, after: int, limit: int) -> tuple[list[Row], int | None]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return rows(after + 1, min(self.n, after + limit)), self.n


async def follow(tails: Tails, position: int, until: int) -> list[int]:
    seen: list[int] = []
    async with tails.follow("l", position) as tail:
        while position < until:
            updated = tail.updated
            got = tail.after(position, 4)
            assert got is not None
            if got:
                seen.extend(r[0] for r in got)
                position = got[-1][0]
                continue
            await asyncio.wait_for(updated.wait(), 5)
    return seen


def test_many_followers_share_one_reader_and_each_sees_every_entry_once() -> None:
    async def scenario() -> None:
        ledger, watcher = Ledger(), HeadWatcher()
        tails = Tails(ledger.read, watcher, poll_interval=60, read_size=8, capacity=64)
        followers = [asyncio.create_task(follow(tails, 0, 40)) for _ in range(20)]
        for _ in range(10):  # ten commits of four entries
            await asyncio.sleep(0.01)
            ledger.n += 4
            watcher.publish("l")
        results = await asyncio.wait_for(asyncio.gather(*followers), 10)
        assert all(r == list(range(1, 41)) for r in results)
        assert ledger.reads <= 25  # about one per commit, not one per follower

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "failure",
    [StorageUnavailable("down"), ZeroDivisionError("bug")],  # expected, or a bug
    ids=["storage", "bug"],
)
def test_a_read_error_reaches_the_followers(failure: Exception) -> None:
    async def scenario() -> None:
        ledger, watcher = Ledger(), HeadWatcher()
        ledger.fail = failure
        tails = Tails(ledger.read, watcher, poll_interval=60)
        async with tails.follow("l", 0) as tail:
            updated = tail.updated
            await asyncio.wait_for(updated.wait(), 5)
            assert isinstance(tail.error, StorageUnavailable)
        ledger.fail = None
        ledger.n = 2
        async with tails.follow("l", 0) as fresh:  # a new reader after the error
            assert fresh is not tail
            await asyncio.wait_for(fresh.updated.wait(), 5)
            assert fresh.after(0, 10) == rows(1, 2)

    asyncio.run(scenario())
