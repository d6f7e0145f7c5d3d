"""GroupCommitter's queueing rules, with an in-memory batch writer (the
database side is covered by tests/integration and tests/e2e)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from ledger_service.domain.entries import Entry, NewEntry, PostResult
from ledger_service.domain.errors import (
    DeadlineExceeded,
    LedgerError,
    Overloaded,
    StorageUnavailable,
)
from ledger_service.domain.validation import validate_new_entry
from ledger_service.service.group_commit import GroupCommitter


def entry(key: str, ledger: str = "l") -> NewEntry:
    return validate_new_entry(
        ledger=ledger,
        idempotency_key=key,
        debit_account="a",
        credit_account="b",
        amount=1,
        asset="X",
    )


class GatedWriter:
    """Records batches; each batch waits until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.next = 0
        self.fail: Exception | None = None

    async def __call__(
        self, batch: Sequence[NewEntry], time_left: float | None
    ) -> list[PostResult | LedgerError]:
        self.batches.append([e.idempotency_key for e in batch])
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        out: list[PostResult | LedgerError] = []
        for e in batch:
            self.next += 1
            out.append(PostResult(Entry(self.next, datetime.now(UTC), e), replayed=False))
        return out


def test_a_lone_post_is_written_in_the_callers_own_task() -> None:
    async def scenario() -> None:
        tasks: list[asyncio.Task[object] | None] = []

        async def write(
            batch: Sequence[NewEntry], time_left: float | None
        ) -> list[PostResult | LedgerError]:
            tasks.append(asyncio.current_task())
            return [PostResult(Entry(1, datetime.now(UTC), batch[0]), replayed=False)]

        committer = GroupCommitter(write)
        caller = asyncio.current_task()
        assert (await committer.post(entry("k0"), None)).entry.sequence == 1
        assert tasks == [caller]  # no flush task in between

    asyncio.run(scenario())


def test_posts_arriving_during_a_transaction_share_the_next_one() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer)
        tasks = [asyncio.create_task(committer.post(entry("k0"), None))]
        await asyncio.sleep(0.01)
        assert writer.batches == [["k0"]]  # a lone post is not held back
        tasks += [asyncio.create_task(committer.post(entry(f"k{i}"), None)) for i in range(1, 10)]
        await asyncio.sleep(0.01)
        writer.gate.set()
        results = await asyncio.gather(*tasks)
        assert writer.batches == [["k0"], [f"k{i}" for i in range(1, 10)]]
        assert [r.entry.sequence for r in results] == list(range(1, 11))

    asyncio.run(scenario())


def test_ledgers_are_batched_separately() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer)
        writer.gate.set()
        await asyncio.gather(
            committer.post(entry("a", "one"), None), committer.post(entry("b", "two"), None)
        )
        assert sorted(writer.batches) == [["a"], ["b"]]

    asyncio.run(scenario())


def test_batches_are_capped() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer, max_batch=3)
        tasks = [asyncio.create_task(committer.post(entry(f"k{i}"), None)) for i in range(8)]
        await asyncio.sleep(0.01)
        writer.gate.set()
        await asyncio.gather(*tasks)
        # The first finds nothing in flight and goes at once, alone.
        assert [len(b) for b in writer.batches] == [1, 3, 3, 1]

    asyncio.run(scenario())


def test_a_full_queue_refuses_instead_of_growing() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer, max_pending=2)
        first = asyncio.create_task(committer.post(entry("k0"), None))
        await asyncio.sleep(0.01)  # k0 is in flight, no longer pending
        queued = [asyncio.create_task(committer.post(entry(f"k{i}"), None)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await committer.post(entry("k3"), None)
        writer.gate.set()
        await asyncio.gather(first, *queued)
        assert writer.batches == [["k0"], ["k1", "k2"]]

    asyncio.run(scenario())


def test_a_post_whose_deadline_passed_in_the_queue_is_not_written() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer)
        first = asyncio.create_task(committer.post(entry("k0"), None))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(committer.post(entry("late"), 0.001))
        on_time = asyncio.create_task(committer.post(entry("ok"), None))
        await asyncio.sleep(0.05)
        writer.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        await asyncio.gather(first, on_time)
        assert writer.batches == [["k0"], ["ok"]]

    asyncio.run(scenario())


def test_a_failed_batch_fails_only_its_own_callers() -> None:
    async def scenario() -> None:
        writer = GatedWriter()
        committer = GroupCommitter(writer)
        writer.fail = StorageUnavailable("down")
        failing = asyncio.create_task(committer.post(entry("k0"), None))
        await asyncio.sleep(0.01)
        writer.gate.set()
        with pytest.raises(StorageUnavailable):
            await failing
        writer.fail = None
        assert (await committer.post(entry("k1"), None)).entry.sequence == 1

    asyncio.run(scenario())


class SteppedWriter:
    """Records batches; each batch waits for its own permit from the test."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.next = 0

    async def __call__(
        self, batch: Sequence[NewEntry], time_left: float | None
    ) -> list[PostResult | LedgerError]:
        self.batches.append([e.idempotency_key for e in batch])
        await self.permits.get()
        out: list[PostResult | LedgerError] = []
        for e in batch:
            self.next += 1
            out.append(PostResult(Entry(self.next, datetime.now(UTC), e), replayed=False))
        return out


async def _after_a_group_of_three(committer: GroupCommitter, writer: SteppedWriter) -> list[Any]:
    """k0 alone, then k1-k3 together; returns with k4 queued behind them."""
    tasks = [asyncio.create_task(committer.post(entry("k0"), None))]
    await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(committer.post(entry(f"k{i}"), None)) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    writer.permits.put_nowait(None)  # k0 commits; k1-k3 go next (after a group of one)
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(committer.post(entry("k4"), None)))
    await asyncio.sleep(0.01)
    writer.permits.put_nowait(None)  # k1-k3 commit
    await asyncio.sleep(0.05)
    return tasks


def test_under_load_the_next_group_waits_for_as_many_posts_as_the_last() -> None:
    async def scenario() -> None:
        writer = SteppedWriter()
        committer = GroupCommitter(writer, max_wait=60.0)  # only the count can end the wait
        tasks = await _after_a_group_of_three(committer, writer)
        assert writer.batches == [["k0"], ["k1", "k2", "k3"]]  # k4 waits for company
        tasks += [asyncio.create_task(committer.post(entry(f"k{i}"), None)) for i in (5, 6)]
        await asyncio.sleep(0.01)
        writer.permits.put_nowait(None)
        await asyncio.gather(*tasks)
        assert writer.batches == [["k0"], ["k1", "k2", "k3"], ["k4", "k5", "k6"]]

    asyncio.run(scenario())


def test_the_wait_for_more_posts_is_bounded() -> None:
    async def scenario() -> None:
        writer = SteppedWriter()
        committer = GroupCommitter(writer, max_wait=0.2)
        tasks = await _after_a_group_of_three(committer, writer)
        writer.permits.put_nowait(None)
        await asyncio.gather(*tasks)  # k4 goes alone once the wait is over
        assert writer.batches == [["k0"], ["k1", "k2", "k3"], ["k4"]]

    asyncio.run(scenario())


def test_no_wait_when_disabled_or_after_a_lone_post() -> None:
    async def scenario() -> None:
        writer = SteppedWriter()
        committer = GroupCommitter(writer, max_wait=0.0)
        await _after_a_group_of_three(committer, writer)
        assert writer.batches == [["k0"], ["k1", "k2", "k3"], ["k4"]]  # written at once
        writer.permits.put_nowait(None)
        # A lone caller, one post after another: never held back, even with
        # a wait that would outlast the test.
        lone = GroupCommitter(writer, max_wait=3600.0)
        for i in range(3):
            writer.permits.put_nowait(None)
            await asyncio.wait_for(lone.post(entry(f"lone{i}"), None), timeout=30)

    asyncio.run(scenario())
