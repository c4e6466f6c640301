"""The benchmark's simulated gateway: its hand-assembled frames are the messages py-amqp sends.

``FastPublisher`` writes each message's AMQP frames itself (encoded once, one socket write) to
leave the shared cores to what is measured. RabbitMQ must route and store exactly what py-amqp's
``basic_publish`` would have sent: the body (also one that spans several body frames), the
properties the workers check, persistence and the partition's routing key.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from bench.throughput import FastPublisher, GatewayFraming
from billing import broker
from billing.settings import Settings

from .conftest import BROKER_URL

# a single event, an envelope, and a body spanning three body frames (frame_max is 128 KiB)
BODIES = [b'{"schema":"usage.v1"}', b"[" + b"x" * 40_000 + b"]", bytes(range(32, 127)) * 3_000]


def _settings(tag: str) -> Settings:
    return replace(
        Settings.from_env({}),
        broker_url=BROKER_URL,
        usage_exchange=f"test.bench-publisher.{tag}",
        usage_queue=f"test.bench-publisher.{tag}",
        usage_partitions=2,
    )


def _received(settings: Settings) -> list[tuple[str, bytes, dict[str, object], str]]:
    """(queue, body, properties, routing key) of every message, in queue order."""
    received = []
    with broker.connect(settings) as conn:
        channel = conn.channel()
        for queue in broker.usage_queue_names(settings):
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                body = message.body  # py-amqp decodes it by its content_encoding
                received.append(
                    (
                        queue,
                        body.encode() if isinstance(body, str) else body,
                        message.properties,
                        message.delivery_info["routing_key"],
                    )
                )
    return received


@pytest.mark.parametrize("framing", ["frames", "pyamqp"])
def test_the_simulated_gateway_sends_what_basic_publish_sends(framing: GatewayFraming) -> None:
    settings = _settings(f"{framing}-{uuid.uuid4().hex[:8]}")
    accounts = ["acct-a", "acct-b", "acct-c", "acct-d"]
    gateway = FastPublisher(settings, framing)
    try:
        for account in accounts:
            for body in BODIES:
                gateway.raw(body, account)
        gateway.close()
        received = _received(settings)
    finally:
        with broker.connect(settings) as conn:
            channel = conn.channel()
            for queue in broker.usage_queue_names(settings):
                channel.queue_delete(queue)
            channel.exchange_delete(settings.usage_exchange)

    expected = [
        (
            broker.usage_queue_names(settings)[broker.partition_of(account, 2)],
            body,
            {**broker.PERSISTENT_JSON},
            broker.usage_routing_key(settings, account),
        )
        for account in accounts
        for body in BODIES
    ]
    assert {queue for queue, *_ in expected} == set(broker.usage_queue_names(settings))
    assert sorted(received, key=repr) == sorted(expected, key=repr)
