"""Credit grants: promotional or free credit with an expiry, kept apart from paid credit.

* ``grant_credit`` credits the wallet in one balanced posting (kind ``grant``: wallet +amount,
  ``equity:grants`` -amount) and records the grant. With a ``grant_id`` a repeat is a no-op.
* Usage consumes the credit that expires first: granted credit (earliest expiry first) before
  paid credit, which never expires. The usage batch records it in the same transaction
  (``billing.spend_controls.after_debit``, table ``grant_consumptions``).
* ``expire_grants`` (the beat task, or ``billing grants expire``) moves what a lapsed grant has
  left back to ``equity:grants`` in a ``grant_expiry`` posting, exactly once: the account's
  wallet row is locked first and the grants are closed in the same transaction, so a second
  scheduler running at the same moment finds nothing left to close.
* Refunds, disputes and admin debits take back paid credit only; they never touch a grant.
  So ``paid = balance - granted remaining`` (negative when a refund took back credit already
  spent).
* ``set_schedule`` makes a recurring grant ("$5 every 30 days, valid 30 days");
  ``issue_due_grants`` (same beat task) issues each due one once (grant id ``schedule:N``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts, text_array
from billing.errors import BillingError, UnknownAccount
from billing.ledger import WalletChange, next_posting_id, post_movement, require_account
from billing.money import EXACT, ZERO, exact, format_usd, sum_exact
from billing.wallets import record_crossings

log = logging.getLogger("billing.grants")

GRANTS_EQUITY = "equity:grants"
GRANT = "grant"
GRANT_EXPIRY = "grant_expiry"


def grant_credit(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    account_id: str,
    amount: Decimal,
    expires_at: datetime,
    reason: str,
    actor: str,
    now: datetime,
    grant_id: str | None = None,
    schedule_id: str | None = None,
) -> str:
    """Credit ``amount`` of granted credit expiring at ``expires_at``; returns the grant id."""
    value = exact(amount)
    if value <= 0:
        raise BillingError("a grant must be positive")
    if expires_at <= now:
        raise BillingError("a grant must expire in the future")
    if not reason.strip():
        raise BillingError("a grant needs a reason")
    with conn.transaction():
        if grant_id is not None:
            found = conn.execute(q["find_grant"], {"grant_id": grant_id}).fetchone()
            if found is not None:
                if found[1] != account_id or found[2] != value:
                    raise BillingError(f"grant {grant_id!r} exists with other terms")
                return grant_id
        require_account(conn, q, account_id)
        posting_id = next_posting_id(conn, q)
        gid = grant_id or f"grant-{posting_id}"
        changes = post_movement(
            conn,
            q,
            posting_id=posting_id,
            kind=GRANT,
            wallet_deltas={account_id: value},
            system_deltas={GRANTS_EQUITY: EXACT.minus(value)},
            reference=f"grant:{gid}",
            memo=reason,
            actor=actor,
        )
        conn.execute(
            q["insert_grant"],
            {
                "grant_id": gid,
                "account_id": account_id,
                "amount": value,
                "granted_at": now,
                "expires_at": expires_at,
                "reason": reason,
                "actor": actor,
                "schedule_id": schedule_id,
                "posting_id": posting_id,
            },
        )
        record_crossings(conn, q, changes)
    return gid


def expire_grants(
    conn: psycopg.Connection[Any], q: Queries, now: datetime, limit: int = 500
) -> Decimal:
    """Close every grant lapsed at ``now``; returns the credit expired. Safe run concurrently."""
    total = ZERO
    while True:
        accounts = [
            r[0] for r in conn.execute(q["lapsed_grant_accounts"], {"now": now, "limit": limit})
        ]
        for account_id in accounts:
            total = EXACT.add(total, _expire_account(conn, q, account_id, now))
        if len(accounts) < limit:
            return total


def _expire_account(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, now: datetime
) -> Decimal:
    with conn.transaction():
        # The wallet lock first (the order every writer uses), then the grants: a usage batch
        # consuming these grants holds the same lock, and a second scheduler waits here, then
        # finds the grants closed.
        conn.execute(q["lock_wallets"], {"accounts": text_array([account_id])}).fetchall()
        posting_id = next_posting_id(conn, q)
        closed = conn.execute(
            q["expire_account_grants"],
            {"account_id": account_id, "now": now, "posting_id": posting_id},
        ).fetchall()
        expired = sum_exact(r[1] for r in closed)
        if expired == 0:
            return ZERO
        changes: list[WalletChange] = post_movement(
            conn,
            q,
            posting_id=posting_id,
            kind=GRANT_EXPIRY,
            wallet_deltas={account_id: EXACT.minus(expired)},
            system_deltas={GRANTS_EQUITY: expired},
            reference=f"grant-expiry:{posting_id}",
            memo="expired: " + ", ".join(sorted(r[0] for r in closed if r[1] > 0)),
            actor="billing",
        )
        record_crossings(conn, q, changes)
        return expired


def set_schedule(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    schedule_id: str,
    account_id: str,
    amount: Decimal,
    every: timedelta,
    valid_for: timedelta,
    reason: str,
    first_at: datetime,
    actor: str,
) -> None:
    """A recurring grant: ``amount`` every ``every`` from ``first_at``, each valid ``valid_for``."""
    with conn.transaction():
        require_account(conn, q, account_id)
        try:
            row = conn.execute(
                q["upsert_grant_schedule"],
                {
                    "schedule_id": schedule_id,
                    "account_id": account_id,
                    "amount": exact(amount),
                    "every": every,
                    "valid_for": valid_for,
                    "reason": reason,
                    "next_at": first_at,
                    "actor": actor,
                },
            ).fetchone()
        except psycopg.errors.CheckViolation as exc:
            raise BillingError(str(exc).splitlines()[0]) from None
        if row is None:
            raise BillingError(f"schedule {schedule_id!r} belongs to another account")


def issue_due_grants(conn: psycopg.Connection[Any], q: Queries, now: datetime) -> int:
    """Issue every scheduled grant due at ``now`` (catching up missed periods); returns how many.

    Each is claimed with SKIP LOCKED and issued with a deterministic id, so two schedulers never
    issue one twice.
    """
    issued = 0
    while True:
        with conn.transaction():
            rows = fetch_dicts(conn, q["claim_due_schedule"], {"now": now})
            if not rows:
                return issued
            s = rows[0]
            grant_id = f"{s['schedule_id']}:{s['issued'] + 1}"
            if s["next_at"] + s["valid_for"] <= now:
                # a period missed entirely (the scheduler was down past its validity): its grant
                # would be credited already lapsed and expired at once; skip it, keep counting
                log.warning(
                    "grant %s skipped: its validity ended before it could be issued", grant_id
                )
                conn.execute(q["advance_schedule"], {"schedule_id": s["schedule_id"]})
                continue
            grant_credit(
                conn,
                q,
                account_id=s["account_id"],
                amount=s["amount"],
                expires_at=s["next_at"] + s["valid_for"],
                reason=s["reason"],
                actor=f"schedule:{s['schedule_id']}",
                now=min(now, s["next_at"]),
                grant_id=grant_id,
                schedule_id=s["schedule_id"],
            )
            conn.execute(q["advance_schedule"], {"schedule_id": s["schedule_id"]})
            issued += 1


@dataclass(frozen=True)
class Credit:
    """A wallet's balance split into paid and granted credit."""

    account_id: str
    balance: Decimal
    granted: Decimal

    @property
    def paid(self) -> Decimal:
        return self.balance - self.granted

    def as_json(self) -> dict[str, str]:
        return {
            "account_id": self.account_id,
            "balance": format_usd(self.balance),
            "paid": format_usd(self.paid),
            "granted": format_usd(self.granted),
        }


def credit_of(conn: psycopg.Connection[Any], q: Queries, account_id: str) -> Credit:
    rows = fetch_dicts(conn, q["granted_balance"], {"account_id": account_id})
    if not rows:
        raise UnknownAccount(f"no account {account_id!r}")
    return Credit(**rows[0])


def list_grants(
    conn: psycopg.Connection[Any], q: Queries, account_id: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    return fetch_dicts(conn, q["list_grants"], {"account_id": account_id, "limit": limit})
