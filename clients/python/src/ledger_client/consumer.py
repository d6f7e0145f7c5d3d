"""Named consumers: follow a ledger from a consumer's stored position and
acknowledge (AckEntries) what the caller has processed, at least once.

`LedgerClient.consume(...)` returns a `ConsumerStream`, `AsyncLedgerClient.consume(...)`
an `AsyncConsumerStream`. An entry counts as processed once the caller asks for
the next one, calls `ack()`, or closes the stream without an error.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from types import TracebackType

from ledger.v1 import ledger_pb2

__all__ = ["AsyncConsumerStream", "ConsumerStream"]


class _Progress:
    """What a consumer has processed and when to acknowledge it; no I/O.

    `position` is the number the next ack stores: every entry the stream should
    send up to it was handed to the caller and processed. Within a message that
    is the last processed entry's number; once the message's last entry is
    processed, the message's `through_sequence`, which with an account filter
    also covers the entries that did not match."""

    def __init__(self, ack_every: int, ack_interval: float | None) -> None:
        if ack_every < 1:
            raise ValueError("ack_every must be at least 1")
        if ack_interval is not None and ack_interval <= 0:
            raise ValueError("ack_interval must be positive, or None")
        self._ack_every = ack_every
        self._ack_interval = ack_interval
        self.position = 0
        self.acked = 0
        self._pending: deque[ledger_pb2.Entry] = deque()
        self._through = 0
        self._in_hand: int | None = None  # the position the entry in hand reaches
        self._processed = 0  # entries processed since the last ack
        self._last_ack = time.monotonic()

    def settle(self) -> None:
        """The entry handed out last has been processed."""
        if self._in_hand is not None:
            self.position = max(self.position, self._in_hand)
            self._processed += 1
            self._in_hand = None

    def drop(self) -> None:
        """The entry handed out last was not processed (the caller failed on it)."""
        self._in_hand = None

    def take(self) -> ledger_pb2.Entry | None:
        """The next entry to hand out, if the current message has one left."""
        if not self._pending:
            return None
        entry = self._pending.popleft()
        self._in_hand = entry.sequence if self._pending else max(entry.sequence, self._through)
        return entry

    def received(self, message: ledger_pb2.StreamEntriesResponse) -> None:
        """A new message, once every entry of the one before was processed."""
        if message.entries:
            self._pending.extend(message.entries)
            self._through = message.through_sequence
        else:  # caught-up marker or heartbeat: the filter's progress moves on
            self.position = max(self.position, message.through_sequence)

    def due(self) -> bool:
        if self.position <= self.acked:
            return False
        if self._processed >= self._ack_every:
            return True
        interval = self._ack_interval
        return interval is not None and time.monotonic() - self._last_ack >= interval

    def acknowledged(self, sequence: int) -> None:
        self.acked = max(self.acked, sequence)
        self._processed = 0
        self._last_ack = time.monotonic()


class ConsumerStream:
    """A named consumer's entries, from after its stored position, with acks.

    Iterate it (`for entry in stream`), ideally in a `with` block: leaving the
    block acknowledges what was processed and ends the call. Acks go out every
    `ack_every` processed entries or after `ack_interval` seconds (checked as
    entries and heartbeats arrive), whichever comes first; `ack()` sends one
    now. After a crash the consumer gets again exactly the entries after its
    last ack: at least once, in order."""

    def __init__(
        self,
        messages: Generator[ledger_pb2.StreamEntriesResponse, None, None],
        ack: Callable[[int], ledger_pb2.AckEntriesResponse],
        *,
        ack_every: int,
        ack_interval: float | None,
    ) -> None:
        self._progress = _Progress(ack_every, ack_interval)
        self._messages = messages
        self._send_ack = ack
        self._closed = False

    @property
    def position(self) -> int:
        """The number the next ack stores: processed through here (0 before any)."""
        return self._progress.position

    @property
    def acked(self) -> int:
        """The last position this stream acknowledged (0: none yet)."""
        return self._progress.acked

    def __iter__(self) -> ConsumerStream:
        return self

    def __next__(self) -> ledger_pb2.Entry:
        if self._closed:
            raise StopIteration
        progress = self._progress
        progress.settle()
        self._ack_if_due()
        while (entry := progress.take()) is None:
            try:
                message = next(self._messages)
            except StopIteration:
                self.close()  # the stream ended (follow=False): all of it processed
                raise
            progress.received(message)
            if not message.entries:
                self._ack_if_due()
        return entry

    def ack(self) -> int:
        """Counts the entry in hand as processed and stores the position now;
        returns the stored position."""
        self._progress.settle()
        self._ack()
        return self._progress.acked

    def close(self) -> None:
        """Counts the entry in hand as processed, acknowledges and ends the call."""
        if self._closed:
            return
        try:
            self.ack()
        finally:
            self._closed = True
            self._messages.close()

    def _ack_if_due(self) -> None:
        if self._progress.due():
            self._ack()

    def _ack(self) -> None:
        position = self._progress.position
        if position > self._progress.acked:
            self._progress.acknowledged(self._send_ack(position).sequence)

    def __enter__(self) -> ConsumerStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The caller failed on the entry in hand: it is not processed. What came
        # before is acknowledged if the server can be reached; the caller's
        # error is the one that propagates.
        self._progress.drop()
        with contextlib.suppress(Exception):
            self.close()  # ends the call even when the ack fails


class AsyncConsumerStream:
    """The asyncio twin of ConsumerStream: `async with client.consume(...) as
    stream: async for entry in stream: ...`; `ack()` and `aclose()` are awaited."""

    def __init__(
        self,
        messages: AsyncGenerator[ledger_pb2.StreamEntriesResponse, None],
        ack: Callable[[int], Awaitable[ledger_pb2.AckEntriesResponse]],
        *,
        ack_every: int,
        ack_interval: float | None,
    ) -> None:
        self._progress = _Progress(ack_every, ack_interval)
        self._messages = messages
        self._send_ack = ack
        self._closed = False

    @property
    def position(self) -> int:
        """As ConsumerStream.position."""
        return self._progress.position

    @property
    def acked(self) -> int:
        """As ConsumerStream.acked."""
        return self._progress.acked

    def __aiter__(self) -> AsyncConsumerStream:
        return self

    async def __anext__(self) -> ledger_pb2.Entry:
        if self._closed:
            raise StopAsyncIteration
        progress = self._progress
        progress.settle()
        await self._ack_if_due()
        while (entry := progress.take()) is None:
            try:
                message = await anext(self._messages)
            except StopAsyncIteration:
                await self.aclose()
                raise
            progress.received(message)
            if not message.entries:
                await self._ack_if_due()
        return entry

    async def ack(self) -> int:
        """As ConsumerStream.ack."""
        self._progress.settle()
        await self._ack()
        return self._progress.acked

    async def aclose(self) -> None:
        """As ConsumerStream.close."""
        if self._closed:
            return
        try:
            await self.ack()
        finally:
            self._closed = True
            await self._messages.aclose()

    async def _ack_if_due(self) -> None:
        if self._progress.due():
            await self._ack()

    async def _ack(self) -> None:
        position = self._progress.position
        if position > self._progress.acked:
            self._progress.acknowledged((await self._send_ack(position)).sequence)

    async def __aenter__(self) -> AsyncConsumerStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
            return
        self._progress.drop()
        with contextlib.suppress(Exception):
            await self.aclose()
