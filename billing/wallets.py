"""Accounts and their prepaid USD wallets: create, show, adjust, and tell the gateway.

When a wallet's balance crosses zero the gateway must know, so it can answer 402
``insufficient_credits``: the transaction that moved the money also writes an outbox row
(``wallet.exhausted`` or ``wallet.replenished``), and ``relay_outbox`` publishes pending rows after
commit. A crossing is published once; a crash between publish and marking may repeat it, so each
message carries its ``outbox_id`` for the subscriber to de-duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from billing import alerts
from billing.db import Queries, fetch_dicts
from billing.errors import AccountExists, BillingError, UnknownAccount
from billing.ledger import (
    PostingKind,
    SystemAccount,
    WalletChange,
    WalletState,
    next_posting_id,
    post_wallet_movement,
    require_account,
)
from billing.money import exact, format_usd

EXHAUSTED = "wallet.exhausted"
REPLENISHED = "wallet.replenished"


def create_account(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, name: str | None = None
) -> None:
    """Create an account with an empty wallet, in one transaction."""
    if not account_id or len(account_id) > 200 or not account_id.isprintable() or " " in account_id:
        raise BillingError("account_id must be 1-200 printable characters without spaces")
    with conn.transaction():
        if (
            conn.execute(q["insert_account"], {"account_id": account_id, "name": name}).fetchone()
            is None
        ):
            raise AccountExists(f"account {account_id!r} already exists")
        row = conn.execute(q["insert_ledger_account"], {"code": f"wallet:{account_id}"}).fetchone()
        assert row is not None
        conn.execute(q["insert_wallet"], {"account_id": account_id, "ledger_account_id": row[0]})


@dataclass(frozen=True)
class WalletView:
    account_id: str
    currency: str
    balance: Decimal
    state: WalletState
    updated_at: datetime
    ledger_sum: Decimal
    events: int
    debited: Decimal
    byok_notional: Decimal

    def as_json(self) -> dict[str, Any]:
        """Amounts as exact decimal strings, never floats."""
        return {
            "account_id": self.account_id,
            "currency": self.currency,
            "balance": format_usd(self.balance),
            "state": self.state.value,
            "updated_at": self.updated_at.isoformat(),
            "ledger_sum": format_usd(self.ledger_sum),
            "usage_events": self.events,
            "usage_debited": format_usd(self.debited),
            "byok_notional_cost": format_usd(self.byok_notional),
        }


def show(conn: psycopg.Connection[Any], q: Queries, account_id: str) -> WalletView:
    rows = fetch_dicts(conn, q["wallet_show"], {"account_id": account_id})
    if not rows:
        raise UnknownAccount(f"no account {account_id!r}")
    row = rows[0]
    return WalletView(**{**row, "state": WalletState(row["state"]), "events": int(row["events"])})


def adjust(
    conn: psycopg.Connection[Any],
    q: Queries,
    account_id: str,
    amount: Decimal | str,
    *,
    reason: str,
    actor: str,
    reference: str | None = None,
) -> int:
    """An admin credit (positive) or debit (negative) with a reason and an actor.

    With a ``reference``, a repeated call is a no-op returning the first posting's id.
    """
    value = exact(amount)
    if value == 0:
        raise BillingError("amount must not be zero")
    if not reason.strip():
        raise BillingError("an adjustment needs a reason")
    with conn.transaction():
        if reference is not None:
            found = conn.execute(
                q["find_posting_by_reference"],
                {"kind": PostingKind.ADJUSTMENT.value, "reference": reference},
            ).fetchone()
            if found is not None:
                return int(found[0])
        require_account(conn, q, account_id)
        posting_id = next_posting_id(conn, q)
        changes = post_wallet_movement(
            conn,
            q,
            posting_id=posting_id,
            kind=PostingKind.ADJUSTMENT,
            wallet_deltas={account_id: value},
            counterparty=SystemAccount.ADJUSTMENTS,
            reference=reference,
            memo=reason,
            actor=actor,
        )
        record_crossings(conn, q, changes)
    return posting_id


def record_crossings(
    conn: psycopg.Connection[Any],
    q: Queries,
    changes: Iterable[WalletChange],
    *,
    check_alerts: bool = True,
) -> int:
    """Write an outbox row for each wallet whose state changed. Call inside the transaction.

    Also checks the wallets' low-balance alert thresholds (``billing.alerts``, issue 9), unless
    the caller does it itself (the usage batch, in its spend-controls statement).
    """
    changes = list(changes)
    if check_alerts:
        alerts.check(conn, q, changes)
    crossed = [c for c in changes if c.crossed]
    if not crossed:
        return 0
    keys = [EXHAUSTED if c.new_state is WalletState.EXHAUSTED else REPLENISHED for c in crossed]
    payloads = [
        Jsonb(
            {
                "type": key,
                "account_id": c.account_id,
                "state": c.new_state.value,
                "balance": format_usd(c.balance),
                "currency": "USD",
            }
        )
        for key, c in zip(keys, crossed, strict=True)
    ]
    conn.execute(q["insert_outbox"], {"routing_keys": keys, "payloads": payloads})
    return len(crossed)


Publish = Callable[[str, bytes, str], None]
"""publish(routing_key, body, message_id): must return only once the broker has confirmed."""


def relay_outbox(
    conn: psycopg.Connection[Any], q: Queries, publish: Publish, limit: int = 500
) -> int:
    """Publish pending outbox rows (after the transactions that wrote them committed)."""
    sent = 0
    while True:
        with conn.transaction():
            rows = conn.execute(q["claim_outbox"], {"limit": limit}).fetchall()
            for outbox_id, routing_key, payload in rows:
                body = orjson.dumps({**payload, "outbox_id": outbox_id})
                publish(routing_key, body, f"outbox-{outbox_id}")
            if rows:
                conn.execute(q["mark_outbox_published"], {"ids": [r[0] for r in rows]})
        sent += len(rows)
        if len(rows) < limit:
            return sent
