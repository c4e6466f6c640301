"""The queue side: connections, the topology, and publishers (kombu, no Celery).

* ``billing.usage`` (direct exchange) -> durable queue ``billing.usage``: usage events from the
  gateway, persistent messages, publisher confirms on RabbitMQ.
* ``billing.wallet-events`` (topic exchange): ``wallet.exhausted`` / ``wallet.replenished`` for the
  gateway to subscribe to.

Embedded mode uses kombu's filesystem transport in ``BILLING_DATA_DIR/queue``. It is for demos and
local work only: it removes a message file when delivering it and keeps unacknowledged messages in
the consumer's memory, so a SIGKILLed consumer loses what it held. RabbitMQ redelivers instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from billing.events import UsageEvent, encode_envelope, encode_event
from billing.settings import Settings

USAGE_ROUTING_KEY = "usage"
RETRY_POLICY = {"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 5}


def connection_params(settings: Settings) -> tuple[str, dict[str, Any]]:
    """(URL, transport options) for kombu and Celery alike."""
    if settings.embedded_broker:
        data = settings.queue_dir / "messages"
        control = settings.queue_dir / "control"
        for folder in (data, control):
            folder.mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(data),
            "data_folder_out": str(data),
            "control_folder": str(control),
            "polling_interval": 0.02,
        }
    return settings.broker_url, {"confirm_publish": True}


def connect(settings: Settings) -> Connection:
    url, options = connection_params(settings)
    return Connection(url, transport_options=options, heartbeat=30 if url.startswith("amqp") else 0)


def usage_exchange(settings: Settings) -> Exchange:
    return Exchange(settings.usage_exchange, type="direct", durable=True)


def usage_queue(settings: Settings) -> Queue:
    return Queue(
        settings.usage_queue,
        exchange=usage_exchange(settings),
        routing_key=USAGE_ROUTING_KEY,
        durable=True,
    )


def wallet_events_exchange(settings: Settings) -> Exchange:
    return Exchange(settings.wallet_events_exchange, type="topic", durable=True)


def declare_topology(conn: Connection, settings: Settings) -> None:
    channel = conn.default_channel
    usage_queue(settings)(channel).declare()
    wallet_events_exchange(settings)(channel).declare()


class UsagePublisher:
    """The gateway side: publish ``usage.v1`` events, one per message or in envelopes.

    Messages are persistent; on RabbitMQ each publish waits for the broker's confirm, and a lost
    connection is retried, so a returned ``publish`` means the broker has the message.
    """

    def __init__(self, settings: Settings, connection: Connection | None = None) -> None:
        self.settings = settings
        self._owns = connection is None
        self.connection = connection or connect(settings)
        self._queue = usage_queue(settings)
        self._producer = Producer(self.connection, exchange=usage_exchange(settings))
        self._producer.maybe_declare(self._queue, retry=True, **RETRY_POLICY)

    def publish_raw(self, body: bytes) -> None:
        self._producer.publish(
            body,
            routing_key=USAGE_ROUTING_KEY,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=True,
            retry_policy=RETRY_POLICY,
        )

    def publish(self, event: UsageEvent) -> None:
        self.publish_raw(encode_event(event))

    def publish_many(self, events: Iterable[UsageEvent], envelope_size: int = 1) -> int:
        """Publish events, ``envelope_size`` per message (1 = one event per message)."""
        sent = 0
        for chunk in _chunks(events, envelope_size):
            self.publish_raw(
                encode_event(chunk[0]) if envelope_size == 1 else encode_envelope(chunk)
            )
            sent += len(chunk)
        return sent

    def close(self) -> None:
        if self._owns:
            self.connection.release()

    def __enter__(self) -> UsagePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WalletEventPublisher:
    """Publishes outbox rows to the wallet-events exchange (a ``wallets.Publish``)."""

    def __init__(self, settings: Settings, connection: Connection) -> None:
        self._producer = Producer(connection, exchange=wallet_events_exchange(settings))
        self._producer.maybe_declare(wallet_events_exchange(settings))

    def __call__(self, routing_key: str, body: bytes, message_id: str) -> None:
        self._producer.publish(
            body,
            routing_key=routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            message_id=message_id,
            retry=True,
            retry_policy=RETRY_POLICY,
        )


def _chunks(events: Iterable[UsageEvent], size: int) -> Iterator[list[UsageEvent]]:
    chunk: list[UsageEvent] = []
    for event in events:
        chunk.append(event)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def queue_depth(conn: Connection, settings: Settings) -> int:
    """Messages ready in the usage queue (0 if it does not exist yet)."""
    try:
        channel: Any = conn.channel()  # py-amqp and virtual channels both answer queue_declare
        declared = channel.queue_declare(queue=settings.usage_queue, passive=True)
    except conn.channel_errors:
        return 0
    return int(declared.message_count)


def wait_for_broker(settings: Settings, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(settings) as conn:
                conn.ensure_connection(max_retries=1)
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
