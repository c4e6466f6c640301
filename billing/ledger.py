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

from billing.db import Queries, text_array
from billing.errors import BillingError, UnknownAccount
from billing.money import EXACT, is_exact_at_scale, sum_exact


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


_STATES = {s.value: s for s in WalletState}  # the database's text -> WalletState, without a call


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
    """Move ``wallet_deltas`` (positive credits, negative debits) against one system account."""
    return post_movement(
        conn,
        q,
        posting_id=posting_id,
        kind=kind.value,
        wallet_deltas=wallet_deltas,
        system_deltas={counterparty.value: EXACT.minus(sum_exact(wallet_deltas.values()))},
        reference=reference,
        memo=memo,
        actor=actor,
    )


def post_movement(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    posting_id: int,
    kind: str,
    wallet_deltas: Mapping[str, Decimal],
    system_deltas: Mapping[str, Decimal],
    reference: str | None = None,
    memo: str | None = None,
    actor: str | None = None,
) -> list[WalletChange]:
    """One balanced posting: wallet deltas and system-account deltas (by code) summing to zero.

    Call inside a transaction. The posting and all its entries are written first, in one
    statement (the balance trigger checks them together): they need only each wallet's ledger
    account, which never changes. Then one statement locks the wallet rows in account order (the
    global lock order that keeps parallel workers deadlock-free) and updates their balances
    (``billing_debit_wallets``, migration 0009). The locks are held until the commit, so the
    caller should do there only what needs them: another worker debiting the same hot wallet
    waits that long. Returns each wallet's state change.
    """
    wallets = {a: v for a, v in wallet_deltas.items() if v != 0}
    systems = {c: v for c, v in system_deltas.items() if v != 0}
    # The database keeps 12 decimals: a finer delta would be rounded there, and the state a
    # wallet moved from (its new balance minus its delta) would be off.
    if not all(is_exact_at_scale(v) for v in (*wallets.values(), *systems.values())):
        raise BillingError(f"posting {posting_id} ({kind}) has an amount finer than 1E-12")
    if sum_exact([*wallets.values(), *systems.values()]) != 0:
        raise BillingError(f"posting {posting_id} ({kind}) does not balance")
    if not wallets and not systems:
        return []
    conn.execute(
        q["insert_posting"],
        {
            "posting_id": posting_id,
            "kind": kind,
            "reference": reference,
            "memo": memo,
            "actor": actor,
        },
    )
    accounts = sorted(wallets)
    accounts_text = text_array(accounts)
    amounts_text = text_array([wallets[a] for a in accounts])
    codes = sorted(systems)
    conn.execute(
        q["insert_entries"],
        {
            "posting_id": posting_id,
            "accounts": accounts_text,
            "amounts": amounts_text,
            "system_accounts": text_array([system_account_id_by_code(conn, q, c) for c in codes]),
            "system_amounts": text_array([systems[c] for c in codes]),
        },
    )
    if not accounts:
        return []
    # The wallet locks, from here to the commit.
    changes = [
        WalletChange(account, _STATES[old_state], _STATES[state], balance)
        for account, balance, state, old_state in conn.execute(
            q["debit_wallets"], {"accounts": accounts_text, "amounts": amounts_text}
        )
    ]
    if len(changes) != len(accounts):  # a wallet row gone since the entries found it
        raise BillingError(f"posting {posting_id} ({kind}): a wallet row is missing")
    return changes


def require_account(conn: psycopg.Connection[Any], q: Queries, account_id: str) -> None:
    """Raise ``UnknownAccount`` unless ``account_id`` exists (accounts are never deleted)."""
    if conn.execute(q["known_accounts"], {"accounts": [account_id]}).fetchone() is None:
        raise UnknownAccount(f"no account {account_id!r}")


def system_account_id_by_code(conn: psycopg.Connection[Any], q: Queries, code: str) -> int:
    """The ledger account id of a platform account added by a later migration (by its code)."""
    row = conn.execute(q["ledger_account_id"], {"code": code}).fetchone()
    if row is None:
        raise BillingError(f"ledger account {code!r} is missing: run `billing migrate`")
    return int(row[0])
