"""The double-entry, append-only ledger.

A *posting* is one money movement; its *entries* move amounts between ledger accounts and sum to
zero (the database checks this per statement and refuses UPDATE, DELETE and TRUNCATE on both
tables). Customer wallets are ledger accounts whose running balance is also kept on ``wallets``,
updated in the same transaction as the entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import psycopg

from billing.db import Queries
from billing.errors import BillingError
from billing.money import sum_exact


class PostingKind(StrEnum):
    USAGE = "usage"
    ADJUSTMENT = "adjustment"


class SystemAccount(StrEnum):
    """The platform's own ledger accounts (seeded by the first migration)."""

    USAGE_REVENUE = "revenue:usage"
    ADJUSTMENTS = "equity:adjustments"


class WalletState(StrEnum):
    ACTIVE = "active"  # balance > 0: the gateway may serve
    EXHAUSTED = "exhausted"  # balance <= 0: the gateway answers 402 insufficient_credits


@dataclass(frozen=True)
class WalletChange:
    account_id: str
    old_state: WalletState
    new_state: WalletState
    balance: Decimal

    @property
    def crossed(self) -> bool:
        return self.old_state is not self.new_state


def next_posting_id(conn: psycopg.Connection[Any], q: Queries) -> int:
    row = conn.execute(q["next_posting_id"]).fetchone()
    assert row is not None
    return int(row[0])


def system_account_id(conn: psycopg.Connection[Any], q: Queries, code: SystemAccount) -> int:
    row = conn.execute(q["ledger_account_id"], {"code": code.value}).fetchone()
    if row is None:
        raise BillingError(f"ledger account {code.value!r} is missing: run `billing migrate`")
    return int(row[0])


def post_wallet_movement(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    posting_id: int,
    kind: PostingKind,
    wallet_deltas: Mapping[str, Decimal],
    counterparty: SystemAccount,
    reference: str | None = None,
    memo: str | None = None,
    actor: str | None = None,
) -> list[WalletChange]:
    """Move ``wallet_deltas`` (positive credits, negative debits) against one system account.

    Call inside a transaction. Wallet rows are locked in account order, balances updated, and the
    balanced entries written in one statement. Returns each wallet's state change.
    """
    deltas = {account: amount for account, amount in wallet_deltas.items() if amount != 0}
    if not deltas:
        return []
    accounts = sorted(deltas)
    conn.execute(
        q["insert_posting"],
        {
            "posting_id": posting_id,
            "kind": kind.value,
            "reference": reference,
            "memo": memo,
            "actor": actor,
        },
    )
    locked = {row[0]: row for row in conn.execute(q["lock_wallets"], {"accounts": accounts})}
    missing = [a for a in accounts if a not in locked]
    if missing:
        raise BillingError(f"no wallet for account(s) {', '.join(missing)}")
    amounts = [deltas[a] for a in accounts]
    updated = {
        account: (balance, state)
        for account, balance, state in conn.execute(
            q["update_wallet_balances"], {"accounts": accounts, "amounts": amounts}
        )
    }
    counter_id = system_account_id(conn, q, counterparty)
    total = sum_exact(amounts)
    conn.execute(
        q["insert_entries"],
        {
            "posting_id": posting_id,
            "ledger_accounts": [locked[a][1] for a in accounts] + [counter_id],
            "amounts": [*amounts, -total],
        },
    )
    return [
        WalletChange(
            account_id=a,
            old_state=WalletState(locked[a][3]),
            new_state=WalletState(updated[a][1]),
            balance=updated[a][0],
        )
        for a in accounts
    ]
