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
A gateway written in Python publishes through ``BufferedUsagePublisher``: one open envelope per
partition, published when full or after a short linger, so envelopes stay full at any rate.

Embedded mode uses kombu's filesystem transport in ``BILLING_DATA_DIR/queue``. It is for demos and
local work only: it removes a message file when delivering it and keeps unacknowledged messages in
the consumer's memory, so a SIGKILLed consumer loses what it held. RabbitMQ redelivers instead.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import orjson
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.utils.url import url_to_parts

from billing.errors import BillingError, ConfigError, QueueFull
from billing.events import UsageEvent, encode_envelope, encode_event
from billing.settings import Settings

log = logging.getLogger(__name__)

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
            events,
            envelope_size,
            self.settings.usage_partitions,
            self.settings.max_message_bytes,
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


class BufferedUsagePublisher:
    """A gateway's publisher: ``add`` each event as its request ends; events go out in envelopes.

    An envelope carries up to ``BILLING_PUBLISH_ENVELOPE_SIZE`` events of one partition and is
    published when full or, at the latest, ``BILLING_PUBLISH_LINGER_MS`` after its first event (a
    background thread publishes the lingering ones). So envelopes stay large at any rate, and a
    partitioned stream does not turn every call's events into ``partitions`` small messages.
    With a linger of 0 nothing waits for later calls: ``add_many`` publishes its own events.

    Guarantees: every event is published once ``flush`` or ``close`` returned. A publish that fails
    (broker down, queue full past the back-pressure timeout) keeps its envelope; the next ``add``
    retries it first and, if that fails too, raises without taking its event, so the caller
    learns that the broker is refusing while the events already taken stay held. One publish
    runs at a time, under the buffer's lock: while the broker is slow, ``add`` waits for it
    (back-pressure reaches the gateway; the buffer does not grow without bound).
    """

    def __init__(
        self,
        send: Callable[[bytes, str], None],
        *,
        size: int,
        partitions: int = 1,
        linger_ms: int = 50,
        max_bytes: int | None = None,
    ) -> None:
        self._send = send  # (body, routing account): UsagePublisher.publish_raw
        self._max_bytes = max_bytes  # the workers' BILLING_MAX_MESSAGE_BYTES: larger is split
        self._held = OpenEnvelopes(size, partitions, linger_ms / 1000)
        self._unsent: list[list[UsageEvent]] = []  # closed, but their publish failed
        self._lock = threading.Lock()  # the buffer and the channel: one publish at a time
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.error: BaseException | None = None  # the last failed publish, until one succeeds
        self._flusher: threading.Thread | None = None
        if linger_ms > 0:
            self._flusher = threading.Thread(
                target=self._flush_lingering, name="usage-publisher-linger", daemon=True
            )
            self._flusher.start()

    @classmethod
    def for_settings(cls, publisher: UsagePublisher, settings: Settings) -> BufferedUsagePublisher:
        return cls(
            publisher.publish_raw,
            size=settings.publish_envelope_size,
            partitions=settings.usage_partitions,
            linger_ms=settings.publish_linger_ms,
            max_bytes=settings.max_message_bytes,
        )

    @property
    def held(self) -> int:
        """Events taken but not yet published."""
        with self._lock:
            return self._held.events + self._held_unsent()

    def add(self, event: UsageEvent) -> None:
        self.add_many([event])

    def add_many(self, events: Iterable[UsageEvent]) -> None:
        """Take ``events`` (raises, taking none, if earlier envelopes still cannot be published)."""
        events = list(events)  # an iterator that fails part-way fails before any event is taken
        with self._lock:
            if self._closed.is_set():
                raise BillingError("the usage publisher is closed")
            recovered = bool(self._unsent)
            self._publish([])
            wake = recovered or self._held.events == 0  # a new linger, or no more retry pause
            full = [chunk for e in events if (chunk := self._held.add(e)) is not None]
            if self._flusher is None:
                full += self._held.drain()
            self._publish_quietly(full)
        if wake:
            self._wake.set()

    def flush(self) -> None:
        """Publish every event held; raises if one cannot be (it stays held)."""
        with self._lock:
            self._publish(self._held.drain())

    def close(self) -> None:
        """Refuse new events, publish every event held, stop the background thread.

        Closed and flushed under one lock, so no ``add`` slips in between. If the flush raises,
        the events stay held and ``flush`` may be called again.
        """
        try:
            with self._lock:
                self._closed.set()
                self._publish(self._held.drain())
        finally:
            self._wake.set()
            if self._flusher is not None:
                self._flusher.join()

    def __enter__(self) -> BufferedUsagePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _publish(self, chunks: list[list[UsageEvent]]) -> None:
        """Publish the unsent envelopes, then ``chunks``; on failure keep the rest and raise."""
        pending, self._unsent = [*self._unsent, *chunks], []
        for i, chunk in enumerate(pending):
            parts: list[tuple[bytes, list[UsageEvent]]] = []
            sent = 0
            try:  # encoding too: an event that cannot be encoded keeps its envelope held
                parts = sized_bodies(chunk, self._held.size, self._max_bytes)
                for body, part in parts:
                    self._send(body, part[0].account_id)
                    sent += 1
            except BaseException as exc:
                # keep what was not sent: this envelope's parts not sent yet, and the rest
                rest = [part for _body, part in parts[sent:]] if parts else [chunk]
                self._unsent = [*rest, *pending[i + 1 :]]
                self.error = exc
                raise
        self.error = None

    def _publish_quietly(self, chunks: list[list[UsageEvent]]) -> None:
        """``_publish``, keeping a failure for the next call instead of raising it now."""
        try:
            self._publish(chunks)
        except Exception as exc:  # held in _unsent; the next add or flush raises it
            log.warning("publishing usage failed, %d events held: %s", self._held_unsent(), exc)

    def _held_unsent(self) -> int:
        return sum(len(chunk) for chunk in self._unsent)

    def _flush_lingering(self) -> None:
        """Publish envelopes as their linger ends. Woken early by an ``add`` into an empty
        buffer, by an ``add`` that got failed envelopes through, and by ``close``."""
        linger_s = self._held.linger_s
        while not self._closed.is_set():
            with self._lock:
                if self._unsent or self._held.events:
                    self._publish_quietly(self._held.due())
                due_at = self._held.next_due_at()
                retry = bool(self._unsent)
            if retry:  # a failed publish already retried for a while (RETRY_POLICY): pause
                timeout: float | None = max(linger_s, 1.0)
            elif due_at is None:
                timeout = None  # nothing held
            else:
                timeout = max(due_at - self._held.clock(), 0.001)
            self._wake.wait(timeout)
            self._wake.clear()  # state is checked again, under the lock, before any wait


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
    if size <= 1:
        yield from _chunks(events, 1)
        return
    held = OpenEnvelopes(size, partitions)
    for event in events:
        full = held.add(event)
        if full is not None:
            yield full
    yield from held.drain()


class OpenEnvelopes:
    """Events not yet published: one open envelope per partition (a publisher's buffer).

    An envelope closes when it holds ``size`` events (``add`` returns it) or once its first event
    has waited ``linger_s`` (``due``). Events of one account stay in order, as they all go to the
    same envelope. No I/O: the caller publishes what it gets back.
    """

    def __init__(
        self,
        size: int,
        partitions: int = 1,
        linger_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size, self.partitions, self.linger_s, self.clock = size, partitions, linger_s, clock
        # insertion order is opening order: the oldest envelope first
        self._open: dict[int, tuple[float, list[UsageEvent]]] = {}
        self.events = 0

    def add(self, event: UsageEvent) -> list[UsageEvent] | None:
        """Hold ``event``; the envelope it filled, if it did."""
        partition = partition_of(event.account_id, self.partitions)
        opened = self._open.get(partition)
        if opened is None:
            opened = self._open[partition] = (self.clock(), [])
        chunk = opened[1]
        chunk.append(event)
        self.events += 1
        if len(chunk) < self.size:
            return None
        del self._open[partition]
        self.events -= len(chunk)
        return chunk

    def due(self) -> list[list[UsageEvent]]:
        """The envelopes whose first event has waited ``linger_s`` or more, oldest first."""
        now = self.clock()
        closed: list[list[UsageEvent]] = []
        for partition, (opened_at, chunk) in list(self._open.items()):
            if now - opened_at < self.linger_s:
                break  # the rest were opened later
            closed.append(chunk)
            del self._open[partition]
            self.events -= len(chunk)
        return closed

    def next_due_at(self) -> float | None:
        """When the oldest open envelope is due (``clock`` time); None when nothing is held."""
        for opened_at, _chunk in self._open.values():
            return opened_at + self.linger_s
        return None

    def drain(self) -> list[list[UsageEvent]]:
        """Every open envelope, oldest first; nothing is held afterwards."""
        closed = [chunk for _opened_at, chunk in self._open.values()]
        self._open.clear()
        self.events = 0
        return closed


def usage_messages(
    events: Iterable[UsageEvent], size: int, partitions: int = 1, max_bytes: int | None = None
) -> Iterator[tuple[bytes, str, int]]:
    """Each message's body, the account that routes it and its number of events, cut as
    ``envelopes`` cuts them (``size`` 1: plain events, not envelopes of one), an envelope over
    ``max_bytes`` split in halves (``sized_bodies``)."""
    for chunk in envelopes(events, size, partitions):
        for body, part in sized_bodies(chunk, size, max_bytes):
            yield body, part[0].account_id, len(part)


def message_body(chunk: list[UsageEvent], size: int) -> bytes:
    """A message cut for ``size`` events: the plain event when ``size`` is 1, else an envelope."""
    return encode_event(chunk[0]) if size == 1 else encode_envelope(chunk)


def sized_bodies(
    chunk: list[UsageEvent], size: int, max_bytes: int | None
) -> list[tuple[bytes, list[UsageEvent]]]:
    """``chunk``'s message, or, when it is over ``max_bytes`` (the workers' limit,
    ``BILLING_MAX_MESSAGE_BYTES``), its halves, split again until each fits: the workers would
    park a larger message whole as ``too_large``, its events beyond replay. A single event over
    the limit is left as it is (it is parked, and the sender must be fixed)."""
    body = message_body(chunk, size)
    if max_bytes is None or len(body) <= max_bytes or len(chunk) == 1:
        return [(body, chunk)]
    half = len(chunk) // 2
    return sized_bodies(chunk[:half], size, max_bytes) + sized_bodies(chunk[half:], size, max_bytes)


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
    login = (url, user, password)
    _management(*login, "POST", "/api/definitions", definitions, wait_s, "definitions")


def broker_login(broker_url: str, admin: str | None = None) -> tuple[str, str, str]:
    """(user, password, vhost) of an ``amqp://user:password@host:port/vhost`` URL, as kombu logs
    in with it: its own parser, and of a failover list (``url1;url2``) the first URL, which kombu
    and Celery try first (no path: the vhost ``/``). Errors name the variable, never the URL. With
    ``admin``: the billing processes must not log in as that RabbitMQ administrator."""
    try:
        parts = url_to_parts(broker_url.split(";")[0])
    except ValueError:  # a broken IPv6 host
        parts = url_to_parts("")
    if not parts.scheme.startswith(("amqp", "pyamqp")) or not parts.username or not parts.password:
        raise ConfigError(
            "BILLING_BROKER_URL must be amqp://USER:PASSWORD@HOST:PORT/VHOST with a user and a "
            "password (not repeated here)"
        )
    if parts.username == admin:
        raise ConfigError(
            f"BILLING_BROKER_URL logs in as the RabbitMQ administrator {admin!r}: give the billing "
            "processes a user of their own"
        )
    return parts.username, parts.password, parts.path or "/"


def ensure_user(
    url: str, admin: str, admin_password: str, broker_url: str, wait_s: float = 120
) -> str:
    """Create (or update) the RabbitMQ user of ``broker_url`` with its password, no management
    tags, and every permission on its vhost, through the management API; returns its name.

    Idempotent: run on every release, it also applies a rotated password. The administrator's
    own user is refused (updating it would drop its administrator tag)."""
    user, password, vhost = broker_login(broker_url, admin)
    quoted = urllib.parse.quote(user, safe="")
    body = {"password": password, "tags": ""}
    grant = {"configure": ".*", "write": ".*", "read": ".*"}
    login = (url, admin, admin_password)
    users_path = f"/api/users/{quoted}"
    _management(*login, "PUT", users_path, orjson.dumps(body), wait_s, f"user {user!r}", password)
    permissions_path = f"/api/permissions/{urllib.parse.quote(vhost, safe='')}/{quoted}"
    what = f"permissions of {user!r} on vhost {vhost!r}"
    _management(*login, "PUT", permissions_path, orjson.dumps(grant), wait_s, what, password)
    return user


def _management(
    url: str,
    user: str,
    password: str,
    method: str,
    path: str,
    body: bytes,
    wait_s: float,
    what: str,
    secret: str = "",
) -> None:
    """One call of RabbitMQ's management API, retried while it is unreachable. A refusal is a
    ``BillingError`` with RabbitMQ's answer (``secret``, if it appears there, masked)."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"management URL must be http(s)://..., got {url!r}")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (http/https checked above)
        url.rstrip("/") + path,
        data=body,
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30):  # noqa: S310 (scheme checked)
                return
        except urllib.error.HTTPError as exc:
            # masked before the cut: a cut through the secret would leave its start in the message
            detail = _masked(exc.read(65536).decode(errors="replace"), secret)[:500]
            message = f"RabbitMQ refused the {what} ({exc.code}): {detail}"
            raise BillingError(_masked(message, secret)) from None
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BillingError(f"RabbitMQ management API unreachable at {url}: {exc}") from None
            time.sleep(2)


def _masked(text: str, secret: str) -> str:
    """``text`` with ``secret`` replaced by ``***``: as written, as JSON escapes it (once or more:
    an answer may quote a JSON body in a JSON string) and as a URL encodes it."""
    if not secret:
        return text
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}
    for ascii_only in (False, True):
        escaped = secret
        for _ in range(3):
            escaped = json.dumps(escaped, ensure_ascii=ascii_only)[1:-1]
            forms |= {escaped, escaped.replace("/", "\\/")}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


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
