"""Low-balance alerts: ``wallet.low_balance`` once per crossing of an account's threshold.

An account has any number of thresholds (``billing alerts set ACCOUNT 10``). Each remembers
whether the balance is below it. Every transaction that moves a wallet's balance calls
``check`` (from ``billing.wallets.record_crossings``) under the wallet's row lock: a threshold
whose state flips is updated, and a flip to *below* writes one ``wallet.low_balance`` outbox row
(published after commit). A thousand requests debiting an account already below its threshold
publish nothing more; going back above re-arms it.

Where an auto top-up is configured the payload says so (``"auto_topup": true``) and the relay
asks for an immediate auto top-up check (``AutoTopupTrigger``) instead of waiting for the beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from billing.db import Queries, fetch_dicts
from billing.errors import BillingError
from billing.ledger import require_account
from billing.money import exact, format_usd

if TYPE_CHECKING:
    from billing.ledger import WalletChange

LOW_BALANCE = "wallet.low_balance"


def check(conn: psycopg.Connection[Any], q: Queries, changes: Iterable[WalletChange]) -> int:
    """Flip the thresholds the new balances crossed; one outbox row per crossing downwards."""
    changed = sorted(changes, key=lambda c: c.account_id)
    if not changed:
        return 0
    flipped = conn.execute(
        q["flip_balance_alerts"],
        {"accounts": [c.account_id for c in changed], "balances": [c.balance for c in changed]},
    ).fetchall()
    return publish_crossings(conn, q, [(r[0], r[1], r[3], r[4]) for r in flipped if r[2]])


def publish_crossings(
    conn: psycopg.Connection[Any], q: Queries, down: Sequence[tuple[str, Any, Any, bool]]
) -> int:
    """Outbox rows for thresholds crossed downwards: (account, threshold, balance, auto top-up).

    The usage batch flips thresholds inside its spend-controls statement and calls this with
    what crossed (amounts as exact decimal text there).
    """
    if not down:
        return 0
    conn.execute(
        q["insert_outbox"],
        {
            "routing_keys": [LOW_BALANCE] * len(down),
            "payloads": [
                Jsonb(
                    {
                        "type": LOW_BALANCE,
                        "account_id": account_id,
                        "threshold": format_usd(Decimal(threshold)),
                        "balance": format_usd(Decimal(balance)),
                        "currency": "USD",
                        "auto_topup": auto_topup,
                    }
                )
                for account_id, threshold, balance, auto_topup in down
            ],
        },
    )
    return len(down)


def set_alert(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, threshold: Decimal, actor: str
) -> None:
    value = exact(threshold)
    if value <= 0:
        raise BillingError("a threshold must be positive")
    with conn.transaction():
        require_account(conn, q, account_id)
        conn.execute(
            q["set_balance_alert"], {"account_id": account_id, "threshold": value, "actor": actor}
        )


def remove_alert(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, threshold: Decimal
) -> None:
    with conn.transaction():
        found = conn.execute(
            q["remove_balance_alert"], {"account_id": account_id, "threshold": exact(threshold)}
        ).fetchone()
    if found is None:
        raise BillingError(f"{account_id} has no alert at {threshold}")


def list_alerts(
    conn: psycopg.Connection[Any], q: Queries, account_id: str | None = None
) -> list[dict[str, Any]]:
    return fetch_dicts(conn, q["list_balance_alerts"], {"account_id": account_id})


class AutoTopupTrigger:
    """A ``wallets.Publish`` that forwards every message, and calls ``trigger`` after publishing
    a low-balance alert of an account with auto top-up (the worker passes a task dispatch)."""

    def __init__(
        self, publish: Callable[[str, bytes, str], None], trigger: Callable[[], object]
    ) -> None:
        self.publish = publish
        self.trigger = trigger

    def __call__(self, routing_key: str, body: bytes, message_id: str) -> None:
        self.publish(routing_key, body, message_id)
        if routing_key == LOW_BALANCE and orjson.loads(body).get("auto_topup"):
            self.trigger()
