"""The batched usage consumer: up to N events, M messages or T ms, one transaction, then ack.

It is a kombu ``ConsumerMixin`` with its own connection and channel, run by a Celery worker
bootstep on a thread of its own (see ``workers.app``). The loop is single-threaded:

* ``on_message`` decodes the raw body at once (``DecodedBatch.add``) and closes the batch when it
  holds ``BILLING_BATCH_EVENTS`` events or ``BILLING_BATCH_SIZE`` messages;
* ``on_iteration`` (called after every message, or after waiting ``safety_interval`` for one)
  closes a partial batch whose ``BILLING_BATCH_TIMEOUT_MS`` deadline passed, or after
  ``BILLING_BATCH_IDLE_MS`` without a message: the queue is drained, and waiting longer would only
  add latency. With a backlog, messages keep coming and batches fill to their bounds; below
  capacity, batches shrink and an event waits milliseconds, not the whole deadline (group commit);
* ``flush`` calls the one domain function, ``billing.usage.process_decoded``, and acknowledges
  the batch's messages only *after* it returned (the transaction committed): on RabbitMQ with a
  single ``basic.ack(multiple=True)``, elsewhere one ack per message.

Failures: a transient database error is retried with exponential, capped, jittered backoff
(``billing.backoff``) while the messages stay unacknowledged (the broker hands them to no one
else; AMQP heartbeats go on during the waits); nothing is parked for a transient reason. After
``TRANSIENT_RETRY_S`` of failures, or ``MAX_ATTEMPTS`` unexpected errors, the messages are requeued;
the backoff is kept across batches and reset only by a commit, so a database that stays down is
polled at most every ``BACKOFF_MAX_S``, never in a tight loop. A stop request interrupts the wait
(the batch is requeued). Metrics are observed once per batch (``billing.metrics``);
``on_iteration`` beats the liveness heartbeat (``billing.health``).
If the broker connection drops, the buffer is forgotten: the broker redelivers those messages and
the idempotent insert makes the redelivery harmless.

Prefetch is ``BILLING_PREFETCH`` messages, fixed for the consumer's life: RabbitMQ applies a
``basic.qos`` with ``global=false`` only to consumers created after it (an earlier version re-sized
it after each batch, which RabbitMQ ignored), and quorum queues do not support ``global=true``. A
message may hold one event or hundreds, so set it for the messages the gateway sends: the default
(4,000) keeps single events flowing; with envelopes of 100, about 200 keeps two batches in flight
(docs/performance.md, run J).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from kombu import Connection
from kombu.message import Message
from kombu.mixins import ConsumerMixin
from psycopg_pool import ConnectionPool

from billing import broker, metrics
from billing.alerts import AutoTopupTrigger
from billing.backoff import Backoff
from billing.catalog import CatalogCache
from billing.db import Queries, map_error, queries
from billing.errors import Transient
from billing.health import Health
from billing.settings import Settings
from billing.usage import BatchResult, DecodedBatch, process_decoded
from billing.wallets import relay_outbox
from workers import amqp_reads

log = logging.getLogger("billing.usage_consumer")

MAX_ATTEMPTS = 6  # unexpected errors (a bug, not an outage): then requeued, toward the DLQ
# Transient failures (the database down, a missing partition) are retried this long with the
# batch unacknowledged, then requeued. Each requeue counts toward the quorum queue's delivery
# limit (20): an outage has to last hours, not minutes, before a batch reaches the DLQ.
TRANSIENT_RETRY_S = 1800.0
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0
LOOP = "usage-consumer"
OBSERVE_INTERVAL_S = 0.25


class UsageConsumer(ConsumerMixin):
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        connection: Connection,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.connection = connection
        self.q: Queries = queries(settings)
        self.cache = CatalogCache(self.q)
        self.messages: list[Message] = []
        self.batch = DecodedBatch()
        self.deadline = 0.0
        self.last_message = 0.0
        self.idle_s = settings.batch_idle_ms / 1000
        self.totals = BatchResult()
        self.batches = 0
        self._channel: Any = None
        self._depth_channel: Any = None
        self._multiple_ack = False
        self._wallet_publisher: broker.WalletEventPublisher | None = None
        self.backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        self.health = health
        self.consuming = False
        self.live_connection: Any = None  # ConsumerMixin consumes on a clone of ``connection``
        self._received_first = 0.0
        self._next_depth_sample = 0.0
        self._next_observe = 0.0

    # kombu ConsumerMixin hooks -------------------------------------------------------------
    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        self._channel = channel
        self._depth_channel = None  # a new connection: open a new one when sampling
        # basic.ack(multiple=True) is AMQP; kombu's virtual transports ack one tag at a time.
        self._multiple_ack = self.connection.transport.driver_type == "amqp"
        return [
            consumer_cls(
                queues=broker.usage_queues(self.settings, consumed=True),
                on_message=self.on_message,
                prefetch_count=self.settings.prefetch,
                no_ack=False,
            )
        ]

    def on_connection_revived(self) -> None:
        if self.messages:
            log.warning(
                "broker connection lost: %d unacked messages will be redelivered",
                len(self.messages),
            )
        self.messages, self.batch = [], DecodedBatch()
        self._wallet_publisher = None
        metrics.UNACKED.set(0)

    def on_connection_error(self, exc: Any, interval: Any) -> None:
        self.consuming, self.live_connection = False, None
        super().on_connection_error(exc, interval)

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kw: Any) -> None:
        # Long-lived objects (modules, catalog) leave the collector's view; collect young objects
        # less often: a batch allocates many short-lived ones and gen-0 passes were ~30% of decode.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self.consuming, self.live_connection = True, connection
        read_ahead = self.settings.amqp_read_ahead and amqp_reads.install(connection)
        log.info(
            "consuming %s (batch %d events / %d messages / %d ms, prefetch %d, read-ahead %s)",
            self.settings.usage_queue,
            self.settings.batch_events,
            self.settings.batch_size,
            self.settings.batch_timeout_ms,
            self.settings.prefetch,
            "on" if read_ahead else "off",
        )

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        self.flush()  # graceful stop: finish the batch in hand before the channel closes

    def on_iteration(self) -> None:
        now = time.monotonic()
        if self.messages and (now >= self.deadline or now - self.last_message >= self.idle_s):
            self.flush()
        if now >= self._next_observe:  # iterations can be per message: observe a few times a second
            self._next_observe = now + OBSERVE_INTERVAL_S
            self._observe_loop()

    def on_message(self, message: Message) -> None:
        self.last_message = time.monotonic()
        if not self.messages:
            self._received_first = self.last_message
            self.deadline = self._received_first + self.settings.batch_timeout_ms / 1000
        self.messages.append(message)
        self.batch.add(_body(message), self.settings, datetime.now(UTC))
        if (
            len(self.batch) >= self.settings.batch_events
            or len(self.messages) >= self.settings.batch_size
        ):
            self.flush()

    def run(self, _tokens: int = 1, **kwargs: Any) -> Any:
        interval = min(self.settings.batch_timeout_ms / 1000, 0.5)
        return super().run(_tokens, safety_interval=interval, **kwargs)

    def consume(  # type: ignore[override]  # kombu's stub says None; it is a generator
        self,
        limit: int | None = None,
        timeout: float | None = None,
        safety_interval: float = 1,
        **kwargs: Any,
    ) -> Iterator[None]:
        """kombu's loop, but with a batch in hand it waits for the next message only ``idle_s``.

        Then ``on_iteration`` closes the batch at once instead of at the next safety interval.
        (``limit`` and ``timeout`` are not used: this consumer runs until stopped.)
        """
        context: Any = self.consumer_context(**kwargs)  # a context manager (the stub says tuple)
        with context as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                wait = min(self.idle_s, safety_interval) if self.messages else safety_interval
                try:
                    conn.drain_events(timeout=wait)
                except TimeoutError:  # socket.timeout
                    conn.heartbeat_check()
                except OSError:
                    if not self.should_stop:
                        raise
                else:
                    yield None

    # the batch -----------------------------------------------------------------------------
    def flush(self) -> None:
        messages, batch = self.messages, self.batch
        self.messages, self.batch = [], DecodedBatch()
        if not messages:
            return
        started = time.monotonic()
        attempt = unexpected = 0
        while True:
            attempt += 1
            try:
                result = self._record(batch)
                break
            except Transient as exc:
                metrics.observe_failure("transient")
                log.warning("batch of %d failed (attempt %d): %s", len(batch), attempt, exc)
            except Exception:
                unexpected += 1
                metrics.observe_failure("unexpected")
                log.exception(
                    "batch of %d failed unexpectedly (attempt %d, %d/%d unexpected)",
                    len(batch),
                    attempt,
                    unexpected,
                    MAX_ATTEMPTS,
                )
            given_up = unexpected == MAX_ATTEMPTS or time.monotonic() - started >= TRANSIENT_RETRY_S
            if not self._pause(self.backoff.next_delay()) or given_up:
                log.error(
                    "requeueing %d messages after %d failed attempts%s",
                    len(messages),
                    attempt,
                    " (stopping)" if self.should_stop else "",
                )
                for message in messages:
                    message.requeue()
                metrics.REQUEUED.inc()
                metrics.UNACKED.set(0)
                return
        # After the commit, never before.
        if self._multiple_ack:
            messages[-1].ack(multiple=True)
        else:
            for message in messages:
                message.ack()
        self.backoff.reset()
        self.batches += 1
        self.totals = self.totals.merge(result)
        metrics.observe_batch(
            result,
            len(messages),
            time.monotonic() - started,
            batch.events[0].occurred_at if batch.events else None,
        )
        metrics.UNACKED.set(0)
        log.debug("batch %d: %s", self.batches, result)
        if result.crossings:
            self.relay()

    def _record(self, batch: DecodedBatch) -> BatchResult:
        try:
            with self.pool.connection() as conn:
                catalog = self.cache.current(conn)
                return process_decoded(
                    conn, self.q, catalog, batch, max_charge=self.settings.max_event_charge
                )
        except psycopg.Error as exc:
            raise map_error(exc) from exc
        except TimeoutError as exc:  # no pool connection in time: the database is away
            raise Transient(f"database unavailable: {exc}") from exc

    def _pause(self, seconds: float) -> bool:
        """Wait out a backoff delay, still beating (liveness and AMQP heartbeats, so the broker
        keeps the connection and the batch's messages ours); False if a stop was requested."""
        end = time.monotonic() + seconds
        while not self.should_stop:
            left = end - time.monotonic()
            if left <= 0:
                return True
            if self.health is not None:
                self.health.beat(LOOP)
            if self.live_connection is not None:
                self.live_connection.heartbeat_check()
            time.sleep(min(left, 0.1))
        return False

    def _observe_loop(self) -> None:
        """Heartbeat and the batch-in-hand gauges, at most every ``OBSERVE_INTERVAL_S``."""
        now = time.monotonic()
        if self.health is not None:
            self.health.beat(LOOP)
        metrics.UNACKED.set(len(self.messages))
        metrics.OLDEST_UNACKED.set(now - self._received_first if self.messages else 0.0)
        if now >= self._next_depth_sample and self._channel is not None:
            self._next_depth_sample = now + metrics.QUEUE_SAMPLE_S
            self._sample_depth()

    def _sample_depth(self) -> None:
        """Messages ready in the queues this worker consumes, read on a channel of its own.

        Never on the consuming channel: a passive declare of a missing queue closes its channel.
        """
        try:
            if self._depth_channel is None:
                self._depth_channel = self.connection.channel()
            depth = 0
            for queue in broker.usage_queues(self.settings, consumed=True):
                declared = self._depth_channel.queue_declare(queue=queue.name, passive=True)
                depth += int(declared.message_count)
            metrics.QUEUE_DEPTH.set(depth)
        except Exception:  # a gauge must never stop the consumer
            self._depth_channel = None  # closed by the broker, or by a lost connection
            log.debug("queue depth sample failed", exc_info=True)

    def relay(self) -> None:
        """Publish wallet events written by committed batches (best effort; retried later)."""
        try:
            if self._wallet_publisher is None:
                self._wallet_publisher = broker.WalletEventPublisher(self.settings, self.connection)
            with self.pool.connection() as conn:
                relay_outbox(
                    conn, self.q, AutoTopupTrigger(self._wallet_publisher, request_auto_topup)
                )
        except Exception:
            log.exception("outbox relay failed; the rows stay pending and are retried")


def request_auto_topup() -> None:
    """A low-balance alert of an account with auto top-up: check it now, not at the next beat."""
    try:
        from celery import current_app

        current_app.send_task("billing.check_auto_topups")
    except Exception:  # best effort: the beat task checks every 15 s anyway
        log.exception("could not request an auto top-up check")


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()
