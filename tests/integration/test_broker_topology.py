"""The production queue topology on real RabbitMQ: quorum queue, length limit with publisher
back-pressure, dead-letter exchange and replay, partitions by account."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import amqp
import psycopg
import pytest
from click.testing import CliRunner
from kombu import Consumer

from billing import broker
from billing.audit import run_audit
from billing.cli import main
from billing.db import Queries
from billing.errors import QueueFull
from billing.events import decode_message
from billing.settings import Settings

from .conftest import worker_env
from .helpers import balances, drain, expected_debits, make_event, open_account


def _cleanup(s: Settings) -> None:
    with broker.connect(s) as conn:
        channel = conn.channel()
        for name in broker.usage_queue_names(s):
            channel.queue_delete(name)
        dlq = broker.dead_letter_queue(s)
        if dlq is not None:
            channel.queue_delete(dlq.name)
            channel.exchange_delete(s.usage_dead_letter_exchange)
        channel.exchange_delete(s.usage_exchange)


@pytest.fixture
def quorum(settings: Settings) -> Iterator[Settings]:
    s = replace(
        settings,
        usage_queue_type="quorum",
        usage_queue_max_length=3,
        usage_dead_letter_exchange=f"{settings.usage_exchange}.dlx",
        publish_backpressure_timeout_s=1,
    )
    try:
        yield s
    finally:
        _cleanup(s)


def test_a_full_queue_refuses_publishes_and_the_publisher_backs_off(
    quorum: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    events = [make_event(f"ev-{i}") for i in range(6)]
    sent = 0
    with broker.UsagePublisher(quorum) as publisher:
        started = time.monotonic()
        with pytest.raises(QueueFull, match=r"is full \(x-max-length 3, reject-publish\)"):
            for event in events:
                publisher.publish(event)
                sent += 1
        # A quorum queue enforces the limit approximately: it may accept one message over it.
        assert 3 <= sent <= 4
        assert 0.9 <= time.monotonic() - started < 10
        assert publisher.refusals >= 2  # retried with backoff before giving up
        with broker.connect(quorum) as bconn:
            assert broker.queue_depth(bconn, quorum) == sent  # nothing dropped, nothing added

    # A publisher blocked by back-pressure goes on as soon as a consumer makes room.
    slow = replace(quorum, publish_backpressure_timeout_s=30)
    outcome: list[object] = []

    def publish_rest() -> None:
        with broker.UsagePublisher(slow) as p:
            try:
                outcome.append(p.publish_many(events[sent:]))
            except Exception as exc:
                outcome.append(exc)

    thread = threading.Thread(target=publish_rest)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # refused, backing off
    drain(quorum, idle=2.0)
    thread.join(timeout=30)
    assert outcome == [len(events) - sent]
    drain(quorum, idle=0.5)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (6,)

    # The queue really is a quorum queue: redeclaring it as classic is refused.
    with broker.connect(quorum) as bconn, pytest.raises(amqp.exceptions.PreconditionFailed):
        bconn.channel().queue_declare(
            quorum.usage_queue, durable=True, arguments={"x-queue-type": "classic"}
        )


def test_a_dead_lettered_message_is_replayed_once(
    quorum: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    event = make_event("ev-dead")
    with broker.UsagePublisher(quorum) as publisher:
        publisher.publish(event)
        publisher.publish(make_event("ev-live"))
    with broker.connect(quorum) as bconn:
        bound = broker.usage_queue(quorum)(bconn.channel())
        message = bound.get(no_ack=False)
        assert message is not None and b"ev-dead" in _bytes(message.body)
        message.reject(requeue=False)  # e.g. past the delivery limit: dead-lettered
        dlq = broker.dead_letter_queue(quorum)
        assert dlq is not None
        deadline = time.monotonic() + 10
        while dlq(bconn.channel()).queue_declare(passive=True).message_count != 1:
            assert time.monotonic() < deadline, "message never reached the dead-letter queue"
            time.sleep(0.1)
    drain(quorum, idle=0.5)
    assert [r[0] for r in conn.execute("SELECT event_id FROM usage_events")] == ["ev-live"]

    env = worker_env(
        quorum,
        BILLING_USAGE_QUEUE_TYPE="quorum",
        BILLING_USAGE_QUEUE_MAX_LENGTH="3",
        BILLING_USAGE_DEAD_LETTER_EXCHANGE=quorum.usage_dead_letter_exchange,
    )
    result = CliRunner(env=env).invoke(
        main, ["broker", "replay-dead-letters"], catch_exceptions=False
    )
    assert result.exit_code == 0 and "republished 1 message(s)" in result.output
    with broker.UsagePublisher(quorum) as publisher:
        publisher.publish(event)  # and a gateway retry of the same event on top
    drain(quorum, idle=0.5)
    debited = conn.execute("SELECT event_id FROM usage_events ORDER BY 1").fetchall()
    assert debited == [("ev-dead",), ("ev-live",)]
    assert run_audit(conn, q).ok


def test_partitions_keep_each_account_on_its_queue(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    s = replace(
        settings,
        usage_exchange=f"{settings.usage_exchange}.by-account",
        usage_partitions=3,
    )
    try:
        accounts = [f"acct-{i:02d}" for i in range(12)]
        for account in accounts:
            open_account(conn, q, account, "10")
        events = [make_event(f"ev-{i}", accounts[i % 12]) for i in range(48)]
        with broker.UsagePublisher(s) as publisher:
            publisher.publish_many(events[:24])  # one event per message
            publisher.publish_many(events[24:], envelope_size=4)  # envelopes, by partition
        queues_of: dict[str, set[str]] = defaultdict(set)
        bodies: dict[str, int] = defaultdict(int)
        accounts_per_message: list[int] = []
        with broker.connect(s) as bconn:
            for queue in broker.usage_queues(s):
                bound = queue(bconn.channel())
                depth = bound.queue_declare(passive=True).message_count
                bodies[queue.name] = depth
                # peek: take every message, note its accounts, then requeue them all
                held = [bound.get(no_ack=False) for _ in range(depth)]
                for message in held:
                    assert message is not None
                    items = decode_message(
                        _bytes(message.body),
                        datetime.now(UTC),
                        s.max_clock_skew,
                        s.max_message_bytes,
                    )
                    for item in items:
                        queues_of[item.account_id or ""].add(queue.name)
                    accounts_per_message.append(len({item.account_id for item in items}))
                for message in held:
                    assert message is not None
                    message.requeue()
        names = broker.usage_queue_names(s)
        # each account in exactly one queue: its partition's (the publisher's CRC-32 of its id)
        assert queues_of == {a: {names[broker.partition_of(a, 3)]} for a in accounts}
        assert max(accounts_per_message) > 1  # an envelope carries a partition, not an account
        assert sum(1 for n in bodies.values() if n) >= 2  # the accounts spread over queues

        # A worker bound to partition 0 drains only its queue; then the others.
        only_first = replace(s, usage_consume_partitions=(0,))
        drain(only_first, idle=0.5)
        first_queue = broker.usage_queue_names(s)[0]
        first_accounts = {a for a, names in queues_of.items() if first_queue in names}
        recorded = {r[0] for r in conn.execute("SELECT DISTINCT account_id FROM usage_events")}
        assert recorded == first_accounts
        drain(replace(s, usage_consume_partitions=(1, 2)), idle=0.5)
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (48,)
        expected = expected_debits(conn, q, events)
        assert {a: Decimal(10) - b for a, b in balances(conn).items()} == expected
    finally:
        _cleanup(s)


def _bytes(body: bytes | str) -> bytes:
    return body if isinstance(body, bytes) else body.encode()


def test_broker_declare_and_depth_commands(quorum: Settings) -> None:
    env = worker_env(
        quorum,
        BILLING_USAGE_QUEUE_TYPE="quorum",
        BILLING_USAGE_QUEUE_MAX_LENGTH="3",
        BILLING_USAGE_DEAD_LETTER_EXCHANGE=quorum.usage_dead_letter_exchange,
    )
    cli = CliRunner(env=env)
    declared = cli.invoke(main, ["broker", "declare"], catch_exceptions=False)
    assert declared.exit_code == 0 and quorum.usage_queue in declared.output
    with broker.UsagePublisher(quorum) as publisher:
        publisher.publish_many([make_event("ev-1"), make_event("ev-2")])
    depth = cli.invoke(main, ["broker", "depth"], catch_exceptions=False)
    assert depth.output.strip() == "2"


def test_rabbitmq_keeps_a_running_consumers_prefetch(settings: Settings) -> None:
    """Why BILLING_PREFETCH is fixed for a consumer's life (workers/usage_consumer.py): a
    ``basic.qos`` with ``global=false`` applies only to consumers started after it, so the worker
    cannot re-size the window of the consumer it has (quorum queues refuse ``global=true``)."""
    held: list[Any] = []
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many([make_event(f"qos-{i}") for i in range(100)])
    with broker.connect(settings) as conn:
        channel = conn.channel()
        consumer = Consumer(
            channel,
            queues=[broker.usage_queue(settings)],
            prefetch_count=5,
            no_ack=False,
            on_message=held.append,
        )
        consumer.consume()

        def settle() -> None:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=0.1)

        settle()
        assert len(held) == 5
        channel.basic_qos(0, 20, False)
        settle()
        assert len(held) == 5  # the running consumer still has its window of 5
        held[-1].ack(multiple=True)
        settle()
        assert len(held) == 10  # acks free that window again: still 5 at a time
        consumer.cancel()


def test_the_buffered_publisher_fills_envelopes_by_partition_across_calls(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """A gateway adding a few events per request: its envelopes fill across requests (one per
    partition), so RabbitMQ holds full envelopes, and every event is debited once."""
    s = replace(
        settings,
        usage_exchange=f"{settings.usage_exchange}.buffered",
        usage_partitions=3,
        publish_envelope_size=8,
        publish_linger_ms=60_000,  # only full envelopes, and close(), publish here
    )
    try:
        accounts = [f"acct-{i:02d}" for i in range(12)]
        for account in accounts:
            open_account(conn, q, account, "10")
        events = [make_event(f"ev-{i}", accounts[(i * 5) % 12]) for i in range(50)]
        with broker.UsagePublisher(s) as publisher:
            gateway = broker.BufferedUsagePublisher.for_settings(publisher, s)
            for i in range(0, 50, 5):  # ten requests of five events
                gateway.add_many(events[i : i + 5])
            gateway.close()
        per_partition: dict[int, int] = defaultdict(int)
        for e in events:
            per_partition[broker.partition_of(e.account_id, 3)] += 1
        with broker.connect(s) as bconn:
            depths = [
                queue(bconn.channel()).queue_declare(passive=True).message_count
                for queue in broker.usage_queues(s)
            ]
        assert depths == [-(-per_partition[j] // 8) for j in range(3)]  # ceil: full, then the rest
        drain(s, idle=0.5)
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (50,)
        expected = expected_debits(conn, q, events)
        assert {a: Decimal(10) - b for a, b in balances(conn).items()} == expected
    finally:
        _cleanup(s)
