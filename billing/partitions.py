"""PostgreSQL upkeep of the fleet: monthly ``usage_events`` partitions and payload retention.

``usage_events`` is range-partitioned by ``recorded_at`` in UTC months (migration 0006); the
exactly-once key lives in the non-partitioned ``usage_event_keys``. A month must have its
partition before the first event is recorded in it, so ``ensure_partitions`` creates them
``BILLING_PARTITION_MONTHS_AHEAD`` months ahead: a daily beat task and ``billing partitions
ensure`` run it; it is idempotent and cheap when nothing is missing. Creating a partition briefly
takes a lock on ``usage_events``, so it runs with a short ``lock_timeout`` and is retried on the
next run rather than stalling the fleet.

Retention (``billing retention run``): raw payloads of dead letters no longer parked and of
processed Stripe events are removed after ``BILLING_PAYLOAD_RETENTION_DAYS``; their ids, reasons,
sizes and outcomes stay. Recorded usage and the ledger are kept (they are the books).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts, map_error


@dataclass(frozen=True)
class Partition:
    name: str
    bounds: str
    rows_estimate: int
    bytes: int


@dataclass(frozen=True)
class RetentionResult:
    before: datetime
    dead_letters: int
    stripe_events: int


def ensure_partitions(
    conn: psycopg.Connection[Any], q: Queries, now: datetime, months_ahead: int
) -> list[str]:
    """Create the missing monthly partitions up to ``months_ahead`` months after ``now``."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '5s'")
            rows = conn.execute(
                q["ensure_usage_partitions"], {"from": now, "ahead": months_ahead}
            ).fetchall()
    except psycopg.Error as exc:  # a lock timeout is Transient: the next run retries
        raise map_error(exc) from exc
    return [row[0] for row in rows]


def list_partitions(conn: psycopg.Connection[Any], q: Queries) -> list[Partition]:
    return [Partition(**row) for row in fetch_dicts(conn, q["usage_partitions"])]


def purge_payloads(
    conn: psycopg.Connection[Any], q: Queries, now: datetime, retention_days: int
) -> RetentionResult:
    """Remove raw payloads older than the retention period, in one transaction."""
    before = now - timedelta(days=retention_days)
    with conn.transaction():
        dead = conn.execute(q["purge_dead_letter_payloads"], {"before": before}).rowcount
        stripe = conn.execute(q["purge_stripe_event_payloads"], {"before": before}).rowcount
    return RetentionResult(before, dead, stripe)
