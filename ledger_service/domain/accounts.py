"""Account totals as GetAccount reads them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AssetTotals:
    asset: str
    debits: int
    credits: int
    max_net_debit: int | None = None
    max_net_credit: int | None = None

    @property
    def balance(self) -> int:
        return self.debits - self.credits


@dataclass(frozen=True)
class AccountView:
    ledger: str
    account: str
    balances: list[AssetTotals]
    as_of_sequence: int
