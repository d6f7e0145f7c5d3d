"""Domain values <-> ledger.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ledger.v1 import ledger_pb2

from ..domain.accounts import AccountView, AssetTotals
from ..domain.chain import GENESIS
from ..domain.consumers import ConsumerPosition
from ..domain.entries import Balance, Counter, Entry, NewEntry, Posting, PostResult
from ..domain.validation import validate_batch, validate_new_entry
from . import wire


def _postings(items: Iterable[ledger_pb2.Posting]) -> tuple[Posting, ...]:
    return tuple(Posting(p.debit_account, p.credit_account, p.amount, p.asset) for p in items)


def _listed_posting(
    request: ledger_pb2.PostEntryRequest | ledger_pb2.EntryInput,
) -> bytes:
    """Entry.postings for a request of the single pair (Entry lists every
    posting); nothing for one of postings, which lists them itself, or an
    invalid one, which validation refuses anyway."""
    if request.postings or request.amount <= 0:
        return b""
    return wire.posting_field(
        request.debit_account, request.credit_account, request.amount, request.asset
    )


def new_entry_from_request(request: ledger_pb2.PostEntryRequest, posted_by: str = "") -> NewEntry:
    # Fields the server does not know (a newer client) must not reach the
    # stored encoding, where they would read as Entry fields.
    request.DiscardUnknownFields()
    return validate_new_entry(
        ledger=request.ledger,
        idempotency_key=request.idempotency_key,
        debit_account=request.debit_account,
        credit_account=request.credit_account,
        amount=request.amount,
        asset=request.asset,
        entry_type=request.entry_type,
        description=request.description,
        metadata=dict(request.metadata),
        # PostEntryRequest's field numbers are Entry's (see ledger.proto); a
        # posted_by the request sent was an unknown field, discarded above.
        encoded=request.SerializeToString()
        + wire.posted_by_field(posted_by)
        + _listed_posting(request),
        posted_by=posted_by,
        postings=_postings(request.postings),
    )


def batch_from_request(
    request: ledger_pb2.PostEntriesRequest, posted_by: str = ""
) -> list[NewEntry]:
    request.DiscardUnknownFields()
    ledger = wire.ledger_field(request.ledger)
    posted = wire.posted_by_field(posted_by)
    items = request.entries
    postings = [_postings(e.postings) for e in items] if any(e.postings for e in items) else None
    # One pass over the parsed entries, each read as a tuple of its fields
    # (validation then works a column at a time).
    return validate_batch(
        request.ledger,
        [
            (
                e.idempotency_key,
                e.debit_account,
                e.credit_account,
                e.amount,
                e.asset,
                e.entry_type,
                e.description,
                dict(e.metadata) if len(e.metadata) else {},
                # EntryInput's field numbers are Entry's: ledger + item = payload.
                ledger + e.SerializeToString() + posted + _listed_posting(e),
            )
            for e in items
        ],
        posted_by,
        postings,
    )


def entry_to_proto(entry: Entry) -> ledger_pb2.Entry:
    # Parsing the stored encoding beats building the message field by field.
    return wire.entry_message(wire.stored_payload(entry), entry.sequence, entry.created_at)


def asset_balance(b: AssetTotals) -> ledger_pb2.AssetBalance:
    return ledger_pb2.AssetBalance(
        asset=b.asset,
        total_debits=b.debits,
        total_credits=b.credits,
        balance=b.balance,
        max_net_debit=b.max_net_debit,
        max_net_credit=b.max_net_credit,
    )


def account_to_proto(view: AccountView) -> ledger_pb2.GetAccountResponse:
    return ledger_pb2.GetAccountResponse(
        ledger=view.ledger,
        account=view.account,
        as_of_sequence=view.as_of_sequence,
        balances=[asset_balance(b) for b in view.balances],
    )


def balances_to_proto(balances: Sequence[Balance]) -> list[ledger_pb2.AccountAssetBalance]:
    return [
        ledger_pb2.AccountAssetBalance(
            account=b.account,
            asset=b.asset,
            total_debits=b.debits,
            total_credits=b.credits,
            balance=b.balance,
        )
        for b in balances
    ]


def post_response(result: PostResult) -> ledger_pb2.PostEntryResponse:
    return ledger_pb2.PostEntryResponse(
        entry=entry_to_proto(result.entry),
        replayed=result.replayed,
        balances=balances_to_proto(result.balances),
    )


def reverse_response(result: PostResult) -> ledger_pb2.ReverseEntryResponse:
    return ledger_pb2.ReverseEntryResponse(
        entry=entry_to_proto(result.entry),
        replayed=result.replayed,
        balances=balances_to_proto(result.balances),
    )


def ledger_to_proto(counter: Counter) -> ledger_pb2.GetLedgerResponse:
    response = ledger_pb2.GetLedgerResponse(
        ledger=counter.ledger,
        head_sequence=counter.value,
        # No entry yet: the chain's start. Entries restored without their
        # hashes: none to give, rather than a start that would not verify.
        head_hash=counter.head_hash or (GENESIS if counter.value == 0 else b""),
        initialized_by=counter.initialized_by,
    )
    if counter.initialized_at is not None:
        response.initialized_at.FromDatetime(counter.initialized_at)
    return response


def consumers_to_proto(
    positions: list[ConsumerPosition], head: int
) -> ledger_pb2.ListConsumersResponse:
    response = ledger_pb2.ListConsumersResponse(head_sequence=head)
    for p in positions:
        listed = response.consumers.add(
            consumer=p.consumer, sequence=p.sequence, lag=max(0, head - p.sequence)
        )
        listed.acked_at.FromDatetime(p.acked_at)
    return response
