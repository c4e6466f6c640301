"""Thin Celery tasks: decode arguments, call one domain function, return or retry."""

from __future__ import annotations

from datetime import UTC, datetime

from billing import broker, grants, holds
from billing.alerts import AutoTopupTrigger
from billing.catalog import CatalogCache
from billing.db import connect, queries
from billing.deadletters import replay
from billing.errors import Transient
from billing.exports.fleet import export_period
from billing.partitions import ensure_partitions
from billing.stripe_client import StripeGateway
from billing.topups import check_auto_topups, process_pending, process_stripe_event
from billing.wallets import relay_outbox
from workers.app import app, settings


@app.task(name="billing.relay_outbox", autoretry_for=(Transient,), retry_backoff=True)
def relay_outbox_task() -> int:
    """Publish pending wallet events (those a worker could not publish right after commit)."""
    with connect(settings) as conn, broker.connect(settings) as bconn:
        publish = AutoTopupTrigger(
            broker.WalletEventPublisher(settings, bconn), lambda: check_auto_topups_task.delay()
        )
        return relay_outbox(conn, queries(settings), publish)


@app.task(name="billing.replay_dead_letters", autoretry_for=(Transient,), retry_backoff=True)
def replay_dead_letters_task(reason_code: str | None = None) -> dict[str, int]:
    q = queries(settings)
    with connect(settings) as conn:
        result = replay(
            conn, q, CatalogCache(q), settings, datetime.now(UTC), reason_code=reason_code
        )
    return {
        "debited": result.debited,
        "byok": result.byok,
        "duplicates": result.duplicates,
        "parked": result.parked,
    }


@app.task(name="billing.process_stripe_event", autoretry_for=(Transient,), retry_backoff=True)
def process_stripe_event_task(event_id: str) -> str:
    """Apply one stored Stripe event (money moves and the inbox row is marked in one commit)."""
    with connect(settings) as conn:
        return process_stripe_event(conn, queries(settings), settings, event_id).text


@app.task(name="billing.process_pending_stripe_events", autoretry_for=(Transient,))
def process_pending_stripe_events_task() -> dict[str, int]:
    """Re-run stored events not processed yet (a lost hand-off, a failure, an early arrival)."""
    with connect(settings) as conn:
        result = process_pending(conn, queries(settings), settings)
    return {
        "processed": result.processed,
        "waiting": result.waiting,
        "abandoned": result.abandoned,
        "failed": result.failed,
    }


@app.task(name="billing.check_auto_topups", autoretry_for=(Transient,), retry_backoff=True)
def check_auto_topups_task() -> int:
    """Create the off-session intents of accounts below their auto top-up threshold."""
    if not settings.stripe_api_key:
        return 0
    with connect(settings) as conn:
        return len(check_auto_topups(conn, queries(settings), settings, StripeGateway(settings)))


@app.task(name="billing.export_period", autoretry_for=(Transient,), retry_backoff=True)
def export_period_task(period: str, fmt: str, account: str | None = None) -> dict[str, object]:
    """Write a period's statements into BILLING_EXPORTS_DIR/<period> (runs on the exports queue)."""
    result = export_period(settings, period, fmt, settings.exports_dir / period, account)
    return {"accounts": result.accounts, "files": [str(p) for p in result.files[:100]]}


@app.task(name="billing.ensure_partitions", autoretry_for=(Transient,), retry_backoff=True)
def ensure_partitions_task() -> list[str]:
    """Create the coming months' usage_events partitions (every 6 hours; idempotent)."""
    with connect(settings) as conn:
        return ensure_partitions(
            conn, queries(settings), datetime.now(UTC), settings.partition_months_ahead
        )


@app.task(name="billing.expire_holds", autoretry_for=(Transient,), retry_backoff=True)
def expire_holds_task() -> int:
    """Close holds whose request never reported usage (safe with several schedulers)."""
    with connect(settings) as conn:
        return holds.expire_holds(conn, queries(settings), datetime.now(UTC))


@app.task(name="billing.credit_grants", autoretry_for=(Transient,), retry_backoff=True)
def credit_grants_task() -> dict[str, str | int]:
    """Issue due scheduled grants, then expire lapsed ones (each exactly once)."""
    now = datetime.now(UTC)
    q = queries(settings)
    with connect(settings) as conn:
        issued = grants.issue_due_grants(conn, q, now)
        expired = grants.expire_grants(conn, q, now)
    return {"issued": issued, "expired": str(expired)}
