"""GroupCommitter's queueing rules, with an in-memory batch writer (the
database side is covered by tests/integration and tests/e2e)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from ledger_service.domain import (
    DeadlineExceeded,
    Entry,
    LedgerError,
    NewEntry,
    Overloaded,
    PostResult,
    StorageUnavailable,
    validate_new_entry,
)
from ledger_service.group_commit import GroupCommitter


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
        assert [len(b) for b in writer.batches] == [3, 3, 2]

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
