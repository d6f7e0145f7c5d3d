"""A small client for ledger.v1.LedgerService, blocking (`LedgerClient`) or
asyncio (`AsyncLedgerClient`).

It adds what every caller would otherwise write: credentials (a bearer token,
TLS, mTLS) on every call, an idempotency key per post, retries of UNAVAILABLE
and DEADLINE_EXCEEDED with that same key (so a retry never posts twice) within
a time bound on the whole call, and streams that resume from the last entry
they yielded after a disconnect, for as long as `reconnect_timeout` allows.
Reads, limits, reversals (with their own key) and acks are retried the same
way; `consume` follows a named consumer and acknowledges what was processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from . import integrity
from .consumer import AsyncConsumerStream, ConsumerStream

__all__ = [
    "AsyncConsumerStream",
    "AsyncLedgerClient",
    "ConsumerStream",
    "EntryLike",
    "LedgerClient",
    "Pem",
    "PostingLike",
    "channel_options",
    "error_info",
]

# Codes after which the same request may be sent again. A post carries its
# idempotency key, so a retry after an unknown outcome replays, never doubles.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Codes after which a stream reconnects from its position. A stream has no
# deadline of ours, so a DEADLINE_EXCEEDED on one is not a stall to retry.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

# PEM contents (bytes), or the path of a PEM file (str or path-like).
Pem = bytes | str | os.PathLike[str]
# A PostEntries item: an EntryInput, or a mapping of its fields (whose
# "postings" may be PostingLike items).
EntryLike = ledger_pb2.EntryInput | Mapping[str, Any]
# One posting: a Posting, a (debit_account, credit_account, amount, asset)
# tuple, or a mapping of Posting's fields.
PostingLike = ledger_pb2.Posting | integrity.Posting | Mapping[str, Any]

R = TypeVar("R")


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo of a failed call (reason, domain, metadata)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


# The largest answer a server gives: a full PostEntries batch returned with
# each entry's balances is over gRPC's 4 MiB default (about 18 MiB at every
# limit at once), so the clients accept up to this.
MAX_RESPONSE_BYTES = 64 << 20


def channel_options(*, backoff: float = 0.1, max_backoff: float = 3.0) -> list[tuple[str, Any]]:
    """The settings the clients give the channels they build (reconnects,
    the largest answer); add them to a channel you build yourself
    (`channel=` is used as is)."""
    # gRPC backs off reconnecting up to 120 s by default and fails calls fast
    # meanwhile; cap it near our own backoff so a restarted server is found
    # again within a retry or two.
    return [
        ("grpc.initial_reconnect_backoff_ms", int(backoff * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
        ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ]


def _pem(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _check_token(token: str) -> None:
    # Never echo the token: the message must be safe to log.
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token must be non-empty printable ASCII without spaces")


def _posting(posting: PostingLike) -> ledger_pb2.Posting:
    if isinstance(posting, ledger_pb2.Posting):
        return posting  # a repeated field's extend() copies it
    if isinstance(posting, Mapping):
        return ledger_pb2.Posting(**posting)
    debit, credit, amount, asset = posting
    return ledger_pb2.Posting(
        debit_account=debit, credit_account=credit, amount=amount, asset=asset
    )


def _entry_input(entry: EntryLike) -> ledger_pb2.EntryInput:
    item = ledger_pb2.EntryInput()
    if isinstance(entry, ledger_pb2.EntryInput):
        item.CopyFrom(entry)  # a copy: the caller's message is left as it was
    else:
        fields = dict(entry)
        if fields.get("postings") is not None:
            fields["postings"] = [_posting(p) for p in fields["postings"]]
        item = ledger_pb2.EntryInput(**fields)
    if not item.idempotency_key:
        item.idempotency_key = str(uuid.uuid4())
    return item


class _Attempts:
    """One retried unary call: each attempt's deadline, and after a failure
    the delay before the next attempt, or None to give up."""

    def __init__(self, client: _ClientBase) -> None:
        self._client = client
        total = client.total_timeout
        self._deadline = None if total is None else time.monotonic() + total
        self._failures = 0

    def timeout(self) -> float:
        timeout = self._client.timeout
        if self._deadline is not None:
            timeout = max(0.001, min(timeout, self._deadline - time.monotonic()))
        return timeout

    def after(self, error: grpc.RpcError) -> float | None:
        self._failures += 1
        limit = self._client.max_attempts
        if error.code() not in RETRYABLE or (limit is not None and self._failures >= limit):
            return None
        delay = self._client._backoff_delay(self._failures - 1)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None  # no time left for another attempt
        return delay


class _Resume:
    """One resuming stream: its position, checked on every message, and after
    a failure the delay before reconnecting, or None to give up. The time
    budget restarts with every message received.

    The position is the message's `through_sequence` (every entry the stream
    should send up to it was sent), or its last entry's number if higher.
    Without `account`, a message's first entry must be the one after the
    position (a verifying stream checks each one); with it, entries must
    only increase. With `consumer` and position 0 the server picks
    the start (after the consumer's stored position), so the first message
    is not checked against a position until one is known; once any message
    came, a reconnect resumes from the client's own position."""

    def __init__(
        self,
        client: _ClientBase,
        ledger: str,
        after: int,
        follow: bool,
        consumer: str = "",
        account: str = "",
    ) -> None:
        self._client = client
        self._ledger, self._follow = ledger, follow
        self._consumer, self._account = consumer, account
        self.position = after
        # Until a message came, a consumer's start (position 0) is the server's.
        self._start_unknown = bool(consumer) and after == 0
        self._failures = 0
        self._since = time.monotonic()

    def request(self) -> ledger_pb2.StreamEntriesRequest:
        return ledger_pb2.StreamEntriesRequest(
            ledger=self._ledger,
            after_sequence=self.position,
            follow=self._follow,
            consumer=self._consumer if self._start_unknown else "",
            account=self._account,
        )

    def received(self, message: ledger_pb2.StreamEntriesResponse) -> None:
        self._failures, self._since = 0, time.monotonic()
        entries = message.entries
        if entries:
            # This check guards the guarantee rather than trusting it.
            if self._account:
                previous = None if self._start_unknown else self.position
                for entry in entries:
                    if previous is not None and entry.sequence <= previous:
                        raise RuntimeError(
                            f"stream out of order: expected above {previous}, got {entry.sequence}"
                        )
                    previous = entry.sequence
            elif not self._start_unknown:
                # A resumed stream starts right after `position`.
                first = entries[0].sequence
                if first != self.position + 1:
                    raise RuntimeError(
                        f"stream out of order: expected {self.position + 1}, got {first}"
                    )
            self.position = max(self.position, entries[-1].sequence)
        self.position = max(self.position, message.through_sequence)
        self._start_unknown = False

    def after(self, error: grpc.RpcError) -> float | None:
        self._failures += 1
        limit, budget = self._client.max_attempts, self._client.reconnect_timeout
        if error.code() not in RESUMABLE or (limit is not None and self._failures >= limit):
            return None
        delay = self._client._backoff_delay(self._failures)
        if budget is not None and time.monotonic() + delay >= self._since + budget:
            return None  # the server has been away longer than the budget
        return delay


def _stream_check(
    after_sequence: int,
    previous_hash: bytes | None,
    consumer: str,
    account: str,
) -> integrity.StreamCheck:
    """A verifying stream's check; the chain needs consecutive entries from a
    start the client knows."""
    if account:
        raise ValueError("verify checks consecutive entries: it cannot be combined with account")
    if consumer and after_sequence == 0:
        raise ValueError(
            "verify needs a known start: with consumer, pass after_sequence (the consumer's"
            " position, e.g. from list_consumers) and that entry's hash as previous_hash"
        )
    return integrity.StreamCheck(after_sequence, previous_hash)


class _ClientBase:
    """What both clients share: credentials, channel options, requests, and
    the retry and resume policy. Subclasses open the channel and wait."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: Pem | None = None,
        private_key: Pem | None = None,
        certificate_chain: Pem | None = None,
        tls: bool = False,
        server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
        timeout: float = 10.0,
        total_timeout: float | None = 30.0,
        max_attempts: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 3.0,
        reconnect_timeout: float | None = 60.0,
        channel: Any = None,
    ) -> None:
        if total_timeout is None and max_attempts is None:
            raise ValueError("total_timeout and max_attempts cannot both be None")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("private_key and certificate_chain go together (mTLS)")
        tls = tls or any(x is not None for x in (root_certificates, private_key, server_name))
        extra = list(options)
        if channel is not None and (tls or extra):
            raise ValueError("channel= is used as is: build TLS and options into it, or omit it")
        if token is not None:
            _check_token(token)
        self.timeout = timeout  # each attempt's deadline (s)
        # The whole retried call's deadline (s), backoff included; None: only
        # max_attempts bounds it, at up to max_attempts * timeout plus backoff.
        self.total_timeout = total_timeout
        self.max_attempts = max_attempts  # None: only the time budgets bound retries
        # How long a stream keeps reconnecting after its last message (s).
        self.reconnect_timeout = reconnect_timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        # With TLS the token rides as call credentials, which gRPC never sends
        # in plaintext; without TLS (or on a caller's channel), as metadata.
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token is not None and not (tls and channel is None):
            self._metadata = (("authorization", f"Bearer {token}"),)
        if channel is None:
            credentials = None
            if tls:
                credentials = grpc.ssl_channel_credentials(
                    _pem(root_certificates), _pem(private_key), _pem(certificate_chain)
                )
                if token is not None:
                    credentials = grpc.composite_channel_credentials(
                        credentials, grpc.access_token_call_credentials(token)
                    )
            opts = channel_options(backoff=backoff, max_backoff=max_backoff)
            if server_name is not None:
                opts.append(("grpc.ssl_target_name_override", server_name))
            channel = self._open(target, credentials, opts + extra)
        self._channel = channel
        self._stub = ledger_pb2_grpc.LedgerServiceStub(channel)

    def _open(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[Any]
    ) -> Any:
        raise NotImplementedError

    def _backoff_delay(self, attempt: int) -> float:
        # Full jitter: many clients retrying after one outage do not stampede.
        ceiling = self._backoff * 2 ** min(attempt, 30)
        return random.uniform(0, min(self._max_backoff, ceiling))

    @staticmethod
    def _post_request(  # in post_entry's order: both clients pass them positionally
        ledger: str,
        debit_account: str | None,
        credit_account: str | None,
        amount: int | None,
        asset: str | None,
        postings: Iterable[PostingLike] | None,
        idempotency_key: str | None,
        entry_type: str,
        description: str,
        metadata: Mapping[str, str] | None,
    ) -> ledger_pb2.PostEntryRequest:
        request = ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            entry_type=entry_type,
            description=description,
            metadata=dict(metadata or {}),
        )
        pair = (debit_account, credit_account, amount, asset)
        if postings is not None:
            if any(x is not None for x in pair):
                raise ValueError(
                    "give postings or debit_account, credit_account, amount and asset, not both"
                )
            request.postings.extend(_posting(p) for p in postings)
        elif debit_account is None or credit_account is None or amount is None or asset is None:
            raise ValueError("give debit_account, credit_account, amount and asset, or postings")
        else:
            request.debit_account, request.credit_account = debit_account, credit_account
            request.amount, request.asset = amount, asset
        return request

    @staticmethod
    def _batch_request(ledger: str, entries: Iterable[EntryLike]) -> ledger_pb2.PostEntriesRequest:
        return ledger_pb2.PostEntriesRequest(
            ledger=ledger, entries=[_entry_input(e) for e in entries]
        )

    @staticmethod
    def _limits_request(
        ledger: str, account: str, asset: str, max_net_debit: int | None, max_net_credit: int | None
    ) -> ledger_pb2.SetAccountLimitsRequest:
        request = ledger_pb2.SetAccountLimitsRequest(ledger=ledger, account=account, asset=asset)
        if max_net_debit is not None:  # unset, not 0: no limit
            request.max_net_debit = max_net_debit
        if max_net_credit is not None:
            request.max_net_credit = max_net_credit
        return request

    @staticmethod
    def _reverse_request(
        ledger: str, sequence: int, idempotency_key: str | None, description: str
    ) -> ledger_pb2.ReverseEntryRequest:
        return ledger_pb2.ReverseEntryRequest(
            ledger=ledger,
            sequence=sequence,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            description=description,
        )

    @staticmethod
    def _entry_request(
        ledger: str, sequence: int | None, idempotency_key: str | None
    ) -> ledger_pb2.GetEntryRequest:
        if sequence is not None and idempotency_key is None:
            return ledger_pb2.GetEntryRequest(ledger=ledger, sequence=sequence)
        if idempotency_key is not None and sequence is None:
            return ledger_pb2.GetEntryRequest(ledger=ledger, idempotency_key=idempotency_key)
        raise ValueError("give exactly one of sequence and idempotency_key")

    @staticmethod
    def _next_page(page: ledger_pb2.ListAccountsResponse, token: str) -> str:
        if page.next_page_token and page.next_page_token == token:
            # Guards the contract rather than trusting it: never loop for ever.
            raise RuntimeError("ListAccounts gave back the page token it was sent")
        return page.next_page_token


class LedgerClient(_ClientBase):
    """Blocking client: `with LedgerClient("127.0.0.1:50051", token=...) as c: ...`.

    Credentials: `token` is sent as `authorization: Bearer <token>` on every
    call. `root_certificates` (PEM bytes or a path) turns TLS on, `tls=True`
    with the system's CAs; `private_key` and `certificate_chain` add a client
    certificate (mTLS); `server_name` is the name to verify the server's
    certificate against when the target's host is not it. `options` are more
    channel options. A `channel` you pass is used as is (no TLS options then,
    and add `channel_options()` to it to keep the reconnect settings).

    Retries: each attempt may take `timeout`; a retried call ends within
    `total_timeout`, and with `max_attempts` (None: no limit) after that many
    attempts. A stream keeps reconnecting for `reconnect_timeout` after its
    last message (None: for ever, unless `max_attempts` failures in a row).
    """

    _channel: grpc.Channel
    _stub: ledger_pb2_grpc.LedgerServiceStub

    def _open(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[Any]
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options)
        return grpc.secure_channel(target, credentials, options)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary_with_retries(self, method: Callable[..., R], request: Any) -> R:
        """Sends the same request again after a retryable failure, within the
        budgets; only for calls that are idempotent (InitializeCounter, posts
        with their keys, reads)."""
        attempts = _Attempts(self)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = attempts.after(exc)
                if delay is None:
                    raise
            time.sleep(delay)

    def initialize_counter(self, ledger: str) -> ledger_pb2.InitializeCounterResponse:
        request = ledger_pb2.InitializeCounterRequest(ledger=ledger)
        # Idempotent by contract, so safe to retry.
        return self._unary_with_retries(self._stub.InitializeCounter, request)

    def post_entry(
        self,
        ledger: str,
        *,
        debit_account: str | None = None,
        credit_account: str | None = None,
        amount: int | None = None,
        asset: str | None = None,
        postings: Iterable[PostingLike] | None = None,
        idempotency_key: str | None = None,
        entry_type: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ledger_pb2.PostEntryResponse:
        """Posts one entry: the single pair (`debit_account`, `credit_account`,
        `amount`, `asset`) or `postings` (Posting messages, (debit, credit,
        amount, asset) tuples or mappings), not both. Without `idempotency_key`
        a fresh UUID is used; every retry of this call reuses it, so the entry
        is posted at most once. If an attempt committed but its answer was
        lost, the next one returns that entry with `replayed` true."""
        request = self._post_request(
            ledger, debit_account, credit_account, amount, asset, postings,
            idempotency_key, entry_type, description, metadata,
        )  # fmt: skip
        return self._unary_with_retries(self._stub.PostEntry, request)

    def post_entries(
        self, ledger: str, entries: Iterable[EntryLike]
    ) -> ledger_pb2.PostEntriesResponse:
        """Posts entries (EntryInput messages or mappings of their fields, whose
        "postings" may be PostingLike items) atomically: all or none. An entry
        without `idempotency_key` gets a fresh UUID, reused by every retry, so
        none is posted twice."""
        request = self._batch_request(ledger, entries)
        return self._unary_with_retries(self._stub.PostEntries, request)

    def get_account(
        self, ledger: str, account: str, *, as_of_sequence: int = 0
    ) -> ledger_pb2.GetAccountResponse:
        """An account's totals per asset: now, or as of entry `as_of_sequence`."""
        request = ledger_pb2.GetAccountRequest(
            ledger=ledger, account=account, as_of_sequence=as_of_sequence
        )
        return self._unary_with_retries(self._stub.GetAccount, request)  # a read: safe to retry

    def set_account_limits(
        self,
        ledger: str,
        account: str,
        asset: str,
        *,
        max_net_debit: int | None = None,
        max_net_credit: int | None = None,
    ) -> ledger_pb2.SetAccountLimitsResponse:
        """Replaces the account's limits in `asset` (None: no limit). Retried:
        setting the same values again changes nothing."""
        request = self._limits_request(ledger, account, asset, max_net_debit, max_net_credit)
        return self._unary_with_retries(self._stub.SetAccountLimits, request)

    def reverse_entry(
        self,
        ledger: str,
        sequence: int,
        idempotency_key: str | None = None,
        *,
        description: str = "",
    ) -> ledger_pb2.ReverseEntryResponse:
        """Reverses entry `sequence` with a new entry of swapped postings. The
        key (a fresh UUID without one) is reused by every retry, which then
        replays: the reversal is posted at most once."""
        request = self._reverse_request(ledger, sequence, idempotency_key, description)
        return self._unary_with_retries(self._stub.ReverseEntry, request)

    def get_entry(
        self, ledger: str, *, sequence: int | None = None, idempotency_key: str | None = None
    ) -> ledger_pb2.GetEntryResponse:
        """One entry, by exactly one of `sequence` and `idempotency_key`."""
        request = self._entry_request(ledger, sequence, idempotency_key)
        return self._unary_with_retries(self._stub.GetEntry, request)

    def list_accounts(
        self, ledger: str, *, page_size: int = 0, page_token: str = ""
    ) -> ledger_pb2.ListAccountsResponse:
        """One page of the ledger's accounts, by name (page_size 0: the server's
        default); pass `next_page_token` back for the next one."""
        request = ledger_pb2.ListAccountsRequest(
            ledger=ledger, page_size=page_size, page_token=page_token
        )
        return self._unary_with_retries(self._stub.ListAccounts, request)

    def accounts(
        self, ledger: str, *, page_size: int = 0
    ) -> Generator[ledger_pb2.AccountSummary, None, None]:
        """Every account of the ledger, by name, page after page (each page is
        retried alone and read in a snapshot of its own)."""
        token = ""
        while True:
            page = self.list_accounts(ledger, page_size=page_size, page_token=token)
            yield from page.accounts
            token = self._next_page(page, token)
            if not token:
                return

    def stream_messages(
        self,
        ledger: str,
        *,
        after_sequence: int = 0,
        follow: bool = False,
        consumer: str = "",
        account: str = "",
    ) -> Generator[ledger_pb2.StreamEntriesResponse, None, None]:
        """StreamEntries messages (entries, caught-up markers, heartbeats). After
        UNAVAILABLE it reconnects from its position (the last message's
        `through_sequence`), so no entry is yielded twice or skipped, for
        `reconnect_timeout` after the last message received.

        `consumer` with after_sequence 0: the server starts after that
        consumer's stored position (AckEntries); reconnects resume from the
        client's own position. `account`: only entries with a posting on it,
        in number order but not consecutive."""
        resume = _Resume(self, ledger, after_sequence, follow, consumer, account)
        while True:
            call = self._stub.StreamEntries(resume.request(), metadata=self._metadata)
            try:
                for message in call:
                    resume.received(message)
                    yield message
                return
            except grpc.RpcError as exc:
                delay = resume.after(exc)
                if delay is None:
                    raise
            finally:
                call.cancel()  # type: ignore[no-untyped-call]
            time.sleep(delay)

    def stream_entries(
        self,
        ledger: str,
        *,
        after_sequence: int = 0,
        follow: bool = False,
        verify: bool = False,
        previous_hash: bytes | None = None,
        consumer: str = "",
        account: str = "",
    ) -> Generator[ledger_pb2.Entry, None, None]:
        """Entries in order from after_sequence + 1 (with `consumer` and
        after_sequence 0: after the consumer's stored position), resuming
        after disconnects; with `account`, only those posting to it.

        `verify`: check each entry's number and hash chain as it arrives
        (docs/integrity.md), raising integrity.ChainBroken, which names the
        entry. After entry N, pass N's hash as `previous_hash`; without it
        entry N is read too and its hash trusted. The chain needs every entry
        from a known start: verify with `account` is a ValueError, and so is
        verify with `consumer` unless after_sequence is given (which wins over
        the consumer's position anyway)."""
        check = _stream_check(after_sequence, previous_hash, consumer, account) if verify else None
        start = after_sequence if check is None else check.request_after
        messages = self.stream_messages(
            ledger,
            after_sequence=start,
            follow=follow,
            consumer="" if verify else consumer,
            account=account,
        )
        for message in messages:
            for entry in message.entries:
                if check is None or check.accept(entry):
                    yield entry
            if check is not None and message.caught_up:
                check.caught_up(ledger)

    def get_ledger(self, ledger: str) -> ledger_pb2.GetLedgerResponse:
        """The ledger's head number and head hash, to anchor the chain."""
        request = ledger_pb2.GetLedgerRequest(ledger=ledger)
        return self._unary_with_retries(self._stub.GetLedger, request)

    def ack_entries(
        self, ledger: str, consumer: str, sequence: int
    ) -> ledger_pb2.AckEntriesResponse:
        """Stores `consumer`'s position: it has processed every entry up to
        `sequence`. Retried: the same position again is a success. Below the
        stored one: FAILED_PRECONDITION, reason CONSUMER_POSITION_BEHIND."""
        request = ledger_pb2.AckEntriesRequest(ledger=ledger, consumer=consumer, sequence=sequence)
        return self._unary_with_retries(self._stub.AckEntries, request)

    def list_consumers(self, ledger: str) -> ledger_pb2.ListConsumersResponse:
        """The ledger's named consumers, with their positions and lag."""
        request = ledger_pb2.ListConsumersRequest(ledger=ledger)
        return self._unary_with_retries(self._stub.ListConsumers, request)

    def consume(
        self,
        ledger: str,
        consumer: str,
        *,
        ack_every: int = 100,
        ack_interval: float | None = 1.0,
        account: str = "",
        follow: bool = True,
    ) -> ConsumerStream:
        """Follows `consumer` from after its stored position and acknowledges
        what the caller processed (an entry is, once the next one is asked
        for): every `ack_every` entries or `ack_interval` seconds (None: by
        count only), on `ack()` and on leaving the `with` block. With
        `account`, only its entries, and the position also moves over the
        others. `follow=False` ends once caught up."""
        messages = self.stream_messages(ledger, follow=follow, consumer=consumer, account=account)
        return ConsumerStream(
            messages,
            lambda sequence: self.ack_entries(ledger, consumer, sequence),
            ack_every=ack_every,
            ack_interval=ack_interval,
        )


class AsyncLedgerClient(_ClientBase):
    """The asyncio twin of LedgerClient (grpc.aio), with the same arguments,
    methods (awaitable; streams are async iterators) and behaviour. Make it
    inside the running loop: `async with AsyncLedgerClient(target) as c: ...`.
    Close a stream you leave early (`contextlib.aclosing`) to end its call."""

    _channel: grpc.aio.Channel
    _stub: ledger_pb2_grpc.LedgerServiceAsyncStub

    def _open(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[Any]
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options)
        return grpc.aio.secure_channel(target, credentials, options)

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _unary_with_retries(self, method: Callable[..., Awaitable[R]], request: Any) -> R:
        attempts = _Attempts(self)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = attempts.after(exc)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def initialize_counter(self, ledger: str) -> ledger_pb2.InitializeCounterResponse:
        request = ledger_pb2.InitializeCounterRequest(ledger=ledger)
        return await self._unary_with_retries(self._stub.InitializeCounter, request)

    async def post_entry(
        self,
        ledger: str,
        *,
        debit_account: str | None = None,
        credit_account: str | None = None,
        amount: int | None = None,
        asset: str | None = None,
        postings: Iterable[PostingLike] | None = None,
        idempotency_key: str | None = None,
        entry_type: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ledger_pb2.PostEntryResponse:
        """As LedgerClient.post_entry."""
        request = self._post_request(
            ledger, debit_account, credit_account, amount, asset, postings,
            idempotency_key, entry_type, description, metadata,
        )  # fmt: skip
        return await self._unary_with_retries(self._stub.PostEntry, request)

    async def post_entries(
        self, ledger: str, entries: Iterable[EntryLike]
    ) -> ledger_pb2.PostEntriesResponse:
        """As LedgerClient.post_entries."""
        request = self._batch_request(ledger, entries)
        return await self._unary_with_retries(self._stub.PostEntries, request)

    async def get_account(
        self, ledger: str, account: str, *, as_of_sequence: int = 0
    ) -> ledger_pb2.GetAccountResponse:
        """As LedgerClient.get_account."""
        request = ledger_pb2.GetAccountRequest(
            ledger=ledger, account=account, as_of_sequence=as_of_sequence
        )
        return await self._unary_with_retries(self._stub.GetAccount, request)

    async def set_account_limits(
        self,
        ledger: str,
        account: str,
        asset: str,
        *,
        max_net_debit: int | None = None,
        max_net_credit: int | None = None,
    ) -> ledger_pb2.SetAccountLimitsResponse:
        """As LedgerClient.set_account_limits."""
        request = self._limits_request(ledger, account, asset, max_net_debit, max_net_credit)
        return await self._unary_with_retries(self._stub.SetAccountLimits, request)

    async def reverse_entry(
        self,
        ledger: str,
        sequence: int,
        idempotency_key: str | None = None,
        *,
        description: str = "",
    ) -> ledger_pb2.ReverseEntryResponse:
        """As LedgerClient.reverse_entry."""
        request = self._reverse_request(ledger, sequence, idempotency_key, description)
        return await self._unary_with_retries(self._stub.ReverseEntry, request)

    async def get_entry(
        self, ledger: str, *, sequence: int | None = None, idempotency_key: str | None = None
    ) -> ledger_pb2.GetEntryResponse:
        """As LedgerClient.get_entry."""
        request = self._entry_request(ledger, sequence, idempotency_key)
        return await self._unary_with_retries(self._stub.GetEntry, request)

    async def list_accounts(
        self, ledger: str, *, page_size: int = 0, page_token: str = ""
    ) -> ledger_pb2.ListAccountsResponse:
        """As LedgerClient.list_accounts."""
        request = ledger_pb2.ListAccountsRequest(
            ledger=ledger, page_size=page_size, page_token=page_token
        )
        return await self._unary_with_retries(self._stub.ListAccounts, request)

    async def accounts(
        self, ledger: str, *, page_size: int = 0
    ) -> AsyncGenerator[ledger_pb2.AccountSummary, None]:
        """As LedgerClient.accounts (an async iterator)."""
        token = ""
        while True:
            page = await self.list_accounts(ledger, page_size=page_size, page_token=token)
            for account in page.accounts:
                yield account
            token = self._next_page(page, token)
            if not token:
                return

    async def stream_messages(
        self,
        ledger: str,
        *,
        after_sequence: int = 0,
        follow: bool = False,
        consumer: str = "",
        account: str = "",
    ) -> AsyncGenerator[ledger_pb2.StreamEntriesResponse, None]:
        """As LedgerClient.stream_messages."""
        resume = _Resume(self, ledger, after_sequence, follow, consumer, account)
        while True:
            call = self._stub.StreamEntries(resume.request(), metadata=self._metadata)
            try:
                async for message in call:
                    resume.received(message)
                    yield message
                return
            except grpc.RpcError as exc:
                delay = resume.after(exc)
                if delay is None:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def stream_entries(
        self,
        ledger: str,
        *,
        after_sequence: int = 0,
        follow: bool = False,
        verify: bool = False,
        previous_hash: bytes | None = None,
        consumer: str = "",
        account: str = "",
    ) -> AsyncGenerator[ledger_pb2.Entry, None]:
        """As LedgerClient.stream_entries."""
        check = _stream_check(after_sequence, previous_hash, consumer, account) if verify else None
        start = after_sequence if check is None else check.request_after
        messages = self.stream_messages(
            ledger,
            after_sequence=start,
            follow=follow,
            consumer="" if verify else consumer,
            account=account,
        )
        async with contextlib.aclosing(messages):
            async for message in messages:
                for entry in message.entries:
                    if check is None or check.accept(entry):
                        yield entry
                if check is not None and message.caught_up:
                    check.caught_up(ledger)

    async def get_ledger(self, ledger: str) -> ledger_pb2.GetLedgerResponse:
        """As LedgerClient.get_ledger."""
        request = ledger_pb2.GetLedgerRequest(ledger=ledger)
        return await self._unary_with_retries(self._stub.GetLedger, request)

    async def ack_entries(
        self, ledger: str, consumer: str, sequence: int
    ) -> ledger_pb2.AckEntriesResponse:
        """As LedgerClient.ack_entries."""
        request = ledger_pb2.AckEntriesRequest(ledger=ledger, consumer=consumer, sequence=sequence)
        return await self._unary_with_retries(self._stub.AckEntries, request)

    async def list_consumers(self, ledger: str) -> ledger_pb2.ListConsumersResponse:
        """As LedgerClient.list_consumers."""
        request = ledger_pb2.ListConsumersRequest(ledger=ledger)
        return await self._unary_with_retries(self._stub.ListConsumers, request)

    def consume(
        self,
        ledger: str,
        consumer: str,
        *,
        ack_every: int = 100,
        ack_interval: float | None = 1.0,
        account: str = "",
        follow: bool = True,
    ) -> AsyncConsumerStream:
        """As LedgerClient.consume: `async with client.consume(...) as stream:
        async for entry in stream: ...`."""
        messages = self.stream_messages(ledger, follow=follow, consumer=consumer, account=account)
        return AsyncConsumerStream(
            messages,
            lambda sequence: self.ack_entries(ledger, consumer, sequence),
            ack_every=ack_every,
            ack_interval=ack_interval,
        )
