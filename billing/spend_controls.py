"""The spend controls' step of a usage batch: ONE statement after the debit.

``record_batch`` (billing/usage.py) calls ``after_debit`` in its transaction, after the wallets
were debited (their rows are locked). The statement (``after_usage_debit``):

* settles the holds named by the batch's newly recorded events (``billing.holds``): each takes
  its event's actual cost, and a limited key's period spend grows by it;
* lets each wallet's debit consume its granted credit first, the earliest expiry first
  (``billing.grants``), recording which grant the usage posting took what from;
* records which member accounts' usage an organisation's wallet paid (``billing.members``);
* flips the low-balance alert thresholds the new balances crossed (``billing.alerts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from billing.alerts import publish_crossings
from billing.db import Queries
from billing.ledger import WalletChange
from billing.money import EXACT

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
    for p in recorded:
        account = p.event.account_id
        if payers[account] != account and not p.event.byok and p.charge.total > 0:
            key = (account, payers[account])
            members[key] = EXACT.add(members.get(key, Decimal(0)), p.charge.total)
        if p.event.hold_id is not None:
            hold_ids.append(p.event.hold_id)
            event_ids.append(p.event.event_id)
            hold_accounts.append(account)
            hold_amounts.append(p.charge.total)
    accounts = sorted(a for a, v in deltas.items() if v < 0)
    changed = sorted(changes, key=lambda c: c.account_id)
    if not hold_ids and not accounts and not changed:
        return 0, Decimal(0), 0
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
            "changed_accounts": [c.account_id for c in changed],
            "changed_balances": [c.balance for c in changed],
        },
    ).fetchone()
    assert result is not None
    alerts = publish_crossings(conn, q, [tuple(r) for r in result[2]])
    return int(result[0]), result[1], alerts
