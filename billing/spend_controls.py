"""The spend controls' step of a usage batch: ONE statement after the debit.

``record_batch`` (billing/usage.py) calls ``after_debit`` in its transaction, after the wallets
were debited (their rows are locked). The statement (``after_usage_debit``):

* settles the holds named by the batch's newly recorded events (``billing.holds``): each takes
  its event's actual cost;
* adds the cost of every new event, held or not, to its key's and its member's period spend
  where a limit applies (``billing.limits``), in the period the event occurred in;
* lets each wallet's debit consume its granted credit first, the earliest expiry first
  (``billing.grants``), recording which grant the usage posting took what from;
* records which member accounts' usage an organisation's wallet paid (``billing.members``);
* flips the low-balance alert thresholds the new balances crossed (``billing.alerts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from billing.alerts import publish_crossings
from billing.db import Queries
from billing.ledger import WalletChange
from billing.money import EXACT, ZERO

if TYPE_CHECKING:
    from billing.usage import PricedEvent


def after_debit(
    conn: psycopg.Connection[Any],
    q: Queries,
    posting_id: int,
    deltas: Mapping[str, Decimal],
    payers: Mapping[str, str],
    recorded: Sequence[PricedEvent],
    changes: Sequence[WalletChange],
) -> tuple[int, Decimal, int]:
    """Settle holds, consume grants, flip low-balance thresholds.

    Returns (holds settled, granted credit used, low-balance outbox rows written).

    ``deltas``: each paying wallet's (negative) usage delta of ``posting_id``; ``payers``: each
    account's paying wallet; ``recorded``: the batch's newly recorded events (not the
    duplicates); ``changes``: the debited wallets' new balances. Nothing runs when nothing
    applies.
    """
    hold_ids: list[str] = []
    event_ids: list[str] = []
    hold_accounts: list[str] = []
    hold_amounts: list[Decimal] = []
    members: dict[tuple[str, str], Decimal] = {}
    # spend per (key, account, quarter hour) as [paid, BYOK notional]; per (member, quarter hour)
    key_usage: dict[tuple[str, str, datetime], list[Decimal]] = {}
    member_usage: dict[tuple[str, datetime], Decimal] = {}
    for p in recorded:
        account, total = p.event.account_id, p.charge.total
        if p.event.hold_id is not None:
            hold_ids.append(p.event.hold_id)
            event_ids.append(p.event.event_id)
            hold_accounts.append(account)
            hold_amounts.append(total)
        if not total:
            continue
        at = _quarter_hour(p.event.occurred_at)
        spent = key_usage.setdefault((p.event.api_key_id, account, at), [ZERO, ZERO])
        spent[p.event.byok] = EXACT.add(spent[p.event.byok], total)
        if payers[account] != account and not p.event.byok:
            key = (account, payers[account])
            members[key] = EXACT.add(members.get(key, ZERO), total)
            member_usage[account, at] = EXACT.add(member_usage.get((account, at), ZERO), total)
    accounts = sorted(a for a, v in deltas.items() if v < 0)
    changed = sorted(changes, key=lambda c: c.account_id)
    if not hold_ids and not accounts and not changed and not key_usage:
        return 0, Decimal(0), 0
    keys = sorted(key_usage)
    spend_members = sorted(member_usage)
    result = conn.execute(
        q["after_usage_debit"],
        {
            "hold_ids": hold_ids,
            "event_ids": event_ids,
            "hold_accounts": hold_accounts,
            "hold_amounts": hold_amounts,
            "accounts": accounts,
            "debits": [EXACT.minus(deltas[a]) for a in accounts],
            "posting_id": posting_id,
            "members": [m for m, _ in members],
            "member_payers": [p for _, p in members],
            "member_amounts": list(members.values()),
            "key_ids": [k for k, _, _ in keys],
            "key_accounts": [a for _, a, _ in keys],
            "key_at": [at for _, _, at in keys],
            "key_paid": [key_usage[k][0] for k in keys],
            "key_byok": [key_usage[k][1] for k in keys],
            "spend_members": [m for m, _ in spend_members],
            "spend_member_at": [at for _, at in spend_members],
            "spend_member_amounts": [member_usage[k] for k in spend_members],
            "changed_accounts": [c.account_id for c in changed],
            "changed_balances": [c.balance for c in changed],
        },
    ).fetchone()
    assert result is not None
    alerts = publish_crossings(conn, q, [tuple(r) for r in result[2]])
    return int(result[0]), result[1], alerts


def _quarter_hour(at: datetime) -> datetime:
    """The start of ``at``'s quarter hour: every time zone's midnight is on one, so a limit
    period (a day, week or month from midnight in its time zone) never splits a bucket."""
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)
