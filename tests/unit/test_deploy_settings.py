"""Deployment settings (queue topology, partitions, upkeep) and the queue arguments they give."""

from __future__ import annotations

import pytest

from billing import broker
from billing.errors import ConfigError
from billing.settings import Settings


def test_defaults_serve_the_embedded_mode() -> None:
    s = Settings.from_env({})
    assert (s.usage_queue_type, s.usage_queue_max_length, s.usage_partitions) == ("classic", 0, 1)
    assert broker.usage_queue_arguments(s) == {}
    assert broker.usage_queue_names(s) == ["billing.usage"]
    assert broker.dead_letter_queue(s) is None
    assert (s.partition_months_ahead, s.payload_retention_days, s.db_pool_size) == (3, 90, 2)


def test_production_topology_arguments() -> None:
    s = Settings.from_env(
        {
            "BILLING_USAGE_QUEUE_TYPE": "quorum",
            "BILLING_USAGE_QUEUE_MAX_LENGTH": "1000",
            "BILLING_USAGE_DEAD_LETTER_EXCHANGE": "dlx",
            "BILLING_USAGE_DELIVERY_LIMIT": "5",
        }
    )
    assert broker.usage_queue_arguments(s) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "dlx",
        "x-max-length": 1000,
        "x-overflow": "reject-publish",
    }
    dlq = broker.dead_letter_queue(s)
    assert dlq is not None and dlq.name == "dlx.queue"


def test_partitions_and_the_ones_a_worker_consumes() -> None:
    s = Settings.from_env(
        {"BILLING_USAGE_PARTITIONS": "4", "BILLING_USAGE_CONSUME_PARTITIONS": "3, 1,1"}
    )
    assert broker.usage_queue_names(s) == [f"billing.usage.{i}" for i in range(4)]
    assert [q.name for q in broker.usage_queues(s, consumed=True)] == [
        "billing.usage.1",
        "billing.usage.3",
    ]
    assert {q.routing_key for q in broker.usage_queues(s)} == {"1"}  # hash ring weights
    assert broker.usage_exchange(s).type == "x-consistent-hash"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BILLING_USAGE_QUEUE_TYPE": "stream"}, "BILLING_USAGE_QUEUE_TYPE must be one of"),
        ({"BILLING_USAGE_QUEUE_MAX_LENGTH": "-1"}, "BILLING_USAGE_QUEUE_MAX_LENGTH must be >= 0"),
        ({"BILLING_USAGE_PARTITIONS": "0"}, "BILLING_USAGE_PARTITIONS must be >= 1"),
        (
            {"BILLING_USAGE_PARTITIONS": "2", "BILLING_USAGE_CONSUME_PARTITIONS": "2"},
            "BILLING_USAGE_CONSUME_PARTITIONS: '2' is not a partition number 0..1",
        ),
        ({"BILLING_USAGE_CONSUME_PARTITIONS": "x"}, "'x' is not a partition number 0..0"),
        ({"BILLING_DB_POOL_SIZE": "many"}, "BILLING_DB_POOL_SIZE must be an integer"),
        ({"BILLING_PARTITION_MONTHS_AHEAD": "0"}, "BILLING_PARTITION_MONTHS_AHEAD must be >= 1"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(env)
