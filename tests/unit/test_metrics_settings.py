"""BILLING_METRICS_PORT and the per-batch metrics (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing import metrics
from billing.errors import ConfigError
from billing.settings import Settings
from billing.usage import BatchResult


def test_metrics_port_defaults_to_9808_and_0_turns_it_off() -> None:
    assert Settings.from_env({}).metrics_port == 9808
    assert Settings.from_env({"BILLING_METRICS_PORT": "0"}).metrics_port == 0
    assert Settings.from_env({"BILLING_METRICS_PORT": "19000"}).metrics_port == 19000
    with pytest.raises(ConfigError, match="BILLING_METRICS_PORT"):
        Settings.from_env({"BILLING_METRICS_PORT": "nine"})


def test_one_batch_moves_every_counter_by_what_it_did() -> None:
    before = {
        name: metrics.value(name)
        for name in (
            "billing_usage_messages_consumed_total",
            "billing_usage_events_consumed_total",
            "billing_usage_events_priced_total",
            "billing_usage_events_debited_total",
            "billing_usage_events_byok_total",
            "billing_usage_events_duplicate_total",
            "billing_usage_batch_events_count",
        )
    }
    parked = metrics.value("billing_usage_events_parked_total", reason="unpriced")
    result = BatchResult(
        items=10, debited=6, byok=1, duplicates=1, parked=2, parked_reasons={"unpriced": 2}
    )
    metrics.observe_batch(result, 4, 0.02, datetime.now(UTC) - timedelta(seconds=30))
    delta = {name: metrics.value(name) - v for name, v in before.items()}
    assert delta == {
        "billing_usage_messages_consumed_total": 4,
        "billing_usage_events_consumed_total": 10,
        "billing_usage_events_priced_total": 7,
        "billing_usage_events_debited_total": 6,
        "billing_usage_events_byok_total": 1,
        "billing_usage_events_duplicate_total": 1,
        "billing_usage_batch_events_count": 1,
    }
    assert metrics.value("billing_usage_events_parked_total", reason="unpriced") - parked == 2
    assert 29 <= metrics.value("billing_usage_event_lag_seconds") < 60
