"""The batched usage consumer: up to N messages or T milliseconds, one transaction, then ack.

It is a kombu ``ConsumerMixin`` with its own connection and channel, run by a Celery worker
bootstep on a thread of its own (see ``workers.app``), or standalone. The loop is single-threaded:
``on_message`` buffers raw messages, ``on_iteration`` (called at least every ``safety_interval``)
flushes a partial batch whose deadline passed, and ``flush`` calls the one domain function,
``billing.usage.process_batch``, then acknowledges every message of the batch *after* the commit.

Failures: a transient database error is retried with exponential backoff while the messages stay
unacknowledged (the broker will not hand them to anyone else); after ``MAX_ATTEMPTS`` they are
requeued. If the broker connection drops, the buffer is forgotten: the broker redelivers those
messages and the idempotent insert makes the redelivery harmless.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from kombu import Connection
from kombu.message import Message
from kombu.mixins import ConsumerMixin
from psycopg_pool import ConnectionPool

from billing import broker
from billing.catalog import CatalogCache
from billing.db import Queries, map_error, queries
from billing.errors import Transient
from billing.settings import Settings
from billing.usage import BatchResult, process_batch
from billing.wallets import relay_outbox

log = logging.getLogger("billing.usage_consumer")

MAX_ATTEMPTS = 6
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0


class UsageConsumer(ConsumerMixin):
    def __init__(self, settings: Settings, pool: ConnectionPool, connection: Connection) -> None:
        self.settings = settings
        self.pool = pool
        self.connection = connection
        self.q: Queries = queries(settings)
        self.cache = CatalogCache(self.q)
        self.buffer: list[Message] = []
        self.deadline = 0.0
        self.totals = BatchResult()
        self.batches = 0
        self._wallet_publisher: broker.WalletEventPublisher | None = None

    # kombu ConsumerMixin hooks -------------------------------------------------------------
    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        return [
            consumer_cls(
                queues=[broker.usage_queue(self.settings)],
                on_message=self.on_message,
                prefetch_count=self.settings.prefetch,
                no_ack=False,
            )
        ]

    def on_connection_revived(self) -> None:
        if self.buffer:
            log.warning(
                "broker connection lost: %d unacked messages will be redelivered", len(self.buffer)
            )
        self.buffer = []
        self._wallet_publisher = None

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kw: Any) -> None:
        log.info(
            "consuming %s (batch %d / %d ms, prefetch %d)",
            self.settings.usage_queue,
            self.settings.batch_size,
            self.settings.batch_timeout_ms,
            self.settings.prefetch,
        )

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        self.flush()  # graceful stop: finish the batch in hand before the channel closes

    def on_iteration(self) -> None:
        if self.buffer and time.monotonic() >= self.deadline:
            self.flush()

    def on_message(self, message: Message) -> None:
        if not self.buffer:
            self.deadline = time.monotonic() + self.settings.batch_timeout_ms / 1000
        self.buffer.append(message)
        if len(self.buffer) >= self.settings.batch_size:
            self.flush()

    def run(self, _tokens: int = 1, **kwargs: Any) -> Any:
        interval = min(self.settings.batch_timeout_ms / 1000, 0.5)
        return super().run(_tokens, safety_interval=interval, **kwargs)

    # the batch -----------------------------------------------------------------------------
    def flush(self) -> None:
        messages, self.buffer = self.buffer, []
        if not messages:
            return
        bodies = [_body(m) for m in messages]
        delay = BACKOFF_START_S
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                result = self._record(bodies)
                break
            except Transient as exc:
                log.warning(
                    "batch of %d failed (attempt %d/%d): %s",
                    len(messages),
                    attempt,
                    MAX_ATTEMPTS,
                    exc,
                )
            except Exception:
                log.exception(
                    "batch of %d failed unexpectedly (attempt %d/%d)",
                    len(messages),
                    attempt,
                    MAX_ATTEMPTS,
                )
            if attempt < MAX_ATTEMPTS:
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        else:
            log.error(
                "requeueing %d messages after %d failed attempts", len(messages), MAX_ATTEMPTS
            )
            for message in messages:
                message.requeue()
            time.sleep(delay)
            return
        for message in messages:  # after the commit, never before
            message.ack()
        self.batches += 1
        self.totals = self.totals.merge(result)
        log.debug("batch %d: %s", self.batches, result)
        if result.crossings:
            self.relay()

    def _record(self, bodies: list[bytes]) -> BatchResult:
        import psycopg

        try:
            with self.pool.connection() as conn:
                catalog = self.cache.current(conn)
                return process_batch(
                    conn, self.q, catalog, bodies, self.settings, datetime.now(UTC)
                )
        except psycopg.Error as exc:
            raise map_error(exc) from exc
        except TimeoutError as exc:  # no pool connection in time: the database is away
            raise Transient(f"database unavailable: {exc}") from exc

    def relay(self) -> None:
        """Publish wallet events written by committed batches (best effort; retried later)."""
        try:
            if self._wallet_publisher is None:
                self._wallet_publisher = broker.WalletEventPublisher(self.settings, self.connection)
            with self.pool.connection() as conn:
                relay_outbox(conn, self.q, self._wallet_publisher)
        except Exception:
            log.exception("outbox relay failed; the rows stay pending and are retried")


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()
