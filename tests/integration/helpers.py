"""Helpers shared by integration tests: events, an in-process drain, expected totals."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from billing import broker, catalog, db, synthetic, wallets
from billing.audit import run_audit
from billing.db import Queries
from billing.events import Usage, UsageEvent
from billing.settings import Settings
from workers.usage_consumer import UsageConsumer


def make_event(
    event_id: str,
    account_id: str = "acme",
    *,
    model: str = "openai/o4-mini",
    provider: str = "openai",
    byok: bool = False,
    occurred_at: datetime | None = None,
    **usage: int,
) -> UsageEvent:
    return UsageEvent(
        schema="usage.v1",
        event_id=event_id,
        occurred_at=occurred_at or datetime.now(UTC) - timedelta(seconds=1),
        account_id=account_id,
        api_key_id="key-1",
        model=model,
        provider=provider,
        byok=byok,
        usage=Usage(**usage) if usage else Usage(input_tokens=1000, output_tokens=500),
    )


def open_account(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, credit: Decimal | str = "10"
) -> None:
    wallets.create_account(conn, q, account_id)
    if Decimal(credit):
        wallets.adjust(conn, q, account_id, Decimal(credit), reason="test credit", actor="tests")


class _Drainer(UsageConsumer):
    """Consume until the queue has been idle for ``idle`` seconds, then stop (flushing)."""

    idle = 1.0

    def on_message(self, message: Any) -> None:
        self.last_activity = time.monotonic()
        super().on_message(message)

    def on_iteration(self) -> None:
        super().on_iteration()
        if not self.messages and time.monotonic() - self.last_activity > self.idle:
            self.should_stop = True


def drain(settings: Settings, idle: float = 1.0) -> UsageConsumer:
    """Run the real usage consumer in-process until the queue is empty."""
    pool = db.make_pool(settings, min_size=1, max_size=2)
    try:
        with broker.connect(settings) as conn:
            consumer = _Drainer(settings, pool, conn)
            consumer.idle = idle
            consumer.last_activity = time.monotonic()
            consumer.run()
            return consumer
    finally:
        pool.close()


def expected_debits(
    conn: psycopg.Connection[Any], q: Queries, events: list[UsageEvent]
) -> dict[str, Decimal]:
    """Independent expectation: price each distinct event with the pure function and sum."""
    return synthetic.expected_debits(events, catalog.snapshot(conn, q))


def balances(conn: psycopg.Connection[Any]) -> dict[str, Decimal]:
    return {a: b for a, b in conn.execute("SELECT account_id, balance FROM wallets")}


def wait_until(predicate: Any, timeout: float = 60, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(interval)


def assert_audit_clean(conn: psycopg.Connection[Any], q: Queries) -> None:
    """``billing audit`` passes; a failure names the checks that did not."""
    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]
