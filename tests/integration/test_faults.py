# ruff: noqa: F811  (pytest fixtures imported from stripe_support are used as parameters)
"""Focused fault tests: each names the protection it guards and fails without it.

Modes already covered elsewhere (not repeated here): SIGKILL mid-batch and restart
(test_workers.test_sigkill_mid_batch_and_restart_leaves_every_event_debited_once), SIGTERM drain
(test_workers.test_sigterm_drains_the_batch_in_hand), hot wallet with two workers
(test_workers.test_two_workers_on_one_hot_wallet), duplicates published 3+ times
(test_pipeline.test_same_event_published_three_times_debits_once), poison inside an envelope
and each bad input parked with its reason (test_pipeline.test_envelope_with_a_bad_event_bills_...,
test_pipeline.test_each_bad_input_is_parked_with_its_reason_then_replayed_after_a_fix), a row the
database refuses isolated by splitting (test_pipeline.test_a_row_the_database_refuses_...),
overlapping batches in parallel (test_pipeline.test_parallel_batches_...), webhook redelivery and
out-of-order refunds (test_webhooks.test_localstripe_delivery_redelivered_is_processed_once,
test_topups.test_refund_arriving_before_the_success_event_converges). Broker and database
restarts under load run in the chaos runner (test_chaos.py) on private servers.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from billing import broker, db, metrics
from billing.health import Health, HealthServer
from billing.settings import Settings
from billing.stripe_client import StripeGateway
from billing.topups import create_topup, get_topup, process_stripe_event
from workers.app import add_database_check, add_readiness_checks
from workers.usage_consumer import UsageConsumer

from .conftest import worker_env
from .helpers import assert_audit_clean, balances, drain, make_event, open_account, wait_until
from .stripe_support import (  # noqa: F401  (fixtures)
    Endpoint,
    charge_object,
    endpoint,
    envelope,
    event_rows,
    free_port,
    gateway,
    ledger_balance,
    localstripe_url,
    stripe_settings,
    wait_for,
    wallet_balance,
)

D = Decimal


def _fail_first_inserts(conn: psycopg.Connection[Any], failures: int, sqlstate: str) -> None:
    """The next ``failures`` batch inserts fail with a transient SQLSTATE (a sequence counts
    attempts: nextval survives the rollback)."""
    conn.execute("CREATE SEQUENCE insert_attempts")
    conn.execute(f"""
        CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('insert_attempts') <= {failures} THEN
                RAISE EXCEPTION 'simulated transient failure' USING ERRCODE = '{sqlstate}';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER fail_first BEFORE INSERT ON usage_events
            FOR EACH STATEMENT EXECUTE FUNCTION fail_first();""")


def test_a_transient_failure_backs_off_and_retries_without_parking_good_events(
    settings: Settings,
    conn: psycopg.Connection[Any],
    q: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards: the consumer's exponential, jittered backoff on ``Transient`` (no spinning) and
    that a transient error is retried, never treated as bad data (no split, nothing parked)."""
    open_account(conn, q, "acme", "10")
    _fail_first_inserts(conn, 3, "55P03")  # lock_not_available, as in a lock-timeout storm
    events = [make_event(f"tr-{i}") for i in range(40)]
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events, envelope_size=40)  # one message: one batch
    before = metrics.value("billing_usage_batch_failures_total", kind="transient")
    caplog.set_level(logging.WARNING, logger="billing.usage_consumer")
    consumer = drain(settings, idle=1.0)

    failures = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert len(failures) == 3, [r.getMessage() for r in failures]
    assert metrics.value("billing_usage_batch_failures_total", kind="transient") - before == 3
    # Attempt n+1 starts no sooner than half the n-th exponential step (0.2 s * 2**n) after n.
    gaps = [b.created - a.created for a, b in itertools.pairwise(failures)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps
    assert consumer.totals.debited == 40 and consumer.totals.parked == 0
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    assert conn.execute("SELECT last_value FROM insert_attempts").fetchone() == (4,)
    assert_audit_clean(conn, q)


def test_an_outage_longer_than_the_unexpected_error_budget_keeps_the_batch_unacked(
    settings: Settings, conn: psycopg.Connection[Any], q: Any
) -> None:
    """Guards: transient failures do not count toward MAX_ATTEMPTS. A requeue counts toward the
    quorum queue's delivery limit, so requeueing after 6 transient failures sent the batches of
    a long outage to the DLQ; the batch now stays unacknowledged (with AMQP heartbeats) and
    commits when the database is back, without a redelivery."""
    from workers import usage_consumer

    open_account(conn, q, "acme", "10")
    _fail_first_inserts(conn, usage_consumer.MAX_ATTEMPTS + 3, "57P03")  # cannot_connect_now
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many([make_event(f"out-{i}") for i in range(20)], envelope_size=20)
    requeued = metrics.value("billing_usage_batches_requeued_total")
    pool = db.make_pool(settings, min_size=1, max_size=2)
    try:
        with broker.connect(settings) as bconn:
            consumer = UsageConsumer(settings, pool, bconn)
            consumer.backoff = replace(consumer.backoff, start=0.01, cap=0.05)
            thread = threading.Thread(target=consumer.run, daemon=True)
            thread.start()
            wait_until(lambda: consumer.totals.debited == 20, timeout=60)
            consumer.should_stop = True
            thread.join(timeout=30)
    finally:
        pool.close()
    assert metrics.value("billing_usage_batches_requeued_total") == requeued
    assert conn.execute("SELECT last_value FROM insert_attempts").fetchone() == (
        usage_consumer.MAX_ATTEMPTS + 4,
    )
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (20,)
    assert consumer.totals.duplicates == 0  # billed from the first delivery, not a redelivery


def test_a_stop_during_backoff_requeues_the_batch_promptly(
    settings: Settings, conn: psycopg.Connection[Any], q: Any
) -> None:
    """Guards: SIGTERM is not held hostage by a long backoff; the batch in hand is requeued
    (not acked, not parked) so another worker bills it."""
    open_account(conn, q, "acme", "10")
    _fail_first_inserts(conn, 1000, "57014")  # statement timeout, every time
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many([make_event(f"st-{i}") for i in range(10)], envelope_size=10)
    pool = db.make_pool(settings, min_size=1, max_size=2)
    with broker.connect(settings) as bconn:
        consumer = UsageConsumer(settings, pool, bconn)
        consumer.backoff.failures = 10  # already deep into a long outage: waits of 5-10 s
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        wait_until(
            lambda: (
                metrics.value("billing_usage_unacked_messages") > 0
                or consumer.backoff.failures > 10
            ),
            timeout=30,
        )
        wait_until(lambda: consumer.backoff.failures > 10, timeout=30)
        t = time.monotonic()
        consumer.should_stop = True
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert time.monotonic() - t < 2.0
    pool.close()
    conn.execute("DROP TRIGGER fail_first ON usage_events")
    drain(settings)  # the requeued message is still there, and bills now
    assert balances(conn)["acme"] < D(10)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (10,)
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_worker_serves_metrics_health_and_readiness(
    settings: Settings, conn: psycopg.Connection[Any], q: Any, tmp_path: Path
) -> None:
    """Guards: the shared contract: `billing worker` serves /metrics, /healthz, /readyz on
    BILLING_METRICS_PORT, and its counters match what the batch did."""
    open_account(conn, q, "acme", "10")
    port = free_port()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing.cli", "worker", "--no-migrate"],
        env=worker_env(settings, BILLING_METRICS_PORT=str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(base), timeout=60)
        with broker.UsagePublisher(settings) as publisher:
            events = [make_event(f"m-{i}") for i in range(25)]
            publisher.publish_many(events, envelope_size=5)
            publisher.publish_raw(b"{not json")
            publisher.publish(events[0])  # a duplicate
        wait_until(lambda: "billing_usage_events_parked_total" in _get(f"{base}/metrics")[1])
        wait_until(lambda: _metric(base, "billing_usage_events_duplicate_total") == 1)
        assert _metric(base, "billing_usage_events_debited_total") == 25
        assert _metric(base, "billing_usage_events_priced_total") == 25
        assert _metric(base, "billing_usage_messages_consumed_total") == 7
        assert _metric(base, 'billing_usage_events_parked_total{reason="malformed_json"}') == 1
        assert _metric(base, "billing_usage_batch_events_count") >= 1
        assert _metric(base, "billing_usage_batch_seconds_count") >= 1
        assert _metric(base, "billing_usage_queue_depth") is not None
        assert _get(f"{base}/healthz")[0] == 200
        status, body = _get(f"{base}/readyz")
        assert status == 200 and "database: ok" in body and "broker: ok" in body, body
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def _ready(base: str) -> bool:
    try:
        return _get(f"{base}/readyz")[0] == 200
    except OSError:
        return False


def _metric(base: str, name: str) -> float | None:
    for line in _get(f"{base}/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_readiness_and_liveness_fail_when_their_checks_do(settings: Settings) -> None:
    """Guards: /readyz answers 503 (naming the failed check) when the consumer is not consuming
    or the database is unreachable, and /healthz 503 when the consumer loop stops beating."""
    bad = Settings.from_env({"BILLING_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"})
    pool = db.make_pool(bad, min_size=0, max_size=1)
    health = Health(stale_after=0.3)
    server = HealthServer(health, 0, host="127.0.0.1")
    try:
        with broker.connect(settings) as bconn:
            consumer = UsageConsumer(settings, pool, bconn, health)
            add_readiness_checks(health, consumer)
            status, body = _get(f"http://127.0.0.1:{server.port}/readyz")
            assert status == 503
            assert "consumer: failed" in body and "database: failed" in body, body
        general = Health()  # a general worker's /readyz: the database only
        add_database_check(general, pool)
        general_server = HealthServer(general, 0, host="127.0.0.1")
        try:
            status, body = _get(f"http://127.0.0.1:{general_server.port}/readyz")
            assert status == 503 and "database: failed" in body, body
        finally:
            general_server.close()
        health.beat("usage-consumer")
        assert _get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        time.sleep(0.4)
        status, body = _get(f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and "usage-consumer: stale" in body
    finally:
        server.close()
        pool.close()


def test_concurrent_duplicate_and_out_of_order_webhooks_move_money_once(
    conn: psycopg.Connection[Any],
    q: Any,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    """Guards: the row locks taken while a Stripe event is applied (the event's inbox row and
    its top-up) and the state-based processing behind them. The success event, a second delivery
    of the same payment under another event id, and a refund arriving early are each processed by
    several threads at once, in shuffled order: the wallet is credited once and clawed back once.
    (Checked: with the FOR UPDATE clauses of topups.sql removed, the racing threads fail.)"""
    open_account(conn, q, "acme", credit="0")
    endpoint.dispatch.hold = True  # store the deliveries; we process them ourselves
    created = create_topup(
        conn,
        q,
        stripe_settings,
        gateway,
        "acme",
        D(100),
        request_key="concurrent-webhooks",
        payment_method="pm_card_visa",
    )
    intent = created.topup.payment_intent_id
    assert intent is not None
    wait_for(lambda: bool(event_rows(conn, "payment_intent.succeeded", intent)), what="stored")
    [(success_id, _, _, _)] = event_rows(conn, "payment_intent.succeeded", intent)
    stored = conn.execute(
        "SELECT event FROM stripe_events WHERE event_id = %s", (success_id,)
    ).fetchone()
    assert stored is not None
    again = dict(stored[0], id=f"{success_id}_again")  # the same payment, another event id
    assert endpoint.post(again).status_code == 200
    gateway.create_refund(
        key=f"refund-{created.topup.topup_id}", payment_intent_id=intent, amount_cents=2100
    )
    topup = get_topup(conn, q, created.topup.topup_id)
    assert topup.charge_id is not None
    charge = gateway.retrieve_charge(topup.charge_id)
    refund = envelope("charge.refunded", charge_object(charge), amount_refunded=0)
    assert endpoint.post(refund).status_code == 200
    for event_id in (refund["id"], success_id, again["id"]):
        assert endpoint.post(_stored(conn, event_id)).status_code == 200  # duplicate delivery

    work = [success_id, again["id"], refund["id"]] * 4
    random.Random(3).shuffle(work)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(work))

    def process(event_id: str) -> None:
        try:
            with db.connect(stripe_settings) as c:
                barrier.wait(timeout=30)
                process_stripe_event(c, q, stripe_settings, event_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=process, args=(e,)) for e in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for event_id in (success_id, again["id"], refund["id"]):  # whatever lost a race is retried
        process_stripe_event(conn, q, stripe_settings, event_id)
    # 2100 of 10500 cents refunded: credit part 20.00, fee part 1.00
    assert wallet_balance(conn, "acme") == D(80)
    assert ledger_balance(conn, "revenue:fees") == D(4)
    assert ledger_balance(conn, "clearing:stripe") == D(-84)
    assert conn.execute(
        "SELECT count(*) FROM postings WHERE kind = 'topup' AND reference = %s",
        (created.topup.topup_id,),
    ).fetchone() == (1,)
    assert_audit_clean(conn, q)


def _stored(conn: psycopg.Connection[Any], event_id: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT event FROM stripe_events WHERE event_id = %s", (event_id,)
    ).fetchone()
    assert row is not None
    return dict(row[0])


def test_a_worker_whose_metrics_port_is_taken_still_bills(
    settings: Settings, conn: psycopg.Connection[Any], q: Any, tmp_path: Path
) -> None:
    """Guards: the HTTP side never takes the consumer down (several workers on one host with
    the default port): the worker logs the conflict and goes on billing."""
    open_account(conn, q, "acme", "10")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log_path = tmp_path / "worker.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "billing.cli", "worker", "--no-migrate"],
            env=worker_env(settings, BILLING_METRICS_PORT=str(port)),
            stdout=open(log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        try:
            with broker.UsagePublisher(settings) as publisher:
                publisher.publish_many([make_event(f"p-{i}") for i in range(5)])
            wait_until(
                lambda: conn.execute("SELECT count(*) FROM usage_events").fetchone() == (5,),
                timeout=60,
            )
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
    assert f"cannot serve /metrics, /healthz, /readyz on port {port}" in log_path.read_text()
