"""What a batch does to its accounts (domain/balances.py): the sums it adds,
each entry's balances right after it, the swings of the accounts it moves
both ways, and the first entry to cross a balance limit; and ListAccounts'
page tokens (api/page_tokens.py), which round-trip and refuse any token this
service did not issue for this ledger."""

from __future__ import annotations

import base64
import itertools
import random
from collections.abc import Sequence

import pytest

from ledger_service.api import page_tokens
from ledger_service.domain.balances import Breach, Key, Limits, Movements, SumOutOfRange
from ledger_service.domain.entries import Balance, NewEntry, Posting
from ledger_service.domain.errors import FieldViolation, InvalidArgument
from ledger_service.domain.limits import INT64_MAX

LEDGER = "books"


_KEYS = itertools.count(1)


def one(debit: str, credit: str, amount: int, asset: str = "USD") -> NewEntry:
    """A one-posting entry (the single pair of fields)."""
    return NewEntry(LEDGER, f"k-{next(_KEYS)}", debit, credit, amount, asset)


def many(*postings: Posting) -> NewEntry:
    """A multi-posting entry: the single pair of fields empty."""
    return NewEntry(LEDGER, f"k-{next(_KEYS)}", "", "", 0, "", postings=postings)


def rows(moves: Movements) -> list[tuple[int, str, str, int, int]]:
    """(entry index, account, asset, debits and credits added after it), sorted."""
    return sorted(moves.rows())


# cash debited 10, rent/bank, a EUR pair, then cash credited 4 (sales debited 4).
BATCH = [
    one("cash", "sales", 10),
    one("rent", "bank", 5),
    one("cash", "sales", 3, "EUR"),
    one("sales", "cash", 4),
]


# -- totals and later sums ------------------------------------------------------------


def test_totals_are_what_the_batch_adds_per_account_and_asset_sorted() -> None:
    moves = Movements(BATCH)

    assert moves.totals == [
        ("bank", "USD", 0, 5),
        ("cash", "EUR", 3, 0),
        ("cash", "USD", 10, 4),
        ("rent", "USD", 5, 0),
        ("sales", "EUR", 0, 3),
        ("sales", "USD", 4, 10),
    ]
    assert moves.sums(("cash", "USD")) == (10, 4)
    assert moves.sums(("sales", "USD")) == (4, 10)
    assert moves.size == 4


def test_each_row_holds_what_the_batch_adds_after_its_entry() -> None:
    assert rows(Movements(BATCH)) == [
        (0, "cash", "USD", 0, 4),  # entry 3 credits cash 4 later
        (0, "sales", "USD", 4, 0),  # and debits sales 4
        (1, "bank", "USD", 0, 0),
        (1, "rent", "USD", 0, 0),
        (2, "cash", "EUR", 0, 0),
        (2, "sales", "EUR", 0, 0),
        (3, "cash", "USD", 0, 0),
        (3, "sales", "USD", 0, 0),
    ]


def test_a_multi_posting_entry_moves_each_account_once_by_its_net() -> None:
    entry = many(
        Posting("cash", "sales", 1000, "USD"),
        Posting("cash", "tax", 200, "USD"),
        Posting("sales", "cash", 100, "USD"),
        Posting("cash", "sales", 7, "EUR"),
    )
    moves = Movements([entry, one("cash", "sales", 1)])

    assert moves.totals == [
        ("cash", "EUR", 7, 0),
        ("cash", "USD", 1201, 100),
        ("sales", "EUR", 0, 7),
        ("sales", "USD", 100, 1001),
        ("tax", "USD", 0, 200),
    ]
    assert rows(moves) == [
        (0, "cash", "EUR", 0, 0),
        (0, "cash", "USD", 1, 0),
        (0, "sales", "EUR", 0, 0),
        (0, "sales", "USD", 0, 1),
        (0, "tax", "USD", 0, 0),
        (1, "cash", "USD", 0, 0),
        (1, "sales", "USD", 0, 0),
    ]


# -- balances right after each entry ---------------------------------------------------


def test_balances_are_per_entry_in_batch_order_sorted_by_account_then_asset() -> None:
    moves = Movements(BATCH)
    # Totals after the batch: cash USD held (100, 50) before it, the rest nothing.
    after = {
        ("bank", "USD"): (0, 5),
        ("cash", "EUR"): (3, 0),
        ("cash", "USD"): (110, 54),
        ("rent", "USD"): (5, 0),
        ("sales", "EUR"): (0, 3),
        ("sales", "USD"): (4, 10),
    }

    assert moves.balances(after) == [
        (Balance("cash", "USD", 110, 50), Balance("sales", "USD", 0, 10)),
        # bank before rent, although rent is the entry's debit account
        (Balance("bank", "USD", 0, 5), Balance("rent", "USD", 5, 0)),
        (Balance("cash", "EUR", 3, 0), Balance("sales", "EUR", 0, 3)),
        (Balance("cash", "USD", 110, 54), Balance("sales", "USD", 4, 10)),
    ]


def test_a_multi_posting_entrys_balances_list_each_account_and_asset_once() -> None:
    entry = many(
        Posting("zeta", "alpha", 5, "USD"),
        Posting("zeta", "alpha", 6, "EUR"),
        Posting("alpha", "zeta", 2, "USD"),
    )
    moves = Movements([entry])
    after = {("alpha", "EUR"): (0, 6), ("alpha", "USD"): (2, 5), ("zeta", "EUR"): (6, 0)}
    after[("zeta", "USD")] = (5, 2)

    assert moves.balances(after) == [
        (
            Balance("alpha", "EUR", 0, 6),
            Balance("alpha", "USD", 2, 5),
            Balance("zeta", "EUR", 6, 0),
            Balance("zeta", "USD", 5, 2),
        )
    ]


# -- swings -----------------------------------------------------------------------------


def test_swings_list_only_the_accounts_the_batch_moves_both_ways() -> None:
    # cash USD: later nets 0 - 4 after entry 0, 0 after entry 3; sales the mirror.
    assert Movements(BATCH).swings() == [("cash", "USD", -4, 0), ("sales", "USD", 0, 4)]


def test_a_batch_that_moves_every_account_one_way_has_no_swings() -> None:
    moves = Movements([one("cash", "sales", 1), one("cash", "sales", 2), one("rent", "bank", 3)])

    assert moves.swings() == []


def test_a_swing_spans_the_lowest_and_highest_later_net() -> None:
    moves = Movements(
        [
            one("cash", "sales", 30),  # cash +30
            one("sales", "cash", 50),  # cash -50
            one("cash", "sales", 5),  # cash +5
            one("rent", "bank", 1),
        ]
    )
    # cash's later nets: after entry 0: -50 + 5 = -45; after 1: +5; after 2: 0.
    assert moves.swings() == [("cash", "USD", -45, 5), ("sales", "USD", -5, 45)]


# -- the first breach of a limit -------------------------------------------------------


def test_limits_are_inclusive_and_name_the_side_broken() -> None:
    assert Limits().breach(INT64_MAX, 0) is None
    assert Limits(max_net_debit=10).breach(10, 0) is None
    assert Limits(max_net_debit=10).breach(11, 0) == ("max_net_debit", 10, 11)
    assert Limits(max_net_debit=0).breach(5, 5) is None
    assert Limits(max_net_credit=10).breach(0, 10) is None
    assert Limits(max_net_credit=10).breach(3, 14) == ("max_net_credit", 10, 11)
    both = Limits(max_net_debit=5, max_net_credit=5)
    assert both.breach(0, 6) == ("max_net_credit", 5, 6)
    assert both.breach(6, 0) == ("max_net_debit", 5, 6)


def test_the_first_entry_beyond_max_net_debit_is_found() -> None:
    batch = [one("cash", "sales", 10), one("rent", "bank", 1), one("cash", "sales", 10)]
    batch += [one("cash", "sales", 10)]
    moves = Movements(batch)
    key = ("cash", "USD")

    # From (5, 0): 15 after entry 0, 25 after entry 2, 35 after entry 3.
    assert moves.first_breach(key, (5, 0), Limits(max_net_debit=24)) == Breach(
        2, "cash", "USD", "max_net_debit", 24, 25
    )
    assert moves.first_breach(key, (5, 0), Limits(max_net_debit=34)) == Breach(
        3, "cash", "USD", "max_net_debit", 34, 35
    )
    assert moves.first_breach(key, (5, 0), Limits(max_net_debit=35)) is None
    assert moves.first_breach(key, (5, 0), Limits(max_net_credit=0)) is None
    # The totals before count: 40 credits leave room for 35 more debits.
    assert moves.first_breach(key, (45, 40), Limits(max_net_debit=35)) is None
    assert moves.first_breach(key, (46, 40), Limits(max_net_debit=35)) == Breach(
        3, "cash", "USD", "max_net_debit", 35, 36
    )


def test_the_first_entry_beyond_max_net_credit_is_found() -> None:
    moves = Movements([one("cash", "sales", 10), one("cash", "sales", 10), one("a", "b", 1)])
    key = ("sales", "USD")

    assert moves.first_breach(key, (0, 0), Limits(max_net_credit=15)) == Breach(
        1, "sales", "USD", "max_net_credit", 15, 20
    )
    assert moves.first_breach(key, (0, 0), Limits(max_net_credit=9)) == Breach(
        0, "sales", "USD", "max_net_credit", 9, 10
    )
    assert moves.first_breach(key, (0, 0), Limits(max_net_credit=20)) is None
    assert moves.first_breach(key, (0, 0), Limits(max_net_debit=0)) is None


def test_a_batch_beyond_max_net_debit_mid_batch_is_refused_though_it_ends_within() -> None:
    # cash is debited 30 and credited 30 back: it ends where it started.
    moves = Movements([one("cash", "sales", 30), one("sales", "cash", 30)])

    assert moves.first_breach(("cash", "USD"), (0, 0), Limits(max_net_debit=20)) == Breach(
        0, "cash", "USD", "max_net_debit", 20, 30
    )
    # And sales dips below its credit limit the same way.
    assert moves.first_breach(("sales", "USD"), (0, 0), Limits(max_net_credit=20)) == Breach(
        0, "sales", "USD", "max_net_credit", 20, 30
    )
    # The swing shows it too: the end less the lowest later net is the peak.
    assert moves.swings() == [("cash", "USD", -30, 0), ("sales", "USD", 0, 30)]


def test_a_batch_below_max_net_credit_mid_batch_is_refused_though_it_comes_back() -> None:
    wallet = ("wallet", "USD")
    moves = Movements(
        [
            one("wallet", "bank", 5),  # net credit 10 - 5 = 5
            one("bank", "wallet", 25),  # 30: beyond 25
            one("wallet", "bank", 25),  # 5 again
        ]
    )
    limits = Limits(max_net_credit=25)

    # Before the batch: debits 50, credits 60, a net credit of 10.
    assert moves.first_breach(wallet, (50, 60), limits) == Breach(
        1, "wallet", "USD", "max_net_credit", 25, 30
    )
    assert moves.first_breach(wallet, (55, 60), limits) is None  # peaks at 25 exactly


def test_the_side_crossed_first_is_the_breach() -> None:
    moves = Movements([one("bank", "cash", 15), one("cash", "bank", 30)])
    limits = Limits(max_net_debit=10, max_net_credit=10)

    # cash: net credit 15 after entry 0, net debit 15 after entry 1.
    assert moves.first_breach(("cash", "USD"), (0, 0), limits) == Breach(
        0, "cash", "USD", "max_net_credit", 10, 15
    )
    roomier = Limits(max_net_debit=10, max_net_credit=20)
    assert moves.first_breach(("cash", "USD"), (0, 0), roomier) == Breach(
        1, "cash", "USD", "max_net_debit", 10, 15
    )


# -- sums past int64 -------------------------------------------------------------------


def test_a_sum_past_int64_is_out_of_range() -> None:
    with pytest.raises(SumOutOfRange):
        Movements([one("cash", "sales", INT64_MAX), one("cash", "sales", 1)])
    with pytest.raises(SumOutOfRange):  # credits too
        Movements([one("a", "sales", INT64_MAX), one("b", "sales", 1)])
    with pytest.raises(SumOutOfRange):  # within one multi-posting entry
        Movements([many(Posting("cash", "a", INT64_MAX, "USD"), Posting("cash", "b", 1, "USD"))])


def test_sums_up_to_int64_are_in_range() -> None:
    moves = Movements([one("cash", "sales", INT64_MAX - 1), one("cash", "sales", 1)])
    assert moves.totals == [("cash", "USD", INT64_MAX, 0), ("sales", "USD", 0, INT64_MAX)]
    # Each sum is checked alone: debits and credits at the limit both, and
    # the same amounts in other assets or accounts, are fine.
    moves = Movements(
        [
            one("a", "b", INT64_MAX),
            one("b", "a", INT64_MAX),
            one("a", "b", INT64_MAX, "EUR"),
            one("c", "d", INT64_MAX),
        ]
    )
    assert moves.sums(("a", "USD")) == (INT64_MAX, INT64_MAX)
    assert moves.sums(("a", "EUR")) == (INT64_MAX, 0)


# -- against a plain forward replay ------------------------------------------------------


def _forward(
    batch: Sequence[NewEntry], before: dict[Key, tuple[int, int]]
) -> tuple[dict[Key, tuple[int, int]], list[tuple[Balance, ...]], list[list[Key]]]:
    """Entry by entry: totals after the batch, balances after each entry,
    and the keys each entry touches."""
    totals = dict(before)
    balances: list[tuple[Balance, ...]] = []
    touched: list[list[Key]] = []
    for entry in batch:
        keys: set[Key] = set()
        for p in entry.all_postings():
            d, c = totals.get((p.debit_account, p.asset), (0, 0))
            totals[(p.debit_account, p.asset)] = (d + p.amount, c)
            d, c = totals.get((p.credit_account, p.asset), (0, 0))
            totals[(p.credit_account, p.asset)] = (d, c + p.amount)
            keys |= {(p.debit_account, p.asset), (p.credit_account, p.asset)}
        ordered = sorted(keys)
        touched.append(ordered)
        balances.append(tuple(Balance(a, s, *totals[(a, s)]) for a, s in ordered))
    return totals, balances, touched


def _random_entry(rng: random.Random) -> NewEntry:
    def posting() -> Posting:
        debit, credit = rng.sample(["a", "b", "c", "d"], 2)
        return Posting(debit, credit, rng.randint(1, 20), rng.choice(["USD", "EUR"]))

    if rng.random() < 0.5:
        return one(*posting())
    return many(*(posting() for _ in range(rng.randint(1, 4))))


@pytest.mark.parametrize("seed", range(200))
def test_movements_agree_with_a_forward_replay(seed: int) -> None:
    rng = random.Random(seed)
    batch = [_random_entry(rng) for _ in range(rng.randint(1, 12))]
    moves = Movements(batch)
    keys = sorted({(a, s) for a, s, _, _ in moves.totals})
    before = {key: (rng.randint(0, 50), rng.randint(0, 50)) for key in keys}
    after, balances, touched = _forward(batch, before)

    assert moves.totals == [
        (a, s, after[(a, s)][0] - before[(a, s)][0], after[(a, s)][1] - before[(a, s)][1])
        for a, s in keys
    ]
    assert moves.balances(after) == balances

    # Per key: (entry index, its balance) after each entry touching it.
    nets: dict[Key, list[tuple[int, Balance]]] = {key: [] for key in keys}
    for k, ordered in enumerate(touched):
        for key in ordered:
            nets[key].append((k, next(b for b in balances[k] if (b.account, b.asset) == key)))
    swings = {(a, s): (low, high) for a, s, low, high in moves.swings()}
    assert set(swings) == {key for key in keys if all(moves.sums(key))}
    for key, (low, high) in swings.items():
        end = after[key][0] - after[key][1]
        peaks = [b.balance for _, b in nets[key]]
        assert (end - low, end - high) == (max(peaks), min(peaks))

    for key in keys:
        net = before[key][0] - before[key][1]
        # Limits the totals before the batch keep, so only the batch can cross them.
        limits = Limits(
            max_net_debit=None if rng.random() < 0.3 else max(net, 0) + rng.randint(0, 30),
            max_net_credit=None if rng.random() < 0.3 else max(-net, 0) + rng.randint(0, 30),
        )
        expected = None
        for k, b in nets[key]:
            broken = limits.breach(b.debits, b.credits)
            if broken is not None:
                expected = Breach(k, key[0], key[1], *broken)
                break
        assert moves.first_breach(key, before[key], limits) == expected


# -- page tokens -------------------------------------------------------------------------


def _refused(ledger: str, token: str) -> FieldViolation:
    with pytest.raises(InvalidArgument) as error:
        page_tokens.decode(ledger, token)
    (violation,) = error.value.violations
    assert violation.field == "page_token"
    assert error.value.metadata == {"fields": "page_token"}
    return violation


@pytest.mark.parametrize(
    ("ledger", "account"),
    [
        ("books", "cash"),
        ("main:eu-1.v2", "assets:cash/ünïcode ✓"),
        ("a", "x" * 128),
        ("L" * 64, "🙂"),
    ],
)
def test_a_page_token_round_trips_and_is_url_safe(ledger: str, account: str) -> None:
    token = page_tokens.encode(ledger, account)

    assert page_tokens.decode(ledger, token) == account
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_no_token_is_the_first_page() -> None:
    assert page_tokens.decode(LEDGER, "") == ""


def test_an_altered_token_is_refused() -> None:
    token = page_tokens.encode(LEDGER, "cash")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # Every byte of it, the checksum, the version, the ledger and the account.
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 0x01
        forged = base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
        assert "altered" in _refused(LEDGER, forged).description, i
    # And as the client holds it: one character changed.
    middle = len(token) // 2
    swapped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert "altered" in _refused(LEDGER, swapped).description


def test_a_truncated_token_is_refused() -> None:
    token = page_tokens.encode(LEDGER, "accounts:receivable")
    for n in range(1, len(token)):
        assert "altered" in _refused(LEDGER, token[:n]).description, n


@pytest.mark.parametrize(
    "garbage",
    ["not a token", "!!!!", "AAAA", "é", "=", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "cash", "Y2FzaA"],
)
def test_a_garbage_token_is_refused(garbage: str) -> None:
    assert "altered" in _refused(LEDGER, garbage).description


def test_a_checksummed_body_without_its_separator_is_refused() -> None:
    """The checksum is not a secret: a body it covers must still have the
    token's layout (version, ledger, NUL, account)."""
    body = b"\x01" + LEDGER.encode() + b"cash"  # no NUL
    forged = base64.urlsafe_b64encode(page_tokens._check(body) + body).decode().rstrip("=")

    assert "altered" in _refused(LEDGER, forged).description


@pytest.mark.parametrize("other", ["other", "book", "books2", "BOOKS"])
def test_another_ledgers_token_is_refused(other: str) -> None:
    token = page_tokens.encode(LEDGER, "cash")

    assert _refused(other, token).description == "belongs to another ledger's listing"
    assert page_tokens.decode(LEDGER, token) == "cash"


def test_refusals_take_the_entries_in_order_each_refused_one_moving_nothing() -> None:
    from ledger_service.domain.balances import refusals
    from ledger_service.domain.entries import NewEntry

    def post(key: str, debit: str, credit: str, amount: int) -> NewEntry:
        return NewEntry("l", key, debit, credit, amount, "USD")

    limited = {
        ("a", "USD"): (0, 0, Limits(max_net_credit=10)),
        ("z", "USD"): (0, 0, Limits(max_net_debit=0)),
    }
    batch = [post("1", "z", "a", 5), post("2", "m", "a", 6), post("3", "m", "a", 5)]
    refused = refusals(batch, limited)
    assert sorted(refused) == [0, 2]  # without 0, 2 takes a to 11 after 1's 6
    assert (refused[0].account, refused[0].limit_name, refused[0].would_reach) == (
        "z",
        "max_net_debit",
        5,
    )
    assert (refused[2].account, refused[2].would_reach) == ("a", 11)
    assert refusals(batch, {}) == {}
