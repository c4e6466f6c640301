"""The spend controls' step of a usage batch: ONE statement after the debit.

``record_batch`` (billing/usage.py) builds the statement's parameters (``SpendPlan.of``) before
it locks the batch's wallets, and calls ``after_debit`` in its transaction after the wallets were
debited (their rows are locked until the commit). The statement (``after_usage_debit``):

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
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from billing.alerts import publish_crossings
from billing.db import Queries, text_array
from billing.ledger import WalletChange
from billing.money import EXACT, ZERO

if TYPE_CHECKING:
    from billing.usage import PricedEvent


@dataclass(frozen=True)
class BatchControls:
    """The batch's accounts, each one's paying wallet, and which spend controls apply to them.

    Read in the batch's first statement (``batch_payers``); most accounts have no limit or alert,
    and the spend-controls statement then gets nothing for them. Grants are not pre-read: whether
    a wallet has granted credit is decided under its row lock, in the statement itself (a grant
    credited between this read and the debit must still be consumed first).
    """

    payers: Mapping[str, str]  # account -> the wallet that pays (its own, or its organisation's)
    limited_keys: frozenset[tuple[str, str]]  # (api_key_id, account_id) with a spending limit
    limited_members: frozenset[str]  # member accounts with a limit of their own
    alert_payers: frozenset[str]  # paying wallets with low-balance thresholds

    @classmethod
    def read(cls, conn: psycopg.Connection[Any], q: Queries, accounts: list[str]) -> BatchControls:
        payers: dict[str, str] = {}
        keys: set[tuple[str, str]] = set()
        members: set[str] = set()
        alerts: set[str] = set()
        for account, payer, limited_keys, member_limited, has_alerts in conn.execute(
            q["batch_payers"], {"accounts": text_array(accounts)}
        ):
            payers[account] = payer
            keys.update((key, account) for key in limited_keys)
            if member_limited:
                members.add(account)
            if has_alerts:
                alerts.add(payer)
        return cls(payers, frozenset(keys), frozenset(members), frozenset(alerts))


@dataclass(frozen=True)
class SpendPlan:
    """What the spend-controls statement will be sent for a batch, built before its wallets are
    locked: only ``changed_accounts`` and ``changed_balances`` need the debit's result."""

    params: dict[str, Any]
    alert_payers: frozenset[str]
    applies: bool  # a hold, a debit, a limit or a sub-account: the statement must run

    @classmethod
    def of(
        cls,
        posting_id: int,
        deltas: Mapping[str, Decimal],
        controls: BatchControls,
        recorded: Sequence[PricedEvent],
    ) -> SpendPlan:
        """``deltas``: each paying wallet's (negative) usage delta of ``posting_id``;
        ``controls``: the batch's payers and the controls that apply; ``recorded``: the batch's
        newly recorded events (not the duplicates)."""
        payers = controls.payers
        hold_ids: list[str] = []
        event_ids: list[str] = []
        hold_accounts: list[str] = []
        hold_amounts: list[Decimal] = []
        members: dict[tuple[str, str], Decimal] = {}
        # spend per (key, account, quarter hour) as [paid, BYOK notional]; per (member, quarter)
        key_usage: dict[tuple[str, str, datetime], list[Decimal]] = {}
        member_usage: dict[tuple[str, datetime], Decimal] = {}
        limited_keys, limited_members = controls.limited_keys, controls.limited_members
        for p in recorded:
            e = p.event
            account, total = e.account_id, p.charge.total
            if e.hold_id is not None:
                hold_ids.append(e.hold_id)
                event_ids.append(e.event_id)
                hold_accounts.append(account)
                hold_amounts.append(total)
            if not total:
                continue
            if limited_keys and (e.api_key_id, account) in limited_keys:
                spent = key_usage.setdefault(
                    (e.api_key_id, account, _quarter_hour(e.occurred_at)), [ZERO, ZERO]
                )
                spent[e.byok] = EXACT.add(spent[e.byok], total)
            if payers[account] != account and not e.byok:
                key = (account, payers[account])
                members[key] = EXACT.add(members.get(key, ZERO), total)
                if account in limited_members:
                    at = _quarter_hour(e.occurred_at)
                    member_usage[account, at] = EXACT.add(
                        member_usage.get((account, at), ZERO), total
                    )
        accounts = sorted(a for a, v in deltas.items() if v < 0)  # grants: decided under the lock
        keys = sorted(key_usage)
        spend_members = sorted(member_usage)
        params: dict[str, Any] = {
            "hold_ids": hold_ids,
            "event_ids": event_ids,
            "hold_accounts": hold_accounts,
            "hold_amounts": hold_amounts,
            "accounts": text_array(accounts),  # one per wallet debited: as text (db.text_array)
            "debits": text_array([EXACT.minus(deltas[a]) for a in accounts]),
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
        }
        applies = bool(hold_ids or accounts or key_usage or members)
        return cls(params, controls.alert_payers, applies)


def after_debit(
    conn: psycopg.Connection[Any],
    q: Queries,
    plan: SpendPlan,
    changes: Sequence[WalletChange],
) -> tuple[int, Decimal, int]:
    """Settle holds, count limited spend, consume grants, attribute members, flip alerts.

    Returns (holds settled, granted credit used, low-balance outbox rows written).

    ``plan``: built by ``SpendPlan.of`` before the debit; ``changes``: the debited wallets' new
    balances. Only what applies is sent; nothing runs when nothing applies (no debit, hold,
    limit, alert or sub-account).
    """
    changed = sorted(
        (c for c in changes if c.account_id in plan.alert_payers), key=lambda c: c.account_id
    )
    if not (plan.applies or changed):
        return 0, Decimal(0), 0
    result = conn.execute(
        q["after_usage_debit"],
        {
            **plan.params,
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
