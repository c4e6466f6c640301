"""Per-API-key spending limits, enforced by the hold path (``billing.holds``).

A key's limit is an amount per calendar period (a day, an ISO week starting Monday, or a month)
in a time zone (UTC by default), so it resets at that zone's midnight. What a key has used in a
period is the settled cost of its holds in that period plus its active holds; authorization
refuses a request whose worst case would take it over (``key_limit_exceeded``). With
``count_byok`` a BYOK request of the key is held (against the limit only, never the wallet) and
its notional cost counts.

Every recorded event of the key counts toward its period, authorized or not (the usage batch
adds each event's cost; setting a limit counts what the key already spent in the period).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts
from billing.errors import BillingError
from billing.ledger import require_account
from billing.money import format_usd


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True)
class KeyLimit:
    api_key_id: str
    account_id: str
    amount: Decimal
    period: Period
    time_zone: str
    count_byok: bool
    period_start: datetime
    period_end: datetime
    used: Decimal

    @property
    def remaining(self) -> Decimal:
        return self.amount - self.used

    def as_json(self) -> dict[str, Any]:
        return {
            "api_key_id": self.api_key_id,
            "account_id": self.account_id,
            "limit": format_usd(self.amount),
            "period": self.period.value,
            "time_zone": self.time_zone,
            "count_byok": self.count_byok,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "used": format_usd(self.used),
            "remaining": format_usd(self.remaining),
        }


def set_limit(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    account_id: str,
    api_key_id: str,
    amount: Decimal,
    period: Period | None = None,
    time_zone: str | None = None,
    count_byok: bool | None = None,
    actor: str,
    now: datetime | None = None,
) -> KeyLimitRule:
    """Set (or change) a key's limit; returns the rule now in force. A key belongs to one
    account. ``period``, ``time_zone`` and ``count_byok`` left at None keep the limit's current
    ones (a new limit: month, UTC, BYOK not counted), so changing the amount changes only that.

    What the key already spent in the current period counts at once: its spend is rebuilt from
    its recorded events (a limit set mid-month, or moved to another zone or period, used to start
    from 0). Under the paying wallet's lock, so no usage batch adds to it meanwhile; a batch that
    read the limits before this commits, and commits after, does not count its events (one batch).
    """
    if amount < 0:
        raise BillingError("a limit must not be negative")
    with conn.transaction():
        require_account(conn, q, account_id)
        conn.execute(q["lock_paying_wallet"], {"account_id": account_id})
        try:
            row = conn.execute(
                q["set_key_limit"],
                {
                    "api_key_id": api_key_id,
                    "account_id": account_id,
                    "amount": amount,
                    "period": None if period is None else period.value,
                    "time_zone": time_zone,
                    "count_byok": count_byok,
                    "actor": actor,
                },
            ).fetchone()
        except psycopg.errors.CheckViolation as exc:
            raise BillingError(str(exc).splitlines()[0]) from None
        if row is None:
            raise BillingError(f"key {api_key_id!r} has a limit on another account")
        now = now or datetime.now(UTC)
        conn.execute(q["rebuild_key_spend"], {"api_key_id": api_key_id, "now": now})
    return KeyLimitRule(Period(row[1]), row[2], row[3])


@dataclass(frozen=True)
class KeyLimitRule:
    """How a key's limit is counted: its period, the zone it resets in, and BYOK or not."""

    period: Period
    time_zone: str
    count_byok: bool


def remove_limit(conn: psycopg.Connection[Any], q: Queries, api_key_id: str) -> None:
    with conn.transaction():
        if conn.execute(q["remove_key_limit"], {"api_key_id": api_key_id}).fetchone() is None:
            raise BillingError(f"key {api_key_id!r} has no limit")


def show_limits(
    conn: psycopg.Connection[Any],
    q: Queries,
    now: datetime,
    *,
    api_key_id: str | None = None,
    account_id: str | None = None,
) -> list[KeyLimit]:
    rows = fetch_dicts(
        conn, q["show_key_limit"], {"api_key_id": api_key_id, "account_id": account_id, "now": now}
    )
    return [KeyLimit(**{**r, "period": Period(r["period"])}) for r in rows]
