"""The wallet step of a posting (``debit_wallets``: one UPDATE in account order, 0009).

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
import pytest

from billing import db
from billing.db import Queries, text_array
from billing.errors import BillingError
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


def _wallets_in_bulk(conn: psycopg.Connection[Any], q: Queries, n: int) -> list[str]:
    """``n`` accounts with empty wallets, inserted set-wise (open_account is one by one)."""
    rows = conn.execute(q["empty_wallets_in_bulk"], {"prefix": "bulk-", "n": n}).fetchall()
    conn.execute("ANALYZE wallets")
    return sorted(r[0] for r in rows)


def test_the_debit_finds_each_wallet_by_its_key_in_account_order(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Migration 0009: one UPDATE takes the wallet locks, so it must visit the wallets in account
    order (the lock order) and by primary key, never by a scan of every wallet (a cost that grew
    with the accounts), whatever the statistics say. The control: the same UPDATE without the
    function's settings scans the table when the batch is a fifth of it."""
    accounts = _wallets_in_bulk(conn, q, 2_000)[::5]
    body, config = conn.execute(
        "SELECT prosrc, proconfig FROM pg_proc WHERE proname = 'billing_debit_wallets'"
    ).fetchone()  # type: ignore[misc]
    assert config, "billing_debit_wallets lost its planner settings"
    update = body.replace("p_accounts", "%(accounts)s").replace("p_amounts", "%(amounts)s")
    params = {"accounts": text_array(accounts), "amounts": text_array(["-1"] * len(accounts))}

    def plan(settings: list[str]) -> str:
        with conn.transaction(force_rollback=True):
            for setting in settings:
                name, value = setting.split("=")
                conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            rows = conn.execute(f"EXPLAIN {update}", params).fetchall()  # type: ignore[arg-type]
        return "\n".join(r[0] for r in rows)

    pinned = plan(config)
    lines = pinned.splitlines()
    loop = next(line for line in lines if line.lstrip().startswith("->  Nested Loop"))
    depth = len(loop) - len(loop.lstrip()) + 6  # the loop's two children, outer first
    children = [
        line.strip() for line in lines if line.startswith(" " * depth + "->") and line[depth] == "-"
    ]
    assert len(children) == 2, pinned
    assert children[0].startswith("->  Subquery Scan on d"), pinned  # the input, sorted:
    assert "Sort Key: u.account_id" in pinned, pinned
    assert children[1].startswith("->  Index Scan using wallets_pkey on wallets w"), pinned
    assert "Seq Scan" not in pinned, pinned
    assert "Seq Scan on wallets" in plan([]), "the control: the planner's own choice"


def test_the_debit_as_it_runs_probes_each_wallet_by_its_key(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """The function itself, as it runs (planned without the batch's values): this
    transaction's scans of wallets, counted. On a small table a batch of every wallet is where the
    planner, left alone, reads the table in its physical order (checked: without the function's
    settings this test fails), which is not the lock order."""
    accounts = _wallets_in_bulk(conn, q, 50)
    params = {"accounts": text_array(accounts), "amounts": text_array(["-1"] * len(accounts))}
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'wallets'"
    with conn.transaction(force_rollback=True):
        before = conn.execute(scans).fetchone()
        rows = conn.execute(
            "SELECT account_id FROM billing_debit_wallets(%(accounts)s, %(amounts)s)", params
        ).fetchall()
        after = conn.execute(scans).fetchone()
    assert [r[0] for r in rows] == accounts  # updated (and locked) in account order
    assert before is not None and after is not None
    assert after[0] == before[0], "the debit scanned the wallets table"
    assert after[1] - before[1] == len(accounts)  # one primary-key probe per wallet


def test_a_wallet_movement_of_an_account_without_a_wallet_fails_by_name(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "5")
    conn.execute("INSERT INTO accounts (account_id) VALUES ('ghost')")  # no wallet: not via code
    with (
        pytest.raises(psycopg.errors.ForeignKeyViolation, match="no wallet for account ghost"),
        conn.transaction(),
    ):
        debit(conn, q, {"acme": "1", "ghost": "1"})
    assert conn.execute("SELECT balance FROM wallets WHERE account_id = 'acme'").fetchone() == (
        Decimal(5),
    )
    assert_audit_clean(conn, q)


def test_a_credit_that_replenishes_reports_the_state_it_moved_from(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "1")
    with conn.transaction():
        debit(conn, q, {"acme": "3"})  # -2: exhausted
    with conn.transaction():
        [change] = debit(conn, q, {"acme": "-2"})  # +2: exactly 0, still exhausted
    assert (change.old_state, change.new_state, change.balance) == (
        WalletState.EXHAUSTED,
        WalletState.EXHAUSTED,
        Decimal(0),
    )
    with conn.transaction():
        [change] = debit(conn, q, {"acme": "-0.000000000001"})
    assert (change.old_state, change.new_state, change.crossed) == (
        WalletState.EXHAUSTED,
        WalletState.ACTIVE,
        True,
    )
    assert_audit_clean(conn, q)


def test_a_delta_finer_than_the_ledgers_scale_is_refused_before_anything_is_written(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """The database keeps 12 decimals: a finer delta would be rounded there (and the state the
    wallet moved from, derived from the new balance and the delta, could be wrong)."""
    open_account(conn, q, "acme", "1")
    with pytest.raises(BillingError, match="finer than 1E-12"), conn.transaction():
        debit(conn, q, {"acme": "0.0000000000004"})
    assert conn.execute("SELECT balance FROM wallets").fetchone() == (Decimal(1),)
    assert_audit_clean(conn, q)
