# ruff: noqa: F811  (pytest fixtures imported from stripe_support are used as parameters)
"""The webhook endpoint: signatures, tolerance, size cap, the inbox, duplicates, real payloads."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from billing.db import Queries
from billing.settings import Settings
from billing.stripe_client import StripeGateway
from billing.topups import create_topup, get_topup, process_pending

from .helpers import assert_audit_clean, open_account
from .stripe_support import (  # noqa: F401  (fixtures)
    OLD_SECRET,
    Endpoint,
    endpoint,
    envelope,
    event_rows,
    fixture,
    gateway,
    ledger_balance,
    localstripe_url,
    stripe_settings,
    topup_books,
    wait_for,
    wallet_balance,
)

D = Decimal


def _stored(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM stripe_events").fetchone()
    assert row is not None
    return int(row[0])


def _pending_topup(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, gateway: StripeGateway
) -> tuple[str, dict[str, Any]]:
    """A top-up whose payment intent exists but has not been paid, and a success event for it."""
    created = create_topup(conn, q, settings, gateway, "acme", D(100), request_key="sec")
    pi = fixture("payment_intent.json")
    pi.update(
        id=created.topup.payment_intent_id,
        amount=10500,
        amount_received=10500,
        status="succeeded",
        metadata={"topup_id": created.topup.topup_id},
        latest_charge=None,
    )
    return created.topup.topup_id, envelope("payment_intent.succeeded", pi)


def test_health(endpoint: Endpoint) -> None:
    response = httpx.get(f"{endpoint.url}/healthz", timeout=5)
    assert response.status_code == 200 and response.json() == {"ok": True}


@pytest.mark.parametrize("attack", ["wrong_secret", "tampered", "replayed", "oversized", "none"])
def test_forged_or_stale_deliveries_are_rejected_and_credit_nothing(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    attack: str,
) -> None:
    open_account(conn, q, "acme", credit="0")
    endpoint.dispatch.hold = True
    topup_id, event = _pending_topup(conn, q, stripe_settings, gateway)
    before = _stored(conn)
    payload = json.dumps(event).encode()
    if attack == "wrong_secret":
        response, reason = endpoint.post(payload, secret="whsec_attacker"), "bad signature"
    elif attack == "tampered":  # signed for 1.00, delivered claiming 10,000.00
        small = json.loads(payload)
        small["data"]["object"]["amount"] = 100
        tampered = json.dumps(event).replace('"amount": 10500', '"amount": 1000000').encode()
        response = endpoint.post(json.dumps(small).encode(), body=tampered)
        reason = "bad signature"
    elif attack == "replayed":  # a genuine signature, an hour old
        response = endpoint.post(payload, timestamp=int(time.time()) - 3600)
        reason = "stale timestamp"
    elif attack == "oversized":
        event["padding"] = "x" * stripe_settings.webhook_max_body_bytes
        response, reason = endpoint.post(event), "larger than"
    else:
        response = httpx.post(f"{endpoint.url}/stripe/webhook", content=payload, timeout=5)
        reason = "missing Stripe-Signature"
    assert response.status_code == (413 if attack == "oversized" else 400)
    assert reason in response.json()["error"]
    assert _stored(conn) == before
    assert process_pending(conn, q, stripe_settings).processed == 0
    assert get_topup(conn, q, topup_id).status == "pending"
    assert wallet_balance(conn, "acme") == 0
    # the same event, correctly signed, is accepted (the test could fail the other way)
    assert endpoint.post(payload).status_code == 200
    endpoint.dispatch.hold = False
    assert process_pending(conn, q, stripe_settings).processed >= 1
    assert wallet_balance(conn, "acme") == D(100)
    assert_audit_clean(conn, q)


def test_a_malformed_but_signed_body_is_rejected(
    conn: psycopg.Connection[Any], endpoint: Endpoint
) -> None:
    for body in (b"not json", b'{"object": "event"}', b"[1, 2]"):
        response = endpoint.post(body)
        assert response.status_code == 400 and "malformed body" in response.json()["error"]
    assert _stored(conn) == 0


def test_a_rotated_out_secret_still_verifies(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    open_account(conn, q, "acme", credit="0")
    _, event = _pending_topup(conn, q, stripe_settings, gateway)
    assert endpoint.post(event, secret=OLD_SECRET).status_code == 200
    endpoint.dispatch.drain()
    assert wallet_balance(conn, "acme") == D(100)
    assert_audit_clean(conn, q)


def test_localstripe_delivery_redelivered_is_processed_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    """A real signed delivery from localstripe, then the same bytes again (as Stripe retries)."""
    open_account(conn, q, "acme", credit="0")
    created = create_topup(
        conn,
        q,
        stripe_settings,
        gateway,
        "acme",
        D(100),
        request_key="dup",
        payment_method="pm_card_visa",
    )
    intent = created.topup.payment_intent_id
    assert intent is not None
    wait_for(
        lambda: (
            [r[1] is not None for r in event_rows(conn, "payment_intent.succeeded", intent)]
            == [True]
        ),
        what="first delivery processed",
    )
    [(event_id, _, outcome, _)] = event_rows(conn, "payment_intent.succeeded", intent)
    assert outcome == "credited"
    raw = conn.execute("SELECT payload FROM stripe_events WHERE event_id = %s", (event_id,))
    payload = bytes(raw.fetchone()[0])  # type: ignore[index]
    for _ in range(3):
        assert endpoint.post(payload).status_code == 200
    endpoint.dispatch.drain()
    [(_, _, outcome, deliveries)] = event_rows(conn, "payment_intent.succeeded", intent)
    assert (outcome, deliveries) == ("credited", 4)
    assert wallet_balance(conn, "acme") == D(100)
    assert ledger_balance(conn, "revenue:fees") == D(5)
    assert_audit_clean(conn, q)


def test_a_lost_hand_off_stays_pending_until_process_pending(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    open_account(conn, q, "acme", credit="0")
    _, event = _pending_topup(conn, q, stripe_settings, gateway)

    endpoint.dispatch.fail = True  # the broker is down: the hand-off raises
    assert endpoint.post(event).status_code == 200  # stored, so Stripe need not retry
    assert wallet_balance(conn, "acme") == 0
    result = process_pending(conn, q, stripe_settings)
    assert (result.processed, result.failed) == (1, 0)
    assert wallet_balance(conn, "acme") == D(100)
    assert process_pending(conn, q, stripe_settings).processed == 0
    assert_audit_clean(conn, q)


@pytest.mark.parametrize(
    "name",
    [
        "zulip_charge_succeeded_with_pi.json",
        "zulip_charge_dispute_created_with_pi.json",
        "zulip_charge_dispute_closed_with_pi.json",
        "zulip_charge_refund_updated.json",
        "zulip_customer_deleted.json",
    ],
)
def test_stripe_published_deliveries_are_accepted_and_recorded(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    name: str,
) -> None:
    """Recorded Stripe envelopes, signed as Stripe signs: stored, acknowledged, nothing moved
    (they are not about our top-ups)."""
    published = fixture(name)
    assert endpoint.post(json.dumps(published).encode()).status_code == 200
    endpoint.dispatch.drain()
    row = conn.execute(
        "SELECT type, outcome, processed_at IS NOT NULL FROM stripe_events WHERE event_id = %s",
        (published["id"],),
    ).fetchone()
    assert row is not None and row[0] == published["type"]
    outcome, processed = row[1], row[2]
    if published["type"] in ("charge.dispute.created", "charge.dispute.closed"):
        assert outcome.startswith("waiting") and not processed  # unknown dispute: kept to retry
    elif published["type"] == "charge.refund.updated":
        # a refund carries no metadata of ours: an unknown failed one may be ours, not known yet
        assert published["data"]["object"]["status"] in ("failed", "canceled")
        assert outcome.startswith("waiting") and not processed
    else:
        assert outcome.startswith("ignored") and processed
    assert ledger_balance(conn, "clearing:stripe") == 0
    assert_audit_clean(conn, q)


def test_the_real_dispute_payload_shape_drives_a_hold(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    """Stripe's recorded dispute delivery, with only the ids pointed at our charge."""
    open_account(conn, q, "acme", credit="0")
    _, success = _pending_topup(conn, q, stripe_settings, gateway)
    success["data"]["object"]["latest_charge"] = f"ch_{uuid.uuid4().hex[:20]}"
    assert endpoint.post(success).status_code == 200
    endpoint.dispatch.drain()
    topup_charge = success["data"]["object"]["latest_charge"]
    event = fixture("zulip_charge_dispute_created_with_pi.json")
    event["data"]["object"]["charge"] = topup_charge
    event["data"]["object"]["payment_intent"] = None  # older shape: only the charge id
    assert endpoint.post(event).status_code == 200
    endpoint.dispatch.drain()
    # 2200 cents disputed of 10500: credit part to_cents(22 * 100/105) = 20.95 held
    assert wallet_balance(conn, "acme") == D("79.05")
    assert ledger_balance(conn, "liability:dispute_holds") == D("20.95")
    closed = fixture("zulip_charge_dispute_closed_with_pi.json")
    closed["data"]["object"]["charge"] = topup_charge
    closed["data"]["object"]["payment_intent"] = None
    assert endpoint.post(closed).status_code == 200
    endpoint.dispatch.drain()
    # the dispute lost: fees 5.00 - 1.05 fee part, clearing 105 - 22 charged back
    assert topup_books(conn, "acme") == (D("79.05"), D("3.95"), D("-83.00"))
    assert_audit_clean(conn, q)


@pytest.mark.slow
def test_served_endpoint_hands_off_to_a_celery_worker(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    localstripe_url: str,
    tmp_path: Any,
) -> None:
    """The production wiring, end to end: `billing webhooks serve` and `billing worker` as real
    processes; localstripe delivers its signed webhook; the Celery task credits the wallet."""
    import subprocess
    import sys

    from .conftest import worker_env
    from .stripe_support import LOCALSTRIPE_EVENTS, SECRET, free_port

    open_account(conn, q, "acme", credit="0")
    env = worker_env(
        stripe_settings,
        BILLING_STRIPE_API_KEY="sk_test_billing",
        BILLING_STRIPE_API_BASE=localstripe_url,
        BILLING_STRIPE_WEBHOOK_SECRET=SECRET,
    )
    port = free_port()
    logs = [open(tmp_path / name, "wb") for name in ("serve.log", "worker.log")]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "billing.cli",
                "webhooks",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "billing.cli",
                "worker",
                "--no-usage",
                "--no-migrate",
                "--loglevel=INFO",
            ],
            env=env,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(url), timeout=30, what="webhook service up")
        httpx.post(
            f"{localstripe_url}/_config/webhooks/billing",
            json={"url": f"{url}/stripe/webhook", "secret": SECRET, "events": LOCALSTRIPE_EVENTS},
            timeout=5,
        ).raise_for_status()
        create_topup(
            conn,
            q,
            stripe_settings,
            gateway,
            "acme",
            D(100),
            request_key="served",
            payment_method="pm_card_visa",
        )
        wait_for(
            lambda: wallet_balance(conn, "acme") == D(100),
            timeout=60,
            what="the worker credited the wallet",
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()
    assert ledger_balance(conn, "revenue:fees") == D(5)
    assert "billing.process_stripe_event" in (tmp_path / "worker.log").read_text()
    assert_audit_clean(conn, q)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_foreign_events_cannot_starve_ours_and_waiting_ones_give_up_listed_and_replayable(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    """Charges and disputes of other products on the same Stripe account, stored before our own
    event whose hand-off was lost: a pending scan of 4 still reaches ours. Charges without our
    metadata are ignored at once (listed as such); unknown disputes wait, then give up into a
    listed state an operator can replay."""
    from click.testing import CliRunner

    from billing.cli import main

    open_account(conn, q, "acme", credit="0")
    endpoint.dispatch.hold = True  # every hand-off lost: only process_pending runs them
    charges, disputes = [], []
    for _ in range(3):
        event = fixture("zulip_charge_succeeded_with_pi.json")
        event["id"] = f"evt_{uuid.uuid4().hex[:24]}"
        event["data"]["object"].update(
            id=f"ch_{uuid.uuid4().hex[:20]}", payment_intent=f"pi_{uuid.uuid4().hex[:20]}"
        )
        charges.append(event["id"])
        assert endpoint.post(event).status_code == 200
    for _ in range(2):
        event = fixture("zulip_charge_dispute_created_with_pi.json")
        event["id"] = f"evt_{uuid.uuid4().hex[:24]}"
        event["data"]["object"].update(
            id=f"du_{uuid.uuid4().hex[:20]}",
            charge=f"ch_{uuid.uuid4().hex[:20]}",
            payment_intent=f"pi_{uuid.uuid4().hex[:20]}",
        )
        disputes.append(event["id"])
        assert endpoint.post(event).status_code == 200
    _, success = _pending_topup(conn, q, stripe_settings, gateway)
    assert endpoint.post(success).status_code == 200
    for _ in range(3):
        process_pending(conn, q, stripe_settings, limit=4)
    assert wallet_balance(conn, "acme") == D(100)
    runner = CliRunner()

    def listed(*args: str) -> set[str]:
        result = runner.invoke(
            main, ["stripe", "events", *args, "--json"], obj={"settings": stripe_settings}
        )
        assert result.exit_code == 0, result.output
        return {row["event_id"] for row in json.loads(result.output)}

    assert listed("--state", "ignored") == set(charges)
    assert listed("--state", "pending") == set(disputes)
    # Stripe stopped retrying long ago: the unknown disputes give up, listed, no longer scanned
    conn.execute(
        "UPDATE stripe_events SET received_at = now() - interval '4 days' WHERE event_id = ANY(%s)",
        (disputes,),
    )
    result = process_pending(conn, q, stripe_settings, limit=4)
    assert (result.processed, result.waiting, result.abandoned) == (0, 0, 2)
    assert listed("--state", "abandoned") == set(disputes)
    assert listed("--state", "pending") == set()
    assert process_pending(conn, q, stripe_settings).abandoned == 0  # not scanned again
    # the operator replays one: processed again now, with a fresh waiting window
    replay = runner.invoke(
        main, ["stripe", "replay", disputes[0]], obj={"settings": stripe_settings}
    )
    assert replay.exit_code == 0 and "waiting" in replay.output, replay.output
    assert listed("--state", "pending") == {disputes[0]}
    assert listed("--state", "abandoned") == {disputes[1]}
    assert_audit_clean(conn, q)
