"""What a batch of entries does to its accounts: the sums it adds, each
account's totals right after each entry (the balances a write returns, and
the history as-of reads use), and where a balance limit would be crossed.

Pure arithmetic on the batch; the database supplies the totals before it
(or after it) under the account rows' locks, so the results are exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .entries import Balance, NewEntry
from .limits import INT64_MAX

# (account, asset)
Key = tuple[str, str]


class SumOutOfRange(Exception):
    """What a batch adds to one account passes int64 by itself."""


@dataclass(frozen=True, slots=True)
class Limits:
    """An account's balance limits in one asset; None: no limit."""

    max_net_debit: int | None = None
    max_net_credit: int | None = None

    def breach(self, debits: int, credits: int) -> tuple[str, int, int] | None:
        """(limit name, limit, value reached) if these totals break a limit."""
        net = debits - credits
        if self.max_net_debit is not None and net > self.max_net_debit:
            return "max_net_debit", self.max_net_debit, net
        if self.max_net_credit is not None and -net > self.max_net_credit:
            return "max_net_credit", self.max_net_credit, -net
        return None


@dataclass(frozen=True, slots=True)
class Breach:
    """The first entry of a batch that would take an account beyond a limit."""

    index: int
    account: str
    asset: str
    limit_name: str  # "max_net_debit" or "max_net_credit"
    limit: int
    would_reach: int  # the bounded value (net debit or net credit) it would reach


class Movements:
    """A batch's effect on its accounts, from one backward pass over it.

    `totals`: (account, asset, debits, credits) the batch adds, one per
    (account, asset), sorted (the order rows are locked in, so concurrent
    writers cannot deadlock). `rows`: one per (entry, account, asset) the
    entry touches: (entry index, account, asset, debits and credits the
    batch adds *after* that entry); the totals right after the entry are the
    totals after the batch minus those. Raises SumOutOfRange when a sum
    alone passes int64."""

    __slots__ = (
        "_sums",
        "accounts",
        "assets",
        "index",
        "later_credits",
        "later_debits",
        "size",
        "totals",
    )

    def __init__(self, batch: Sequence[NewEntry]) -> None:
        later: dict[Key, list[int]] = {}
        index: list[int] = []
        accounts: list[str] = []
        assets: list[str] = []
        later_debits: list[int] = []
        later_credits: list[int] = []
        for k in range(len(batch) - 1, -1, -1):
            entry = batch[k]
            moved: Sequence[tuple[Key, int, int]]
            if entry.postings:
                moved = _net_of(entry)
            else:
                moved = (
                    ((entry.debit_account, entry.asset), entry.amount, 0),
                    ((entry.credit_account, entry.asset), 0, entry.amount),
                )
            for key, debit, credit in moved:
                sums = later.get(key)
                if sums is None:
                    sums = later[key] = [0, 0]
                index.append(k)
                accounts.append(key[0])
                assets.append(key[1])
                later_debits.append(sums[0])
                later_credits.append(sums[1])
                sums[0] += debit
                sums[1] += credit
        self.size = len(batch)
        self.index = index
        self.accounts = accounts
        self.assets = assets
        self.later_debits = later_debits
        self.later_credits = later_credits
        self._sums = later
        self.totals = [(a, s, d, c) for (a, s), (d, c) in sorted(later.items())]
        if any(d > INT64_MAX or c > INT64_MAX for _, _, d, c in self.totals):
            raise SumOutOfRange()

    def sums(self, key: Key) -> tuple[int, int]:
        debits, credits = self._sums[key]
        return debits, credits

    def rows(self) -> Iterator[tuple[int, str, str, int, int]]:
        """The rows: (entry index, account, asset, debits and credits the
        batch adds after that entry), last entry first."""
        return zip(
            self.index,
            self.accounts,
            self.assets,
            self.later_debits,
            self.later_credits,
            strict=True,
        )

    def swings(self) -> list[tuple[str, str, int, int]]:
        """(account, asset, lowest, highest) of debits - credits added after
        an entry, for the accounts the batch both debits and credits: there
        the balance may cross a limit between entries and come back by the
        end. (Elsewhere it moves one way, and the end is the extreme.)"""
        mixed = {key for key, (d, c) in self._sums.items() if d and c}
        if not mixed:
            return []
        low: dict[Key, int] = {}
        high: dict[Key, int] = {}
        for _, account, asset, d, c in self.rows():
            key = (account, asset)
            if key in mixed:
                net = d - c
                low[key] = min(low.get(key, net), net)
                high[key] = max(high.get(key, net), net)
        return [(a, s, low[(a, s)], high[(a, s)]) for a, s in sorted(mixed)]

    def balances(self, after: dict[Key, tuple[int, int]]) -> list[tuple[Balance, ...]]:
        """Per entry, in batch order: its accounts' totals right after it,
        by (account, asset), from `after` (the totals after the whole batch)."""
        out: list[list[Balance]] = [[] for _ in range(self.size)]
        for k, account, asset, d, c in self.rows():
            debits, credits = after[(account, asset)]
            out[k].append(Balance(account, asset, debits - d, credits - c))
        # (account, asset) is unique within an entry, so tuple order is theirs.
        return [(b[0], b[1]) if len(b) == 2 and b[0] < b[1] else tuple(sorted(b)) for b in out]

    def first_breach(self, key: Key, before: tuple[int, int], limits: Limits) -> Breach | None:
        """The first entry after which (account, asset) `key`, holding
        `before` (debits, credits) before the batch, would break `limits`."""
        added_d, added_c = self.sums(key)
        rows = [(k, d, c) for k, account, asset, d, c in self.rows() if (account, asset) == key]
        for k, d, c in sorted(rows):
            broken = limits.breach(before[0] + added_d - d, before[1] + added_c - c)
            if broken is not None:
                name, limit, reached = broken
                return Breach(k, key[0], key[1], name, limit, reached)
        return None


def refusals(
    batch: Sequence[NewEntry], accounts: dict[Key, tuple[int, int, Limits]]
) -> dict[int, Breach]:
    """The entries of `batch` refused by the limits of `accounts` ((debits,
    credits, limits) before the batch), taking the entries in order as if
    each arrived alone: an entry that would cross a limit is refused and
    moves nothing, so the entries after it see the totals without it. By
    entry index; the first is where an atomic batch fails."""
    running = {key: [d, c] for key, (d, c, _) in accounts.items()}
    refused: dict[int, Breach] = {}
    for k, entry in enumerate(batch):
        if entry.postings:
            moved: Sequence[tuple[Key, int, int]] = _net_of(entry)
        else:
            moved = (
                ((entry.debit_account, entry.asset), entry.amount, 0),
                ((entry.credit_account, entry.asset), 0, entry.amount),
            )
        limited = [(key, d, c) for key, d, c in moved if key in running]
        for key, d, c in limited:
            totals = running[key]
            broken = accounts[key][2].breach(totals[0] + d, totals[1] + c)
            if broken is not None:
                name, limit, reached = broken
                refused[k] = Breach(k, key[0], key[1], name, limit, reached)
                break
        else:
            for key, d, c in limited:
                running[key][0] += d
                running[key][1] += c
    return refused


def _by_account(balance: Balance) -> Key:
    return balance.account, balance.asset


def _net_of(entry: NewEntry) -> list[tuple[Key, int, int]]:
    """A multi-posting entry's debits and credits per (account, asset)."""
    moved: dict[Key, list[int]] = {}
    for p in entry.postings:
        moved.setdefault((p.debit_account, p.asset), [0, 0])[0] += p.amount
        moved.setdefault((p.credit_account, p.asset), [0, 0])[1] += p.amount
    return [(key, d, c) for key, (d, c) in sorted(moved.items())]
