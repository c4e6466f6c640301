"""The reference a team writes first: one Celery task per usage event, one transaction each.

Kept in the repo as the yardstick for ``bench/throughput.py`` (run it with
``celery -A workers.baseline worker``). It reuses the domain's own decode, price and record code,
so it is exactly-once and correct too: only the shape differs (a Celery task message per event, a
transaction per event, a prefetch of one task per process).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from billing import db
from billing.catalog import CatalogCache
from billing.usage import process_batch
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
    process_batch(conn, q, cache.current(conn), [body.encode()], settings, datetime.now(UTC))
