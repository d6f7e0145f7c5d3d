"""Balance limits, multi-posting entries, reversals, lookups, listings and
balances as of a number, through real server processes and gRPC, on both
stores."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.testing import ServerProcess

from .conftest import FAST, assert_books_hold, details, init, post_request, run_threads

Stub = ledger_pb2_grpc.LedgerServiceStub


def posting(debit: str, credit: str, amount: int, asset: str = "USD") -> ledger_pb2.Posting:
    return ledger_pb2.Posting(
        debit_account=debit, credit_account=credit, amount=amount, asset=asset
    )


def refusal(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    info, _ = details(error.value)
    return error.value.code(), info.reason, dict(info.metadata), error.value.details() or ""


def balance_of(stub: Stub, ledger: str, account: str, as_of: int = 0) -> dict[str, int]:
    response = stub.GetAccount(
        ledger_pb2.GetAccountRequest(ledger=ledger, account=account, as_of_sequence=as_of)
    )
    return {b.asset: b.balance for b in response.balances}


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
def test_64_concurrent_spends_over_two_processes_never_overdraw(
    request: pytest.FixtureRequest, store: str, ledger: str
) -> None:
    url = request.getfixturevalue("pg_url" if store == "postgres" else "sqlite_url")
    with ServerProcess(url, extra_args=FAST) as a, ServerProcess(url, extra_args=FAST) as b:
        init(a.stub, ledger)
        a.stub.PostEntry(
            post_request(ledger, "fund", debit_account="bank", credit_account="wallet", amount=370)
        )
        a.stub.SetAccountLimits(
            ledger_pb2.SetAccountLimitsRequest(
                ledger=ledger, account="wallet", asset="USD", max_net_debit=0
            )
        )

        def spend(i: int) -> Any:
            with grpc.insecure_channel((a, b)[i % 2].address) as channel:
                return Stub(channel).PostEntry(
                    post_request(
                        ledger,
                        f"spend-{i}",
                        debit_account="wallet",
                        credit_account="shop",
                        amount=10,
                    ),
                    timeout=60,
                )

        results = run_threads(64, spend)
        posted = [r for r in results if isinstance(r, ledger_pb2.PostEntryResponse)]
        refused = [r for r in results if not isinstance(r, ledger_pb2.PostEntryResponse)]
        assert len(posted) == 37, refused[:3]
        assert sorted(r.entry.sequence for r in posted) == list(range(2, 39))
        for error in refused:
            assert isinstance(error, grpc.RpcError), error
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert details(error)[0].reason == "BALANCE_LIMIT_EXCEEDED"
        assert balance_of(b.stub, ledger, "wallet") == {"USD": 0}
        # Each success saw the wallet as of its own number.
        for r in posted:
            wallet = next(x for x in r.balances if x.account == "wallet")
            assert wallet.total_credits == 370 and wallet.total_debits == 10 * (
                r.entry.sequence - 1
            )
    assert_books_hold(url, ledger)


def test_200_concurrent_posts_each_report_the_totals_of_their_number(
    server: ServerProcess, ledger: str
) -> None:
    init(server.stub, ledger)
    # A channel per 50 callers: a connection admits 100 streams at once.
    channels = [
        grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    try:
        results = run_threads(
            200,
            lambda i: Stub(channels[i % 4]).PostEntry(
                post_request(
                    ledger, f"k{i}", debit_account="hot", credit_account=f"c{i}", amount=1
                ),
                timeout=60,
            ),
        )
    finally:
        for channel in channels:
            channel.close()
    failed = [r for r in results if not isinstance(r, ledger_pb2.PostEntryResponse)]
    assert not failed, failed[:3]
    for r in results:
        hot = next(b for b in r.balances if b.account == "hot")
        assert (hot.total_debits, hot.balance) == (r.entry.sequence, r.entry.sequence)
    assert sorted(r.entry.sequence for r in results) == list(range(1, 201))
    # A replay reports the totals as of the original entry, not as of now.
    again = server.stub.PostEntry(
        post_request(ledger, "k7", debit_account="hot", credit_account="c7", amount=1)
    )
    assert again.replayed and list(again.balances) == list(results[7].balances)


def test_limits_in_a_batch_fail_it_whole_naming_the_entry(
    server: ServerProcess, ledger: str
) -> None:
    stub = server.stub
    init(stub, ledger)
    limits = stub.SetAccountLimits(
        ledger_pb2.SetAccountLimitsRequest(
            ledger=ledger, account="wallet", asset="USD", max_net_debit=0, max_net_credit=50
        )
    )
    assert (limits.balance.max_net_debit, limits.balance.max_net_credit) == (0, 50)
    assert limits.balance.HasField("max_net_debit") is not False
    entries = [
        ledger_pb2.EntryInput(
            idempotency_key="in",
            debit_account="bank",
            credit_account="wallet",
            amount=40,
            asset="USD",
        ),
        ledger_pb2.EntryInput(
            idempotency_key="out",
            debit_account="wallet",
            credit_account="shop",
            amount=41,
            asset="USD",
        ),
    ]
    code, reason, meta, message = refusal(
        lambda: stub.PostEntries(ledger_pb2.PostEntriesRequest(ledger=ledger, entries=entries))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert meta["index"] == "1" and meta["would_reach"] == "1" and meta["max_net_debit"] == "0"
    assert message.startswith("entries[1]: account 'wallet' USD")
    assert stub.GetLedger(ledger_pb2.GetLedgerRequest(ledger=ledger)).head_sequence == 0
    # The current balance breaks a new limit: refused, and it says so.
    stub.PostEntry(
        post_request(ledger, "d", debit_account="bank", credit_account="wallet", amount=30)
    )
    code, reason, _, message = refusal(
        lambda: stub.SetAccountLimits(
            ledger_pb2.SetAccountLimitsRequest(
                ledger=ledger, account="wallet", asset="USD", max_net_credit=20
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert "already breaks" in message
    (shown,) = stub.GetAccount(
        ledger_pb2.GetAccountRequest(ledger=ledger, account="wallet")
    ).balances
    assert (shown.max_net_debit, shown.max_net_credit) == (0, 50)


def test_multi_posting_entries_stream_and_verify(server: ServerProcess, ledger: str) -> None:
    stub = server.stub
    init(stub, ledger)
    one = stub.PostEntry(post_request(ledger, "one", debit_account="cash", credit_account="sales"))
    assert [(p.debit_account, p.amount) for p in one.entry.postings] == [("cash", 100)]
    split = stub.PostEntry(
        ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key="split",
            postings=[
                posting("cash", "sales", 1000),
                posting("cash", "tax", 200),
                posting("fx", "cash", 5, "EUR"),
            ],
        )
    )
    assert split.entry.sequence == 2
    assert (split.entry.debit_account, split.entry.amount) == ("", 0)
    assert len(split.entry.postings) == 3
    assert [(b.account, b.asset, b.balance) for b in split.balances] == [
        ("cash", "EUR", -5),
        ("cash", "USD", 1300),
        ("fx", "EUR", 5),
        ("sales", "USD", -1100),
        ("tax", "USD", -200),
    ]
    code, reason, _, message = refusal(
        lambda: stub.PostEntry(
            ledger_pb2.PostEntryRequest(
                ledger=ledger,
                idempotency_key="both",
                debit_account="cash",
                postings=[posting("cash", "sales", 1)],
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert "debit_account: must be empty when postings are given" in message
    replay = stub.PostEntry(
        ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key="split",
            postings=[
                posting("cash", "sales", 1000),
                posting("cash", "tax", 200),
                posting("fx", "cash", 5, "EUR"),
            ],
        )
    )
    assert replay.replayed and replay.entry == split.entry
    streamed = [
        e
        for m in stub.StreamEntries(ledger_pb2.StreamEntriesRequest(ledger=ledger), timeout=30)
        for e in m.entries
    ]
    assert streamed == [one.entry, split.entry]
    assert_books_hold(server.database_url, ledger)


def test_a_reversal_happens_once_whoever_races(server: ServerProcess, ledger: str) -> None:
    stub = server.stub
    init(stub, ledger)
    stub.PostEntry(
        ledger_pb2.PostEntryRequest(
            ledger=ledger,
            idempotency_key="sale",
            postings=[posting("cash", "sales", 9), posting("cash", "tax", 1)],
        )
    )

    def reverse(i: int) -> Any:
        return stub.ReverseEntry(
            ledger_pb2.ReverseEntryRequest(
                ledger=ledger, sequence=1, idempotency_key=f"refund-{i}", description="refund"
            ),
            timeout=30,
        )

    results = run_threads(16, reverse)
    won = [r for r in results if isinstance(r, ledger_pb2.ReverseEntryResponse)]
    assert len(won) == 1, results
    reversal = won[0].entry
    assert (reversal.sequence, reversal.reverses_sequence) == (2, 1)
    assert [(p.debit_account, p.credit_account) for p in reversal.postings] == [
        ("sales", "cash"),
        ("tax", "cash"),
    ]
    for r in results:
        if r is won[0]:
            continue
        assert isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _ = details(r)
        assert (info.reason, info.metadata["reversed_by"]) == ("ALREADY_REVERSED", "2")
    same = stub.ReverseEntry(
        ledger_pb2.ReverseEntryRequest(
            ledger=ledger,
            sequence=1,
            idempotency_key=reversal.idempotency_key,
            description="refund",
        )
    )
    assert same.replayed and same.entry == reversal
    code, reason, _, _ = refusal(
        lambda: stub.ReverseEntry(
            ledger_pb2.ReverseEntryRequest(ledger=ledger, sequence=9, idempotency_key="x")
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")
    assert balance_of(stub, ledger, "cash") == {"USD": 0}
    assert_books_hold(server.database_url, ledger)


def test_entries_are_found_and_accounts_listed(server: ServerProcess, ledger: str) -> None:
    stub = server.stub
    init(stub, ledger)
    posted = [
        stub.PostEntry(post_request(ledger, f"k{i}", debit_account=f"a{i}", credit_account="src"))
        for i in range(5)
    ]
    by_number = stub.GetEntry(ledger_pb2.GetEntryRequest(ledger=ledger, sequence=3))
    by_key = stub.GetEntry(ledger_pb2.GetEntryRequest(ledger=ledger, idempotency_key="k2"))
    assert by_number.entry == by_key.entry == posted[2].entry
    code, reason, _, _ = refusal(
        lambda: stub.GetEntry(ledger_pb2.GetEntryRequest(ledger=ledger, sequence=6))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")
    code, reason, _, _ = refusal(lambda: stub.GetEntry(ledger_pb2.GetEntryRequest(ledger=ledger)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")

    names, token = [], ""
    for _ in range(10):
        page = stub.ListAccounts(
            ledger_pb2.ListAccountsRequest(ledger=ledger, page_size=2, page_token=token)
        )
        assert page.as_of_sequence == 5 and len(page.accounts) <= 2
        names += [a.account for a in page.accounts]
        token = page.next_page_token
        if not token:
            break
    assert names == ["a0", "a1", "a2", "a3", "a4", "src"]
    first = stub.ListAccounts(ledger_pb2.ListAccountsRequest(ledger=ledger, page_size=2))
    altered = (
        first.next_page_token[:-2]
        + ("A" if first.next_page_token[-2] != "A" else "B")
        + first.next_page_token[-1]
    )
    for bad in (altered, "not-a-token", first.next_page_token[:5]):
        code, reason, meta, _ = refusal(
            lambda bad=bad: stub.ListAccounts(
                ledger_pb2.ListAccountsRequest(ledger=ledger, page_token=bad)
            )
        )
        assert (code, reason, meta["fields"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            "page_token",
        )


def test_balances_as_of_a_number_match_a_recomputation_from_the_stream(
    server: ServerProcess, ledger: str
) -> None:
    stub = server.stub
    init(stub, ledger)
    for i in range(30):
        if i % 4 == 3:
            stub.ReverseEntry(
                ledger_pb2.ReverseEntryRequest(ledger=ledger, sequence=i, idempotency_key=f"r{i}")
            )
        elif i % 4 == 2:
            stub.PostEntry(
                ledger_pb2.PostEntryRequest(
                    ledger=ledger,
                    idempotency_key=f"m{i}",
                    postings=[posting("w", "x", i + 1), posting("y", "w", 2 * i + 1)],
                )
            )
        else:
            stub.PostEntry(
                post_request(ledger, f"p{i}", debit_account="w", credit_account="z", amount=i + 1)
            )
    running: dict[str, int] = {}
    expected: dict[int, dict[str, int]] = {}
    for message in stub.StreamEntries(ledger_pb2.StreamEntriesRequest(ledger=ledger), timeout=30):
        for e in message.entries:
            for p in e.postings:
                if "w" in (p.debit_account, p.credit_account):
                    sign = 1 if p.debit_account == "w" else -1
                    running[p.asset] = running.get(p.asset, 0) + sign * p.amount
            expected[e.sequence] = dict(running)
    assert len(expected) == 30
    for n, balances in expected.items():
        assert balance_of(stub, ledger, "w", n) == balances
    code, reason, _, _ = refusal(lambda: balance_of(stub, ledger, "w", 31))
    assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "POSITION_AHEAD_OF_LEDGER")


def test_entries_of_many_postings_stream_under_the_default_message_limit(
    server: ServerProcess, ledger: str
) -> None:
    """256 entries of 64 long postings are ~5 MiB: a catch-up message stops
    short of gRPC's default 4 MiB receive limit instead of failing the
    stream."""
    stub = server.stub
    init(stub, ledger)
    long = "x" * 120
    for batch in range(6):  # 50 entries of 64 postings: within a batch's 4000
        stub.PostEntries(
            ledger_pb2.PostEntriesRequest(
                ledger=ledger,
                entries=[
                    ledger_pb2.EntryInput(
                        idempotency_key=f"b{batch}-{i}",
                        postings=[posting(f"{long}-d{j}", f"{long}-c{j}", 1) for j in range(64)],
                    )
                    for i in range(50)
                ],
            ),
            timeout=120,
        )
    messages = list(stub.StreamEntries(ledger_pb2.StreamEntriesRequest(ledger=ledger), timeout=120))
    assert [e.sequence for m in messages for e in m.entries] == list(range(1, 301))
    assert max(m.ByteSize() for m in messages) < 4 << 20
    assert len(messages[0].entries) < 256  # the bytes, not the count, ended it
