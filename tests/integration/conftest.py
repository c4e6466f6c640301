"""Integration fixtures: a real PostgreSQL and a real RabbitMQ, each test isolated.

* PostgreSQL: the migrations and the shipped catalog are applied once to a template database;
  every test gets its own database cloned from it (``CREATE DATABASE .. TEMPLATE``), dropped after.
* RabbitMQ: every test gets its own exchange and queue names, deleted after.

``BILLING_TEST_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) and
``BILLING_TEST_BROKER_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``) point elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from billing import broker, catalog, db
from billing.db import Queries
from billing.settings import Settings

ADMIN_URL = os.environ.get(
    "BILLING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER_URL = os.environ.get("BILLING_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
TEMPLATE = f"billing_test_template_{os.getpid()}"


def _url_for(database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL, autocommit=True)


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    base = Settings.from_env({"BILLING_DATABASE_URL": _url_for(TEMPLATE)})
    with psycopg.connect(_url_for(TEMPLATE), autocommit=True) as conn:
        db.migrate(conn, base.sql_dir)
        catalog.load_versions(
            conn,
            db.queries(base),
            catalog.read_catalog_file(catalog.DEFAULT_CATALOG),
            now=datetime.now(UTC),
            loaded_by="tests",
        )
    yield TEMPLATE
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )


@pytest.fixture
def settings(template_db: str, tmp_path: Any) -> Iterator[Settings]:
    name = f"billing_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    tag = uuid.uuid4().hex[:10]
    s = replace(
        Settings.from_env({}),
        data_dir=tmp_path,
        database_url=_url_for(name),
        broker_url=BROKER_URL,
        usage_exchange=f"test.usage.{tag}",
        usage_queue=f"test.usage.{tag}",
        wallet_events_exchange=f"test.wallet-events.{tag}",
        tasks_queue=f"test.tasks.{tag}",
        exports_queue=f"test.exports.{tag}",
        batch_timeout_ms=50,
    )
    try:
        yield s
    finally:
        _delete_broker_entities(s)
        with _admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _delete_broker_entities(s: Settings) -> None:
    try:
        with broker.connect(s) as conn:
            channel = conn.channel()
            for queue in (s.usage_queue, s.tasks_queue, s.exports_queue):
                channel.queue_delete(queue)
            for exchange in (
                s.usage_exchange,
                s.wallet_events_exchange,
                s.tasks_queue,
                s.exports_queue,
            ):
                channel.exchange_delete(exchange)
    except Exception:  # best effort: a test may have stopped the broker
        pass


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(settings) as connection:
        yield connection


@pytest.fixture
def q(settings: Settings) -> Queries:
    return db.queries(settings)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `billing worker` subprocess bound to this test's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": settings.database_url,
            "BILLING_BROKER_URL": settings.broker_url,
            "BILLING_DATA_DIR": str(settings.data_dir),
            "BILLING_USAGE_EXCHANGE": settings.usage_exchange,
            "BILLING_USAGE_QUEUE": settings.usage_queue,
            "BILLING_WALLET_EVENTS_EXCHANGE": settings.wallet_events_exchange,
            "BILLING_TASKS_QUEUE": settings.tasks_queue,
            "BILLING_EXPORTS_QUEUE": settings.exports_queue,
            "BILLING_BATCH_TIMEOUT_MS": str(settings.batch_timeout_ms),
            # workers of concurrent tests share the host: no fixed metrics port unless asked
            "BILLING_METRICS_PORT": "0",
            **extra,
        }
    )
    return env
