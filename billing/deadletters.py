"""Dead letters: list them, replay them after a fix, or discard them with a reason.

Replaying runs a parked payload through the same decode, price and record path as the worker, in
one transaction per chunk, so it is exactly-once too: an event recorded meanwhile is a duplicate,
and its dead letter is resolved. Items whose stored payload can never decode (malformed JSON, a
message over the size limit, kept only as its first 4 KiB) are not replayable: discard them once
the sender is fixed.

The cap on one event's charge is this process's ``Settings.max_event_charge``: a
``charge_over_cap`` event found genuine is recorded by a replay under a higher cap, or none
(``BILLING_MAX_EVENT_CHARGE=0 billing dead-letters replay --reason charge_over_cap``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg

from billing.catalog import CatalogCache
from billing.db import Queries, fetch_dicts
from billing.errors import BillingError
from billing.events import Reason
from billing.settings import Settings
from billing.usage import BatchResult, decode_and_price, record_batch

NOT_REPLAYABLE = frozenset({Reason.MALFORMED_JSON, Reason.TOO_LARGE})


def list_dead_letters(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    status: str | None = "parked",
    reason_code: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    return fetch_dicts(
        conn, q["list_dead_letters"], {"status": status, "reason_code": reason_code, "limit": limit}
    )


def replay(
    conn: psycopg.Connection[Any],
    q: Queries,
    cache: CatalogCache,
    settings: Settings,
    now: datetime,
    *,
    ids: list[int] | None = None,
    reason_code: str | None = None,
    chunk: int = 500,
) -> BatchResult:
    """Re-process parked dead letters (all, some ids, or one reason). Returns what happened."""
    total = BatchResult()
    after = 0
    while True:
        with conn.transaction():
            catalog = cache.current(conn)
            rows = conn.execute(
                q["claim_parked"],
                {"ids": ids, "reason_code": reason_code, "after": after, "limit": chunk},
            ).fetchall()
            if not rows:
                return total
            after = rows[-1][0]
            bodies = []
            keys: dict[bytes, str] = {}
            for _id, dedup_key, _event_id, payload in rows:
                body = bytes(payload)
                bodies.append(body)
                keys[body] = dedup_key
            priced, rejected = decode_and_price(bodies, catalog, settings, now)
            # A payload without an event_id keeps the key it was parked under.
            rejected = [
                r
                if r.event_id is not None
                else replace(r, dedup_key=keys.get(r.payload, r.dedup_key))
                for r in rejected
                if r.reason_code not in NOT_REPLAYABLE or r.event_id is not None
            ]
            result = record_batch(
                conn,
                q,
                priced,
                rejected,
                resolution="replayed",
                max_charge=settings.max_event_charge,
            )
        total = total.merge(result)


def discard(
    conn: psycopg.Connection[Any], q: Queries, ids: list[int], *, reason: str, actor: str
) -> list[int]:
    if not reason.strip():
        raise BillingError("discarding a dead letter needs a reason")
    with conn.transaction():
        rows = conn.execute(
            q["discard"], {"ids": ids, "resolution": f"discarded by {actor}: {reason}"}
        ).fetchall()
    return [r[0] for r in rows]


def counts(conn: psycopg.Connection[Any], q: Queries) -> list[tuple[str, str, int]]:
    return [(s, r, int(n)) for s, r, n in conn.execute(q["dead_letter_counts"])]
