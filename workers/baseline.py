"""The reference a team writes first: one Celery task per usage event, one transaction each.

Kept in the repo as the yardstick for ``bench/throughput.py`` (run it with
``celery -A workers.baseline worker``). It is correct and exactly-once like the fleet (same
validation, pricing, idempotent insert and ledger posting) but shaped the straightforward way: a
Celery task message per event, a prefetch of one task per process, and per event one transaction
of a single-row insert that claims the event's idempotency key, followed by the wallet's ledger
posting. A benchmark reference only: it bills each account's own wallet and skips the spend
controls (holds, grants, sub-accounts), which the benchmark's traffic does not use.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from billing import db
from billing.catalog import CatalogCache
from billing.events import Reason
from billing.ledger import PostingKind, SystemAccount, next_posting_id, post_wallet_movement
from billing.usage import BatchResult, decode_and_price, park, rejection_of, staging_row
from billing.wallets import record_crossings
from workers.app import app, settings

_state: dict[str, Any] = {}


def _connection() -> psycopg.Connection[Any]:
    conn = _state.get("conn")
    if conn is None or conn.closed:
        conn = _state["conn"] = db.connect(settings)
    return conn


@app.task(name="billing.baseline.record_event", acks_late=True, ignore_result=True)
def record_event(body: str) -> None:
    """Record one usage event in its own transaction."""
    conn = _connection()
    q = db.queries(settings)
    cache = _state.setdefault("cache", CatalogCache(q))
    priced, rejected = decode_and_price(
        [body.encode()], cache.current(conn), settings, datetime.now(UTC)
    )
    with conn.transaction():
        if rejected:
            park(conn, q, rejected, BatchResult())
            return
        [event] = priced
        known = conn.execute(q["known_accounts"], {"accounts": [event.event.account_id]})
        if known.fetchone() is None:
            unknown = rejection_of(
                event.event,
                Reason.UNKNOWN_ACCOUNT,
                "$.account_id",
                f"no account {event.event.account_id!r}",
            )
            park(conn, q, [unknown], BatchResult())
            return
        posting_id = next_posting_id(conn, q)
        row = conn.execute(q["baseline_insert_event"], staging_row(event, posting_id)).fetchone()
        if row is None or row[0] == 0:  # a duplicate, or BYOK / free: nothing to debit
            return
        changes = post_wallet_movement(
            conn,
            q,
            posting_id=posting_id,
            kind=PostingKind.USAGE,
            wallet_deltas={event.event.account_id: -row[0]},
            counterparty=SystemAccount.USAGE_REVENUE,
            reference=f"event:{event.event.event_id}",
        )
        record_crossings(conn, q, changes)
