"""Prometheus metrics of the usage pipeline (no Celery here: the consumer and the domain share it).

Everything is collected once per batch, never per event: the consumer calls ``observe_batch``
after a batch committed (and ``observe_failure`` when an attempt failed); the queue gauges are
sampled at most every ``QUEUE_SAMPLE_S`` seconds. ``billing.health`` serves them on
``BILLING_METRICS_PORT`` with ``/healthz`` and ``/readyz``.

Counters (``_total``), by meaning:

* ``billing_usage_messages_consumed`` / ``billing_usage_events_consumed``: messages taken from
  the queue in committed batches, and the items they held (an envelope holds many);
* ``billing_usage_events_priced``: items that got a price (recorded, or refused by the database
  after pricing); ``billing_usage_events_debited``: recorded and debited; ``..._byok``: recorded
  at a 0 debit; ``..._duplicate``: already recorded (redeliveries, gateway retries), no effect;
* ``billing_usage_events_parked{reason}``: parked in ``dead_letters`` by reason code;
* ``billing_usage_batch_failures{kind}``: failed attempts (``transient``: retried with backoff;
  ``unexpected``); ``billing_usage_batches_requeued``: batches handed back to the broker.

Histograms: ``billing_usage_batch_events`` (items per batch) and ``billing_usage_batch_seconds``
(decode done to commit). Gauges: ``billing_usage_queue_depth`` (messages ready in the queue),
``billing_usage_unacked_messages`` and ``billing_usage_oldest_unacked_seconds`` (the batch in hand),
``billing_usage_event_lag_seconds`` (at commit, age of the batch's first event by its
``occurred_at``), ``billing_usage_last_batch_timestamp_seconds``.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # the domain may import this module: no import cycle at run time
    from billing.usage import BatchResult

QUEUE_SAMPLE_S = 5.0

MESSAGES = Counter("billing_usage_messages_consumed", "Usage messages in committed batches")
CONSUMED = Counter("billing_usage_events_consumed", "Usage items in committed batches")
PRICED = Counter("billing_usage_events_priced", "Usage events that got a price")
DEBITED = Counter("billing_usage_events_debited", "Usage events recorded and debited")
BYOK = Counter("billing_usage_events_byok", "BYOK usage events recorded at a 0 debit")
DUPLICATES = Counter("billing_usage_events_duplicate", "Usage events already recorded (no effect)")
PARKED = Counter("billing_usage_events_parked", "Usage items parked as dead letters", ["reason"])
FAILURES = Counter("billing_usage_batch_failures", "Failed batch attempts", ["kind"])
REQUEUED = Counter("billing_usage_batches_requeued", "Batches handed back to the broker")
BATCH_EVENTS = Histogram(
    "billing_usage_batch_events",
    "Items per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000),
)
BATCH_SECONDS = Histogram(
    "billing_usage_batch_seconds",
    "Seconds from a closed batch to its commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("billing_usage_queue_depth", "Messages ready in the usage queue (sampled)")
UNACKED = Gauge("billing_usage_unacked_messages", "Messages in the batch in hand")
OLDEST_UNACKED = Gauge(
    "billing_usage_oldest_unacked_seconds", "Age of the oldest message in the batch in hand"
)
EVENT_LAG = Gauge(
    "billing_usage_event_lag_seconds", "At commit: now - occurred_at of the batch's first event"
)
LAST_BATCH = Gauge("billing_usage_last_batch_timestamp_seconds", "Unix time of the last commit")


def observe_batch(
    result: BatchResult, messages: int, seconds: float, first_occurred_at: datetime | None
) -> None:
    """Record one committed batch (a handful of operations whatever its size)."""
    MESSAGES.inc(messages)
    CONSUMED.inc(result.items)
    refused = result.parked_reasons.get("database_rejected", 0)
    PRICED.inc(result.debited + result.byok + refused)
    DEBITED.inc(result.debited)
    BYOK.inc(result.byok)
    DUPLICATES.inc(result.duplicates)
    for reason, n in result.parked_reasons.items():
        PARKED.labels(reason=reason).inc(n)
    BATCH_EVENTS.observe(result.items)
    BATCH_SECONDS.observe(seconds)
    now = time.time()
    LAST_BATCH.set(now)
    if first_occurred_at is not None:
        EVENT_LAG.set(max(0.0, now - first_occurred_at.timestamp()))


def observe_failure(kind: str) -> None:
    FAILURES.labels(kind=kind).inc()


def value(name: str, registry: CollectorRegistry = REGISTRY, **labels: str) -> float:
    """A sample's current value (0 if never set), for tests and the chaos runner."""
    sample = registry.get_sample_value(name, labels or None)
    return float(sample or 0.0)
