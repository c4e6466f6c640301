"""Thin Celery tasks: decode arguments, call one domain function, return or retry."""

from __future__ import annotations

from datetime import UTC, datetime

from billing import broker
from billing.catalog import CatalogCache
from billing.db import connect, queries
from billing.deadletters import replay
from billing.errors import Transient
from billing.wallets import relay_outbox
from workers.app import app, settings


@app.task(name="billing.relay_outbox", autoretry_for=(Transient,), retry_backoff=True)
def relay_outbox_task() -> int:
    """Publish pending wallet events (those a worker could not publish right after commit)."""
    with connect(settings) as conn, broker.connect(settings) as bconn:
        return relay_outbox(conn, queries(settings), broker.WalletEventPublisher(settings, bconn))


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
