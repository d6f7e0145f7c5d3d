"""LedgerService over grpc.aio: validates, runs the use cases (the blocking
ones in the database thread pool), converts results. Errors are mapped by
api.errors.map_errors. Everything it uses is built by bootstrap.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ..auth.access import CALLER
from ..auth.quotas import FollowQuota
from ..domain.balances import Limits
from ..domain.errors import DeadlineExceeded
from ..domain.limits import (
    LIST_PAGE_DEFAULT,
    STREAM_MESSAGE_MAX_BYTES,
    STREAM_MESSAGE_MAX_ENTRIES,
)
from ..domain.validation import (
    validate_ack,
    validate_as_of,
    validate_entry_lookup,
    validate_ledger,
    validate_limits_request,
    validate_page_size,
    validate_reversal,
    validate_stream_request,
)
from ..service import use_cases
from ..service.group_commit import GroupCommitter
from ..service.ports import Blocking, EntryRows, StoredRow, UowFactory
from ..service.reads import Reads, ReplayLooks
from ..service.writes import Writes
from ..streaming.tail import Tails
from ..streaming.watch import HeadWatcher
from . import page_tokens, wire
from .convert import (
    account_to_proto,
    asset_balance,
    batch_from_request,
    consumers_to_proto,
    entry_to_proto,
    ledger_to_proto,
    new_entry_from_request,
    post_response,
    reverse_response,
)
from .errors import ShuttingDown

Context = grpc.aio.ServicerContext[Any, Any]
_NO_QUOTA = contextlib.nullcontext()

# Rows per database read of a catch-up, sent as messages of at most
# message_size entries: one round trip per read however small the messages.
ROWS_PER_READ = 4096


@dataclass(frozen=True)
class StreamSettings:
    poll_interval: float = 1.0
    heartbeat_interval: float = 15.0
    message_size: int = STREAM_MESSAGE_MAX_ENTRIES  # most entries per message


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        uow: UowFactory,
        run: Blocking,
        writes: Writes,
        committer: GroupCommitter | None,
        tails: Tails,
        watcher: HeadWatcher,
        streams: StreamSettings,
        follows: FollowQuota,
        reads: Reads | None = None,
    ) -> None:
        self._uow = uow  # uow(write=..., timeout=...), for the blocking use cases
        # The reads: on the primary, or on a hot standby (service/reads.py).
        self._reads = reads or Reads(run, uow)
        self._run = run
        self._writes = writes
        # None: every post is its own transaction (--no-group-commit).
        self._committer = committer
        self._tails = tails
        self._watcher = watcher
        self._streams = streams
        self._follows = follows
        self._stopping = False

    def begin_shutdown(self) -> None:
        """Following streams end (UNAVAILABLE, resumable) instead of waiting out the grace."""
        self._stopping = True
        self._watcher.publish_all()
        self._tails.wake_all()

    async def InitializeCounter(
        self, request: ledger_pb2.InitializeCounterRequest, context: Context
    ) -> ledger_pb2.InitializeCounterResponse:
        ledger = validate_ledger(request.ledger)
        counter = await self._run(use_cases.initialize_counter, self._uow, ledger, _caller())
        response = ledger_pb2.InitializeCounterResponse(
            ledger=counter.ledger,
            value=counter.value,
            created=counter.created,
            initialized_by=counter.initialized_by,
        )
        if counter.initialized_at is not None:
            response.initialized_at.FromDatetime(counter.initialized_at)
        return response

    async def PostEntry(
        self, request: ledger_pb2.PostEntryRequest, context: Context
    ) -> ledger_pb2.PostEntryResponse:
        entry = new_entry_from_request(request, _caller())
        timeout = _remaining(context)
        if self._committer is not None:
            result = await self._committer.post(entry, timeout)
        else:
            result = await self._writes.one(entry, timeout)
        return post_response(result)

    async def PostEntries(
        self, request: ledger_pb2.PostEntriesRequest, context: Context
    ) -> ledger_pb2.PostEntriesResponse:
        batch = batch_from_request(request, _caller())
        results = await self._writes.atomic(batch, _remaining(context))
        return wire.posted_entries_message(
            [
                (
                    wire.stored_payload(r.entry),
                    r.entry.sequence,
                    r.entry.created_at,
                    r.replayed,
                    r.balances,
                )
                for r in results
            ]
        )

    async def GetAccount(
        self, request: ledger_pb2.GetAccountRequest, context: Context
    ) -> ledger_pb2.GetAccountResponse:
        validate_as_of(request.ledger, request.account, request.as_of_sequence)
        view = await self._reads.call(
            use_cases.get_account,
            request.ledger,
            request.account,
            request.as_of_sequence,
            time_left=_remaining(context),
        )
        return account_to_proto(view)

    async def SetAccountLimits(
        self, request: ledger_pb2.SetAccountLimitsRequest, context: Context
    ) -> ledger_pb2.SetAccountLimitsResponse:
        limits = Limits(
            request.max_net_debit if request.HasField("max_net_debit") else None,
            request.max_net_credit if request.HasField("max_net_credit") else None,
        )
        validate_limits_request(
            request.ledger,
            request.account,
            request.asset,
            limits.max_net_debit,
            limits.max_net_credit,
        )
        totals, as_of = await self._run(
            use_cases.set_account_limits,
            self._uow,
            request.ledger,
            request.account,
            request.asset,
            limits,
        )
        return ledger_pb2.SetAccountLimitsResponse(
            ledger=request.ledger,
            account=request.account,
            balance=asset_balance(totals),
            as_of_sequence=as_of,
        )

    async def ReverseEntry(
        self, request: ledger_pb2.ReverseEntryRequest, context: Context
    ) -> ledger_pb2.ReverseEntryResponse:
        validate_reversal(
            request.ledger, request.sequence, request.idempotency_key, request.description
        )
        result = await self._writes.reverse(
            request.ledger,
            request.sequence,
            request.idempotency_key,
            request.description,
            _caller(),
            _remaining(context),
        )
        return reverse_response(result)

    async def GetEntry(
        self, request: ledger_pb2.GetEntryRequest, context: Context
    ) -> ledger_pb2.GetEntryResponse:
        which = request.WhichOneof("selector")
        sequence = request.sequence if which == "sequence" else None
        key = request.idempotency_key if which == "idempotency_key" else None
        validate_entry_lookup(request.ledger, sequence, key)
        entry = await self._reads.call(
            use_cases.get_entry, request.ledger, sequence, key, time_left=_remaining(context)
        )
        return ledger_pb2.GetEntryResponse(entry=entry_to_proto(entry))

    async def ListAccounts(
        self, request: ledger_pb2.ListAccountsRequest, context: Context
    ) -> ledger_pb2.ListAccountsResponse:
        page_size = validate_page_size(request.ledger, request.page_size) or LIST_PAGE_DEFAULT
        after = page_tokens.decode(request.ledger, request.page_token)
        accounts, as_of, more = await self._reads.call(
            use_cases.list_accounts, request.ledger, after, page_size, time_left=_remaining(context)
        )
        return ledger_pb2.ListAccountsResponse(
            accounts=[
                ledger_pb2.AccountSummary(
                    account=name, balances=[asset_balance(b) for b in balances]
                )
                for name, balances in accounts
            ],
            next_page_token=page_tokens.encode(request.ledger, accounts[-1][0]) if more else "",
            as_of_sequence=as_of,
        )

    async def GetLedger(
        self, request: ledger_pb2.GetLedgerRequest, context: Context
    ) -> ledger_pb2.GetLedgerResponse:
        ledger = validate_ledger(request.ledger)
        counter = await self._reads.call(
            use_cases.get_ledger, ledger, time_left=_remaining(context)
        )
        return ledger_to_proto(counter)

    async def AckEntries(
        self, request: ledger_pb2.AckEntriesRequest, context: Context
    ) -> ledger_pb2.AckEntriesResponse:
        validate_ack(request.ledger, request.consumer, request.sequence)
        acked = await self._run(
            use_cases.ack_entries, self._uow, request.ledger, request.consumer, request.sequence
        )
        response = ledger_pb2.AckEntriesResponse(
            sequence=acked.position.sequence, head_sequence=acked.head
        )
        response.acked_at.FromDatetime(acked.position.acked_at)
        return response

    async def ListConsumers(
        self, request: ledger_pb2.ListConsumersRequest, context: Context
    ) -> ledger_pb2.ListConsumersResponse:
        ledger = validate_ledger(request.ledger)
        positions, head = await self._reads.call(
            use_cases.list_consumers, ledger, time_left=_remaining(context)
        )
        return consumers_to_proto(positions, head)

    async def StreamEntries(
        self, request: ledger_pb2.StreamEntriesRequest, context: Context
    ) -> AsyncIterator[ledger_pb2.StreamEntriesResponse]:
        # A follower holds one of its principal's slots while it lives.
        follows = self._follows.hold(_caller() or None) if request.follow else _NO_QUOTA
        following = self._tails.metrics.following() if request.follow else _NO_QUOTA
        with follows, following:
            async for message in self._stream(request):
                yield message

    async def _stream(
        self, request: ledger_pb2.StreamEntriesRequest
    ) -> AsyncIterator[ledger_pb2.StreamEntriesResponse]:
        """Catch-up in keyset reads of ROWS_PER_READ rows, then (follow) live
        entries.

        Catch-up: each read is one short statement; while a full read is
        being sent the next is made (one ahead, no more), so a slow consumer
        holds at most two reads and no database lock, and gRPC flow control
        makes this generator wait for it. Following: entries come from the
        ledger's shared tail (streaming/tail.py), one database read per
        commit for all followers. A stream filtered by account reads the
        account's index instead (_filtered).
        """
        ledger, position, consumer = request.ledger, request.after_sequence, request.consumer
        validate_stream_request(ledger, position, consumer, request.account)
        if consumer and not position:
            # The primary holds the positions; a standby may not have the last ack yet.
            position = await self._run(use_cases.consumer_position, self._uow, ledger, consumer)
        head = await self._reads.call(use_cases.stream_start, ledger, position)
        if request.account:
            async for message in self._filtered(
                ledger, request.account, position, head, request.follow
            ):
                yield message
            return
        settings = self._streams
        per_read = max(ROWS_PER_READ, settings.message_size)
        pending = self._read_ahead(ledger, position, per_read)
        try:
            while True:  # catch-up
                if self._stopping:
                    raise ShuttingDown()
                read = await pending
                head = max(head, read.head or 0)
                full = len(read.rows) == per_read
                if full:
                    pending = self._read_ahead(ledger, read.rows[-1][0], per_read)
                for message in self._messages(read.rows, head, caught_up=not full):
                    yield message
                if read.rows:
                    position = read.rows[-1][0]
                if not full:
                    break
        finally:
            pending.cancel()
        if not read.rows:
            yield ledger_pb2.StreamEntriesResponse(
                caught_up=True, head_sequence=head, through_sequence=position
            )
        if not request.follow:
            return
        last_sent = time.monotonic()
        async with self._tails.follow(ledger, position) as tail:
            while True:
                if self._stopping:
                    raise ShuttingDown()
                if tail.error is not None:
                    raise tail.error
                updated = tail.updated
                rows = tail.after(position, settings.message_size)
                if rows is None:  # behind the shared buffer: read on our own
                    rows = (await self._read_ahead(ledger, position, per_read)).rows
                if rows:
                    latest = max(head, tail.head)
                    # Observed before the send: a consumer that cancels as soon
                    # as it has the entries ends this generator at the yield.
                    self._tails.metrics.lag(max(0, latest - rows[-1][0]))
                    for message in self._messages(rows, latest, caught_up=False):
                        yield message
                    position = rows[-1][0]
                    last_sent = time.monotonic()
                    continue
                idle = time.monotonic() - last_sent
                if idle >= settings.heartbeat_interval:
                    head = max(head, tail.head)
                    yield ledger_pb2.StreamEntriesResponse(
                        heartbeat=True, head_sequence=head, through_sequence=position
                    )
                    last_sent = time.monotonic()
                    idle = 0.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        updated.wait(), timeout=settings.heartbeat_interval - idle
                    )

    async def _filtered(
        self, ledger: str, account: str, through: int, head: int, follow: bool
    ) -> AsyncIterator[ledger_pb2.StreamEntriesResponse]:
        """The entries of one account, from its history rows (an index
        range per asset, never the whole ledger), each read with the head of
        its snapshot: a read of fewer rows than asked has looked through the
        head, which `through_sequence` then says. Following, every commit of
        the ledger (or the poll) triggers one such read per follower."""
        settings = self._streams
        per_read = max(ROWS_PER_READ, settings.message_size)
        caught_up = False
        last_sent = time.monotonic()
        looks = ReplayLooks()
        with self._watcher.following() if follow else contextlib.nullcontext():
            while True:
                if self._stopping:
                    raise ShuttingDown()
                wake = self._watcher.event(ledger)  # before the read: no lost wake-up
                read = await self._reads.call(
                    use_cases.read_rows, ledger, through, per_read, account
                )
                full = len(read.rows) == per_read
                head = max(head, read.head or 0)
                reached = read.rows[-1][0] if full else max(through, read.head or 0)
                if read.rows or not caught_up:
                    marker = not caught_up and not full
                    messages = self._messages(read.rows, head, caught_up=marker, through=reached)
                    for message in messages:
                        yield message
                    if not read.rows:  # the catch-up's end, with nothing (more) to send
                        yield ledger_pb2.StreamEntriesResponse(
                            caught_up=True, head_sequence=head, through_sequence=reached
                        )
                    caught_up = caught_up or marker
                    last_sent = time.monotonic()
                through = reached
                if full:
                    continue
                if not follow:
                    return
                if head < self._watcher.heard(ledger):  # a standby, replaying
                    await asyncio.sleep(looks.next())
                    continue
                looks.reset()
                idle = time.monotonic() - last_sent
                if idle >= settings.heartbeat_interval:
                    yield ledger_pb2.StreamEntriesResponse(
                        heartbeat=True, head_sequence=head, through_sequence=through
                    )
                    last_sent = time.monotonic()
                    idle = 0.0
                wait = min(settings.poll_interval, settings.heartbeat_interval - idle)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=wait)

    def _messages(
        self, rows: list[StoredRow], head: int, *, caught_up: bool, through: int = 0
    ) -> Iterator[ledger_pb2.StreamEntriesResponse]:
        """Messages of at most message_size entries and about
        STREAM_MESSAGE_MAX_BYTES; `caught_up` marks the last. Each says it
        is complete through its last entry; the last one through `through`
        if that is further (a filtered read that looked up to the head)."""
        size = self._streams.message_size
        start = 0
        while start < len(rows):
            end, total = start, 0
            while end < len(rows) and end - start < size:
                total += len(rows[end][2])
                if total > STREAM_MESSAGE_MAX_BYTES and end > start:
                    break  # entries of many postings: keep under the client's limit
                end += 1
            chunk = rows[start:end]
            # Assembled from the stored encodings, not built entry by entry.
            message = wire.stream_message(chunk)
            message.head_sequence = max(head, chunk[-1][0])
            message.through_sequence = chunk[-1][0]
            if end >= len(rows):
                message.through_sequence = max(through, chunk[-1][0])
                if caught_up:
                    message.caught_up = True
            start = end
            yield message

    def _read_ahead(self, ledger: str, after: int, limit: int) -> asyncio.Future[EntryRows]:
        return asyncio.ensure_future(
            self._run(use_cases.read_rows, self._reads.uow, ledger, after, limit)
        )


def _caller() -> str:
    """The name of the call's principal, "" when auth is off (auth.access)."""
    principal = CALLER.get()
    return "" if principal is None else principal.name


def _remaining(context: Context) -> float | None:
    """Seconds left before the caller's deadline (None: no deadline)."""
    timeout = context.time_remaining()
    if timeout is not None and timeout <= 0:
        raise DeadlineExceeded("deadline exceeded before the post started; nothing was written")
    return timeout
