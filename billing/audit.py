"""``billing audit``: prove the books, or print exactly what is wrong.

Each check is one query whose rows are violations (``sql/queries/audit.sql``,
``audit_books.sql`` and ``partitions.sql``): wallet balance vs. its ledger, balanced postings and
trial balance, usage debits vs. the events behind them (per posting and per wallet), usage revenue
vs. events, every accepted event in exactly one state (recorded, or parked once; never resolved
without being recorded), each Stripe payment, refund and dispute moving money at most once, the
top-up, dispute and invoice checks, and every event holding exactly its idempotency key. The
primary key of ``usage_event_keys.event_id`` is the exactly-once guarantee; these checks prove each
recorded amount reached the ledger once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts

CHECKS = (
    ("wallet balance equals its ledger sum", "audit_wallet_vs_ledger"),
    ("every posting balances", "audit_unbalanced_postings"),
    ("usage debits equal the events behind them", "audit_usage_debits"),
    ("no event both recorded and parked", "audit_recorded_and_parked"),
    ("every accepted event is in exactly one state", "audit_event_one_state"),
    ("per wallet, ledger usage debits equal its events' debits", "audit_wallet_usage_debits"),
    ("the trial balance is zero (every movement balances)", "audit_trial_balance"),
    ("each Stripe payment, refund and dispute moved money at most once", "audit_stripe_money_once"),
    ("every debited event references its usage posting", "audit_event_postings"),
    ("every event belongs to an existing account", "audit_event_accounts"),
    ("each top-up's postings match its credit, fee and refunds", "audit_topup_ledger"),
    ("dispute holds match the open disputes", "audit_dispute_holds"),
    ("fee revenue and Stripe clearing match the top-ups", "audit_topup_totals"),
    ("a wallet is frozen exactly while a dispute is open", "audit_frozen_wallets"),
    ("usage is recorded at its posting's time (statements)", "audit_event_recorded_at"),
    ("every invoice's content and figures match their hashes", "audit_invoice_hashes"),
    ("invoice numbers run 1..N per issuer without gaps", "audit_invoice_numbers"),
    # spend controls (issue 9; queries in sql/queries/holds.sql)
    ("held + available = balance for every wallet", "audit_hold_availability"),
    ("each settled hold took exactly its event's cost", "audit_settled_holds"),
    ("each limited key's period spend equals the cost of its events", "audit_key_spend"),
    ("each limited member's period spend equals the cost of its events", "audit_member_spend"),
    ("an organisation paid exactly its members' usage", "audit_usage_attributions"),
    ("each grant and grant expiry moved exactly its amount", "audit_grant_ledger"),
    ("grant consumption matches the usage postings", "audit_grant_consumption"),
    ("equity:grants equals expired minus granted credit", "audit_grants_equity"),
    ("events in a service tier were priced from that tier's prices", "audit_event_tier_prices"),
    ("new classes have amounts exactly with counts", "audit_event_new_classes"),
    # sql/queries/partitions.sql (migration 0006)
    ("every event holds its idempotency key, each key its event", "audit_event_keys"),
    ("usage_events has partitions for this month and next", "audit_partitions_ahead"),
)


@dataclass(frozen=True)
class Check:
    name: str
    violations: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class AuditReport:
    checks: list[Check]
    states: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run_audit(conn: psycopg.Connection[Any], q: Queries) -> AuditReport:
    """Run every check in one REPEATABLE READ snapshot, so concurrent writers cannot skew it."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        checks = [Check(name, fetch_dicts(conn, q[query])) for name, query in CHECKS]
        revenue = fetch_dicts(conn, q["audit_revenue"])[0]
        checks.append(
            Check(
                "usage revenue equals usage debits",
                [] if revenue["events_total"] == revenue["revenue_total"] else [revenue],
            )
        )
        states = {k: int(v) for k, v in fetch_dicts(conn, q["audit_event_states"])[0].items()}
    return AuditReport(checks, states)
