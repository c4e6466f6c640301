"""The queue side: connections, the topology, and publishers (kombu, no Celery).

* ``billing.usage`` (direct exchange) -> durable queue ``billing.usage``: usage events from the
  gateway, persistent messages, publisher confirms on RabbitMQ.
* ``billing.wallet-events`` (topic exchange): ``wallet.exhausted`` / ``wallet.replenished`` for the
  gateway to subscribe to.

Production topology (settings, see docs/operations.md): the usage queue as a quorum queue
(``BILLING_USAGE_QUEUE_TYPE=quorum``) with a dead-letter exchange (``..._DEAD_LETTER_EXCHANGE``,
fanout, bound to the queue ``<exchange>.queue``) for messages past ``BILLING_USAGE_DELIVERY_LIMIT``
deliveries, and a length limit (``BILLING_USAGE_QUEUE_MAX_LENGTH``) with ``x-overflow:
reject-publish``: a full queue nacks new publishes, which ``UsagePublisher`` treats as
back-pressure (retry with backoff, then ``QueueFull``), never dropping queued messages.
``BILLING_USAGE_PARTITIONS=N`` partitions the usage stream by account over ``<queue>.0`` ..
``<queue>.N-1``: the publisher computes an account's partition (``partition_of``: CRC-32 of the
UTF-8 account id, mod N, which every language's standard library has) and routes on the direct
exchange with the key ``usage.<i>``. So an envelope carries every account of one partition, not
one account; each worker consumes ``BILLING_USAGE_CONSUME_PARTITIONS`` (default: all).

Embedded mode uses kombu's filesystem transport in ``BILLING_DATA_DIR/queue``. It is for demos and
local work only: it removes a message file when delivering it and keeps unacknowledged messages in
the consumer's memory, so a SIGKILLed consumer loses what it held. RabbitMQ redelivers instead.
"""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

from billing.errors import BillingError, ConfigError, QueueFull
from billing.events import UsageEvent, encode_envelope, encode_event
from billing.settings import Settings

USAGE_ROUTING_KEY = "usage"
# Every message we publish: JSON, persistent.
PERSISTENT_JSON: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "delivery_mode": 2,
}
RETRY_POLICY = {"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 5}
BACKPRESSURE_START_S = 0.05
BACKPRESSURE_MAX_S = 2.0


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
    """Direct, partitioned or not: a partitioned publisher names the partition in the key."""
    return Exchange(settings.usage_exchange, type="direct", durable=True)


def partition_of(account_id: str, partitions: int) -> int:
    """The account's partition: CRC-32 (IEEE, as zlib's) of its UTF-8 id, mod ``partitions``.

    Computed by the publisher, so it must be the same function in every gateway's language
    (docs/usage-events.md "Partitioned publishing" has test vectors).
    """
    return zlib.crc32(account_id.encode()) % partitions if partitions > 1 else 0


def assign_partitions(
    events_per_partition: Mapping[int, int], partitions: int, workers: int
) -> list[tuple[int, ...]]:
    """Which partitions each of ``workers`` workers consumes, so that their traffic is even.

    ``events_per_partition``: the traffic each partition carried (``billing broker assign``
    counts recorded usage). Heaviest partition first, each to the worker with the least traffic so
    far (ties: the fewest partitions, then the lowest number): within 4/3 of the best possible
    split, and never worse than the busiest partition alone. Partitions without traffic are spread
    the same way. A modulo assignment (j mod workers) leaves the hottest accounts where the hash
    put them: with Zipf traffic one of 2 workers can get two thirds of the events.
    """
    if workers < 1 or partitions < workers:
        raise ConfigError(f"cannot split {partitions} partition(s) between {workers} worker(s)")
    load = [0] * workers
    owned: list[list[int]] = [[] for _ in range(workers)]
    heaviest_first = sorted(range(partitions), key=lambda j: (-events_per_partition.get(j, 0), j))
    for j in heaviest_first:
        k = min(range(workers), key=lambda i: (load[i], len(owned[i]), i))
        load[k] += events_per_partition.get(j, 0)
        owned[k].append(j)
    return [tuple(sorted(js)) for js in owned]


def events_per_partition(
    events_per_account: Iterable[tuple[str, int]], partitions: int
) -> dict[int, int]:
    """The traffic of each partition from each account's (``assign_partitions``' input)."""
    totals: dict[int, int] = {}
    for account_id, events in events_per_account:
        j = partition_of(account_id, partitions)
        totals[j] = totals.get(j, 0) + events
    return totals


def partition_routing_key(partition: int) -> str:
    """The key partition ``partition``'s queue is bound with, and its messages published with."""
    return f"{USAGE_ROUTING_KEY}.{partition}"


def usage_routing_key(settings: Settings, account_id: str) -> str:
    """``usage``, or ``usage.<partition of the account>`` when the stream is partitioned."""
    if settings.usage_partitions <= 1:
        return USAGE_ROUTING_KEY
    return partition_routing_key(partition_of(account_id, settings.usage_partitions))


def usage_queue_arguments(settings: Settings) -> dict[str, Any]:
    """The usage queue's ``x-`` arguments (ignored by the embedded filesystem transport)."""
    args: dict[str, Any] = {}
    if settings.usage_queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if settings.usage_delivery_limit:
            args["x-delivery-limit"] = settings.usage_delivery_limit
    if settings.usage_dead_letter_exchange:
        args["x-dead-letter-exchange"] = settings.usage_dead_letter_exchange
    if settings.usage_queue_max_length:
        args["x-max-length"] = settings.usage_queue_max_length
        args["x-overflow"] = "reject-publish"
    return args


def usage_queue_names(settings: Settings) -> list[str]:
    """Every usage queue: the one queue, or ``<queue>.0`` .. ``<queue>.N-1`` when partitioned."""
    if settings.usage_partitions <= 1:
        return [settings.usage_queue]
    return [f"{settings.usage_queue}.{i}" for i in range(settings.usage_partitions)]


def usage_queues(settings: Settings, *, consumed: bool = False) -> list[Queue]:
    """The usage queues; ``consumed=True``: only the partitions this worker consumes."""
    names = usage_queue_names(settings)
    keys = [USAGE_ROUTING_KEY]
    if settings.usage_partitions > 1:
        keys = [partition_routing_key(i) for i in range(settings.usage_partitions)]
    bound = list(zip(names, keys, strict=True))
    if consumed and settings.usage_partitions > 1 and settings.usage_consume_partitions:
        bound = [bound[i] for i in settings.usage_consume_partitions]
    return [
        Queue(
            name,
            exchange=usage_exchange(settings),
            routing_key=key,
            durable=True,
            queue_arguments=usage_queue_arguments(settings) or None,
        )
        for name, key in bound
    ]


def usage_queue(settings: Settings) -> Queue:
    """The single usage queue (unpartitioned topology); see ``usage_queues``."""
    return usage_queues(settings)[0]


def dead_letter_exchange(settings: Settings) -> Exchange | None:
    if not settings.usage_dead_letter_exchange:
        return None
    return Exchange(settings.usage_dead_letter_exchange, type="fanout", durable=True)


def dead_letter_queue(settings: Settings) -> Queue | None:
    exchange = dead_letter_exchange(settings)
    if exchange is None:
        return None
    args = {"x-queue-type": "quorum"} if settings.usage_queue_type == "quorum" else None
    return Queue(f"{exchange.name}.queue", exchange=exchange, durable=True, queue_arguments=args)


def wallet_events_exchange(settings: Settings) -> Exchange:
    return Exchange(settings.wallet_events_exchange, type="topic", durable=True)


def declare_topology(conn: Connection, settings: Settings) -> None:
    channel = conn.default_channel
    dlq = dead_letter_queue(settings)
    if dlq is not None:
        dlq(channel).declare()
    for queue in usage_queues(settings):
        queue(channel).declare()
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
        self._producer = Producer(self.connection, exchange=usage_exchange(settings))
        dlq = dead_letter_queue(settings)
        if dlq is not None:
            self._producer.maybe_declare(dlq, retry=True, **RETRY_POLICY)
        for queue in usage_queues(settings):
            self._producer.maybe_declare(queue, retry=True, **RETRY_POLICY)
        self.refusals = 0  # publishes the broker nacked (queue full), retried

    def publish_raw(self, body: bytes, account_id: str = "") -> None:
        """Publish one message; ``account_id`` routes it when the queue is partitioned (every
        event of a partitioned message must be in that account's partition: ``envelopes``).

        A nack (the queue is at ``x-max-length`` with ``reject-publish``) is back-pressure: the
        publish is retried with exponential backoff for ``BILLING_PUBLISH_BACKPRESSURE_TIMEOUT_S``,
        then ``QueueFull`` is raised. The message was not enqueued; the caller still owns it.
        """
        routing_key = usage_routing_key(self.settings, account_id)
        deadline = time.monotonic() + self.settings.publish_backpressure_timeout_s
        delay = BACKPRESSURE_START_S
        while True:
            try:
                self._producer.publish(
                    body,
                    routing_key=routing_key,
                    retry=True,
                    retry_policy=RETRY_POLICY,
                    **PERSISTENT_JSON,
                )
                return
            except (MessageNacked, OperationalError) as exc:
                if not _nacked(exc):
                    raise
                self.refusals += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(
                        f"the broker refused the message: queue {self.settings.usage_queue!r} is "
                        f"full (x-max-length {self.settings.usage_queue_max_length}, "
                        f"reject-publish); gave up after "
                        f"{self.settings.publish_backpressure_timeout_s} s of retries"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, BACKPRESSURE_MAX_S)

    def publish(self, event: UsageEvent) -> None:
        self.publish_raw(encode_event(event), event.account_id)

    def publish_many(self, events: Iterable[UsageEvent], envelope_size: int = 1) -> int:
        """Publish events, ``envelope_size`` per message (1 = one event per message).

        Partitioned: an envelope carries the events of one partition (see ``envelopes``).
        """
        sent = 0
        for body, account_id, count in usage_messages(
            events, envelope_size, self.settings.usage_partitions
        ):
            self.publish_raw(body, account_id)
            sent += count
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
            message_id=message_id,
            retry=True,
            retry_policy=RETRY_POLICY,
            **PERSISTENT_JSON,
        )


def _nacked(exc: BaseException) -> bool:
    """A broker nack of a confirmed publish (kombu may wrap it in ``OperationalError``)."""
    return isinstance(exc, MessageNacked) or isinstance(exc.__cause__, MessageNacked)


def envelopes(
    events: Iterable[UsageEvent], size: int, partitions: int = 1
) -> Iterator[list[UsageEvent]]:
    """The events as messages of up to ``size`` events, each account's events in order.

    Partitioned (``partitions`` > 1), a message is routed to one partition, so an envelope carries
    the events of the accounts of one partition (``partition_of``): a gateway's batch of 100
    events becomes about ``partitions`` envelopes, not one per account.
    """
    if partitions <= 1 or size <= 1:
        yield from _chunks(events, size)
        return
    open_envelopes: dict[int, list[UsageEvent]] = {}
    for event in events:
        partition = partition_of(event.account_id, partitions)
        chunk = open_envelopes.setdefault(partition, [])
        chunk.append(event)
        if len(chunk) >= size:
            yield chunk
            del open_envelopes[partition]
    yield from open_envelopes.values()


def usage_messages(
    events: Iterable[UsageEvent], size: int, partitions: int = 1
) -> Iterator[tuple[bytes, str, int]]:
    """Each message's body, the account that routes it and its number of events, cut as
    ``envelopes`` cuts them (``size`` 1: plain events, not envelopes of one)."""
    for chunk in envelopes(events, size, partitions):
        body = encode_event(chunk[0]) if size == 1 else encode_envelope(chunk)
        yield body, chunk[0].account_id, len(chunk)


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
    """Messages ready in the usage queue(s) (0 for a queue that does not exist yet)."""
    total = 0
    for name in usage_queue_names(settings):
        try:
            channel: Any = conn.channel()  # py-amqp and virtual channels answer queue_declare
            declared = channel.queue_declare(queue=name, passive=True)
        except conn.channel_errors:
            continue
        total += int(declared.message_count)
    return total


def shovel_dead_letters(conn: Connection, settings: Settings, limit: int | None = None) -> int:
    """Republish messages from the dead-letter queue to the usage exchange; returns how many.

    Each is acknowledged only after its publish was confirmed, so a crash repeats at most one
    message, which the idempotent insert makes harmless.
    """
    dlq = dead_letter_queue(settings)
    if dlq is None:
        return 0
    publisher = UsagePublisher(settings, conn)
    moved = 0
    bound = dlq(conn.channel())
    while limit is None or moved < limit:
        message = bound.get(no_ack=False)
        if message is None:
            break
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        publisher.publish_raw(body, _account_of(body))
        message.ack()
        moved += 1
    return moved


def _account_of(body: bytes) -> str:
    """The account id that routes a dead-lettered message (first event's; "" if unreadable)."""
    try:
        data = orjson.loads(body)
        if isinstance(data, dict) and isinstance(data.get("events"), list) and data["events"]:
            data = data["events"][0]
        account = data.get("account_id", "") if isinstance(data, dict) else ""
        return account if isinstance(account, str) else ""
    except Exception:
        return ""


def import_definitions(
    url: str, user: str, password: str, definitions: bytes, wait_s: float = 120
) -> None:
    """POST a definitions file to RabbitMQ's management API (``/api/definitions``).

    Retried while the API is not up yet (a node still booting); a refusal (bad credentials, an
    invalid file, a queue redeclared with other arguments) is a ``BillingError`` with the answer.
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"management URL must be http(s)://..., got {url!r}")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (http/https checked above)
        url.rstrip("/") + "/api/definitions",
        data=definitions,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30):  # noqa: S310 (scheme checked)
                return
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise BillingError(f"RabbitMQ refused the definitions ({exc.code}): {detail}") from None
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BillingError(f"RabbitMQ management API unreachable at {url}: {exc}") from None
            time.sleep(2)


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
