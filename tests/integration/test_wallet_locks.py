"""The wallet step of a posting (``lock_wallets``, then ``update_wallet_balances``).

A second transaction debiting a wallet another one holds waits, then starts from the committed
balance and state (no lost update, the old state it reports is the one it moved from), and two
transactions locking overlapping wallets never deadlock.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import psycopg

from billing import db
from billing.db import Queries
from billing.ledger import (
    PostingKind,
    SystemAccount,
    WalletChange,
    WalletState,
    next_posting_id,
    post_wallet_movement,
)
from billing.settings import Settings

from .helpers import assert_audit_clean, open_account


def debit(conn: psycopg.Connection[Any], q: Queries, amounts: dict[str, str]) -> list[WalletChange]:
    return post_wallet_movement(
        conn,
        q,
        posting_id=next_posting_id(conn, q),
        kind=PostingKind.ADJUSTMENT,
        wallet_deltas={a: -Decimal(v) for a, v in amounts.items()},
        counterparty=SystemAccount.ADJUSTMENTS,
    )


def test_a_waiting_debit_starts_from_the_balance_committed_meanwhile(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "5")
    open_account(conn, q, "beta", "5")
    seen: list[list[WalletChange]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with db.connect(settings) as c2, c2.transaction():
                seen.append(debit(c2, q, {"acme": "2", "beta": "1"}))
        except BaseException as exc:
            errors.append(exc)

    with db.connect(settings) as c1:
        with c1.transaction():
            first = debit(c1, q, {"acme": "6"})  # exhausts acme, holds its lock
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.5)
            assert not seen  # waiting for acme's lock
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).fetchone()
            assert waiting == (1,)
        thread.join(timeout=10)
    assert not errors, errors
    assert [(c.account_id, c.old_state, c.new_state, c.balance) for c in first] == [
        ("acme", WalletState.ACTIVE, WalletState.EXHAUSTED, Decimal(-1))
    ]
    [changes] = seen
    assert [(c.account_id, c.old_state, c.new_state, c.balance) for c in changes] == [
        ("acme", WalletState.EXHAUSTED, WalletState.EXHAUSTED, Decimal(-3)),
        ("beta", WalletState.ACTIVE, WalletState.ACTIVE, Decimal(4)),
    ]
    balances = dict(conn.execute("SELECT account_id, balance FROM wallets ORDER BY 1").fetchall())
    assert balances == {"acme": Decimal(-3), "beta": Decimal(4)}
    assert_audit_clean(conn, q)


def test_overlapping_debits_in_any_order_never_deadlock(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    accounts = [f"acct-{i:02d}" for i in range(20)]
    for a in accounts:
        open_account(conn, q, a, "100")
    errors: list[BaseException] = []

    def run(order: list[str]) -> None:
        try:
            with db.connect(settings) as c:
                for _ in range(30):
                    with c.transaction():
                        debit(c, q, dict.fromkeys(order, "0.01"))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(order,))
        for order in (accounts, accounts[::-1], accounts[::2] + accounts[1::2])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    balances = dict(conn.execute("SELECT account_id, balance FROM wallets").fetchall())
    assert balances == dict.fromkeys(accounts, Decimal("99.10"))  # 3 x 30 x 0.01 each
    assert_audit_clean(conn, q)
