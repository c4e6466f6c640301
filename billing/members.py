"""Sub-accounts: member accounts whose usage an organisation's wallet pays.

* ``add_member(org, member)``: from then on the member's usage is debited from the organisation's
  wallet (the batch maps each account to its paying wallet, ``batch_payers``), and the member's
  authorizations hold against that wallet. A member may have its own spending limit per period
  (``member_limit_exceeded``), enforced by the hold path like a key limit.
* Each usage posting records what it paid for each member (``usage_attributions``): the audit
  maps the member's events to the paying wallet, and the organisation's statement shows the
  member's usage on lines of their own (``member: model via provider: class``).
* One level: an organisation is never a member. Removing a member makes it pay for itself again;
  past usage stays attributed as it was paid. A member's BYOK usage (no money) stays on its own
  statement.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts
from billing.errors import BillingError, UnknownAccount
from billing.limits import Period
from billing.money import exact


def add_member(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    org: str,
    member: str,
    actor: str,
    limit: Decimal | None = None,
    period: Period | None = None,
    time_zone: str = "UTC",
    now: datetime | None = None,
) -> None:
    """Make ``member`` a sub-account of ``org`` (or change its limit). A limit counts what the
    member already spent in the current period, rebuilt from its recorded events under the
    organisation's wallet lock (as ``billing.limits.set_limit`` does for a key)."""
    if org == member:
        raise BillingError("an account cannot be its own member")
    if (limit is None) != (period is None):
        raise BillingError("a member limit needs both an amount and a period")
    if limit is not None and limit < 0:
        raise BillingError("a limit must not be negative")
    with conn.transaction():
        accounts = {"accounts": [org, member]}
        known = {r[0] for r in conn.execute(q["lock_member_accounts"], accounts)}
        for account in (org, member):
            if account not in known:
                raise UnknownAccount(f"no account {account!r}")
        try:
            row = conn.execute(
                q["upsert_member"],
                {
                    "org": org,
                    "member": member,
                    "limit_amount": None if limit is None else exact(limit),
                    "limit_period": None if period is None else period.value,
                    "time_zone": time_zone,
                    "actor": actor,
                },
            ).fetchone()
        except psycopg.errors.CheckViolation as exc:
            raise BillingError(str(exc).splitlines()[0]) from None
        if row is None:
            raise BillingError(
                f"{member!r} cannot join {org!r}: it is an organisation or another's member, "
                f"or {org!r} is itself a member"
            )
        if limit is not None:
            conn.execute(q["lock_paying_wallet"], {"account_id": member})
            now = now or datetime.now(UTC)
            conn.execute(q["rebuild_member_spend"], {"member": member, "now": now})


def remove_member(conn: psycopg.Connection[Any], q: Queries, *, org: str, member: str) -> None:
    with conn.transaction():
        if conn.execute(q["remove_member"], {"org": org, "member": member}).fetchone() is None:
            raise BillingError(f"{member!r} is not a member of {org!r}")


def list_members(
    conn: psycopg.Connection[Any], q: Queries, now: datetime, org: str | None = None
) -> list[dict[str, Any]]:
    return fetch_dicts(conn, q["list_members"], {"org": org, "now": now})
