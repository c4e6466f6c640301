"""The Celery app: all Celery configuration lives here.

* JSON only (``task_serializer``/``accept_content``), explicit queues (``billing.tasks`` for general
  tasks; ``billing.usage`` is consumed by the batched usage consumer, never by Celery tasks), late
  acks (``task_acks_late``: a task's message is acked after the task returns, i.e. after its
  transaction committed; ``task_reject_on_worker_lost`` requeues it if the worker dies).
* The usage consumer runs as a worker bootstep (``UsageConsumerStep``) on its own thread with its
  own broker connection, so a long general task never stalls usage. Disable it with
  ``BILLING_USAGE_CONSUMER=0`` to run general-only nodes; run usage nodes with the solo pool.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from kombu import Exchange, Queue
from psycopg_pool import ConnectionPool

from billing import broker
from billing.db import make_pool
from billing.health import Health, HealthServer
from billing.settings import Settings
from workers.usage_consumer import UsageConsumer

log = logging.getLogger("billing.worker")

settings = Settings.from_env()
_url, _transport_options = broker.connection_params(settings)


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


app = Celery("billing", include=["workers.tasks"])
app.conf.update(
    broker_url=_url,
    broker_transport_options=_transport_options,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=settings.tasks_queue,
    # Each queue has its own direct exchange and routing key: a Queue without them gets Celery's
    # default exchange and key, and two such queues would both receive every task.
    task_queues=[
        _queue(settings.tasks_queue),
        _queue(settings.exports_queue),  # long exports; `-Q` to dedicate nodes
    ],
    task_default_exchange=settings.tasks_queue,
    task_default_routing_key=settings.tasks_queue,
    task_routes={"billing.export_period": {"queue": settings.exports_queue}},
    task_create_missing_queues=False,
    worker_hijack_root_logger=False,
    worker_enable_remote_control=not settings.embedded_broker,
    beat_schedule={
        "relay-outbox": {"task": "billing.relay_outbox", "schedule": 10.0},
        "check-auto-topups": {"task": "billing.check_auto_topups", "schedule": 15.0},
        "expire-holds": {"task": "billing.expire_holds", "schedule": 30.0},
        "credit-grants": {"task": "billing.credit_grants", "schedule": 60.0},
        "process-pending-stripe-events": {
            "task": "billing.process_pending_stripe_events",
            "schedule": 300.0,
        },
        "ensure-partitions": {"task": "billing.ensure_partitions", "schedule": 6 * 3600.0},
    },
)


class UsageConsumerStep(bootsteps.StartStopStep):
    """Runs the batched usage consumer inside the worker, stopped gracefully with it."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.consumer: UsageConsumer | None = None
        self.thread: threading.Thread | None = None
        self.server: HealthServer | None = None
        self.pool: ConnectionPool | None = None  # a general worker's, for /readyz only

    def start(self, parent: Any) -> None:
        health = Health()
        if settings.metrics_port:
            try:
                self.server = HealthServer(health, settings.metrics_port)
            except OSError as exc:  # e.g. several workers on one host with the same port
                log.error(
                    "cannot serve /metrics, /healthz, /readyz on port %d (%s): give each worker "
                    "on a host its own BILLING_METRICS_PORT; continuing without them",
                    settings.metrics_port,
                    exc,
                )
        if not settings.usage_consumer_enabled:
            # /readyz of a general worker: its tasks need the database (Celery keeps the broker)
            self.pool = make_pool(settings, min_size=0, max_size=1)
            add_database_check(health, self.pool)
            return
        pool = make_pool(settings, min_size=1, max_size=settings.db_pool_size)
        self.consumer = UsageConsumer(settings, pool, broker.connect(settings), health)
        add_readiness_checks(health, self.consumer)
        self.thread = threading.Thread(target=self._run, name="usage-consumer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.consumer is not None
        try:
            self.consumer.run()
        except Exception:
            log.exception("usage consumer stopped")
            raise

    def stop(self, parent: Any) -> None:
        if self.server is not None:
            self.server.close()
        if self.pool is not None:
            self.pool.close()
        if self.consumer is None or self.thread is None:
            return
        self.consumer.should_stop = True
        self.thread.join(timeout=60)
        log.info(
            "usage consumer stopped after %d batches: %s",
            self.consumer.batches,
            self.consumer.totals,
        )
        self.consumer.pool.close()


def add_readiness_checks(health: Health, consumer: UsageConsumer) -> None:
    """/readyz: the consumer consumes, its broker connection is up, the database answers."""

    def consuming() -> tuple[bool, str]:
        return consumer.consuming and not consumer.should_stop, ""

    def broker_up() -> tuple[bool, str]:
        live = consumer.live_connection
        return live is not None and bool(live.connected), ""

    health.add_check("consumer", consuming)
    health.add_check("broker", broker_up)
    add_database_check(health, consumer.pool)


def add_database_check(health: Health, pool: ConnectionPool) -> None:
    """/readyz: the database answers within a second."""

    def database() -> tuple[bool, str]:
        with pool.connection(timeout=1.0) as conn:
            conn.execute("SELECT 1")
        return True, ""

    health.add_check("database", database)


app.steps["worker"].add(UsageConsumerStep)
