# ruff: noqa: F811  (pytest fixtures imported from stripe_support are used as parameters)
"""Top-ups end to end on localstripe: charge, credit, refunds, disputes, checkout, auto top-up.

Every scenario ends with ``billing audit`` clean.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from billing import catalog, db
from billing.db import Queries
from billing.errors import BillingError, IdempotencyConflict, StripeUnavailable
from billing.events import encode_event
from billing.settings import Settings
from billing.stripe_client import StripeGateway
from billing.topups import (
    AUTO_TOPUP_FAILED,
    FROZEN,
    UNFROZEN,
    check_auto_topups,
    create_topup,
    disable_auto_topup,
    ensure_customer,
    get_topup,
    process_pending,
    process_stripe_event,
    reconcile,
    set_auto_topup,
)
from billing.usage import decode_and_price, record_isolating

from .helpers import assert_audit_clean, make_event, open_account
from .stripe_support import (  # noqa: F401  (fixtures)
    Endpoint,
    charge_object,
    dispute_object,
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


def _processed(conn: psycopg.Connection[Any], event_type: str, intent_id: str) -> bool:
    rows = event_rows(conn, event_type, intent_id)
    return bool(rows) and all(r[1] is not None for r in rows)


def _paid_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    gateway: StripeGateway,
    account: str,
    amount: str = "100",
) -> str:
    """A $amount top-up paid with a test card; returns the top-up id once credited."""
    created = create_topup(
        conn,
        q,
        settings,
        gateway,
        account,
        D(amount),
        request_key=f"k-{uuid.uuid4()}",
        payment_method="pm_card_visa",
    )
    intent = created.topup.payment_intent_id
    assert intent is not None
    wait_for(lambda: _processed(conn, "payment_intent.succeeded", intent), what="credit")
    return created.topup.topup_id


def _outbox(conn: psycopg.Connection[Any], key: str, account: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM outbox WHERE routing_key = %s AND payload->>'account_id' = %s",
        (key, account),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _intents_for(localstripe_url: str, topup_id: str) -> list[dict[str, Any]]:
    data = httpx.get(
        f"{localstripe_url}/v1/payment_intents",
        params={"limit": 1000},
        auth=("sk_test_billing", ""),
        timeout=10,
    ).json()["data"]
    return [pi for pi in data if pi["metadata"].get("topup_id") == topup_id]


def _charge(
    gateway: StripeGateway, topup_id: str, conn: psycopg.Connection[Any], q: Queries
) -> dict[str, Any]:
    topup = get_topup(conn, q, topup_id)
    assert topup.charge_id is not None
    return gateway.retrieve_charge(topup.charge_id)


def test_a_100_dollar_topup_charges_105_and_credits_100(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    topup = get_topup(conn, q, topup_id)
    assert (topup.credit, topup.fee, topup.charged) == (D(100), D(5), D(105))
    assert topup.status == "succeeded"
    [intent] = _intents_for(localstripe_url, topup_id)
    assert intent["amount"] == 10500 and intent["currency"] == "usd"
    assert intent["metadata"]["credit"] == "100.00" and intent["metadata"]["fee"] == "5.00"
    assert topup_books(conn, "acme") == (D(100), D(5), D(-105))
    assert _outbox(conn, "wallet.replenished", "acme") == 1
    assert reconcile(conn, q, gateway, datetime.now(UTC) - timedelta(minutes=5)) == []
    assert_audit_clean(conn, q)


def test_a_retried_create_with_the_same_key_charges_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    open_account(conn, q, "acme", credit="0")
    key = f"order-{uuid.uuid4()}"
    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with db.connect(stripe_settings) as c:
                created = create_topup(
                    c,
                    q,
                    stripe_settings,
                    gateway,
                    "acme",
                    D("20"),
                    request_key=key,
                    payment_method="pm_card_visa",
                )
                results.append(created.topup.topup_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    create()  # and once more, after the others finished
    assert not errors
    assert len(set(results)) == 1
    assert len(_intents_for(localstripe_url, results[0])) == 1
    intent = get_topup(conn, q, results[0]).payment_intent_id
    assert intent is not None
    wait_for(lambda: _processed(conn, "payment_intent.succeeded", intent), what="credit")
    assert wallet_balance(conn, "acme") == D(20)
    assert_audit_clean(conn, q)


def test_refund_arriving_before_the_success_event_converges(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    open_account(conn, q, "acme", credit="0")
    endpoint.dispatch.hold = True  # the success event is stored but not processed yet
    created = create_topup(
        conn,
        q,
        stripe_settings,
        gateway,
        "acme",
        D(100),
        request_key="early-refund",
        payment_method="pm_card_visa",
    )
    intent = created.topup.payment_intent_id
    assert intent is not None
    wait_for(lambda: bool(event_rows(conn, "payment_intent.succeeded", intent)), what="stored")
    [(success_id, processed, _, _)] = event_rows(conn, "payment_intent.succeeded", intent)
    assert processed is None and wallet_balance(conn, "acme") == 0
    gateway.create_refund(
        key=f"refund-{created.topup.topup_id}-1", payment_intent_id=intent, amount_cents=2100
    )
    charge = _charge(gateway, created.topup.topup_id, conn, q)
    assert charge["amount_refunded"] == 2100
    refund_event = envelope("charge.refunded", charge_object(charge), amount_refunded=0)
    assert endpoint.post(refund_event).status_code == 200
    # the refund is processed first, then the success event
    assert "credited" in process_stripe_event(conn, q, stripe_settings, refund_event["id"]).text
    assert "duplicate" not in process_stripe_event(conn, q, stripe_settings, success_id).text
    assert process_stripe_event(conn, q, stripe_settings, success_id).text.startswith("duplicate")
    # 2100 of 10500 refunded: credit part to_cents(21 * 100/105) = 20.00, fee part 1.00
    assert topup_books(conn, "acme") == (D(80), D(4), D(-84))
    topup = get_topup(conn, q, created.topup.topup_id)
    assert (topup.refunded_credit, topup.refunded_fee) == (D(20), D(1))
    assert reconcile(conn, q, gateway, datetime.now(UTC) - timedelta(minutes=5)) == []
    assert_audit_clean(conn, q)


def test_partial_refunds_in_any_order_and_twice_claw_back_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    events = []
    for n, cents in enumerate((1000, 2000), start=1):
        gateway.create_refund(
            key=f"refund-{topup_id}-{n}", payment_intent_id=intent, amount_cents=cents
        )
        events.append(
            envelope("charge.refunded", charge_object(_charge(gateway, topup_id, conn, q)))
        )
    assert [e["data"]["object"]["amount_refunded"] for e in events] == [1000, 3000]
    # the later (cumulative 3000) first, then the stale 1000, then both again
    for event in (events[1], events[0], events[1], events[0]):
        assert endpoint.post(event).status_code == 200
        endpoint.dispatch.drain()
    # 3000 of 10500: credit to_cents(30 * 100/105 = 28.5714..) = 28.57, fee 1.43
    assert wallet_balance(conn, "acme") == D("71.43")
    assert ledger_balance(conn, "revenue:fees") == D("3.57")
    topup = get_topup(conn, q, topup_id)
    assert (topup.refunded_credit, topup.refunded_fee) == (D("28.57"), D("1.43"))
    assert reconcile(conn, q, gateway, datetime.now(UTC) - timedelta(minutes=5)) == []
    # the rest: a full refund gives back exactly the credit and the fee
    gateway.create_refund(key=f"refund-{topup_id}-3", payment_intent_id=intent, amount_cents=7500)
    assert (
        endpoint.post(
            envelope("charge.refunded", charge_object(_charge(gateway, topup_id, conn, q)))
        ).status_code
        == 200
    )
    endpoint.dispatch.drain()
    assert topup_books(conn, "acme") == (0, 0, 0)
    assert reconcile(conn, q, gateway, datetime.now(UTC) - timedelta(minutes=5)) == []
    assert_audit_clean(conn, q)


@pytest.mark.parametrize("closed_first", [False, True])
@pytest.mark.parametrize("result", ["won", "lost"])
def test_dispute_holds_and_freezes_then_releases_or_is_lost(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    result: str,
    closed_first: bool,
) -> None:
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    topup = get_topup(conn, q, topup_id)
    assert topup.charge_id and topup.payment_intent_id
    dispute_id = f"du_{uuid.uuid4().hex[:20]}"
    opened = envelope(
        "charge.dispute.created",
        dispute_object(
            topup.charge_id, topup.payment_intent_id, 10500, "needs_response", dispute_id
        ),
    )
    closed = envelope(
        "charge.dispute.closed",
        dispute_object(topup.charge_id, topup.payment_intent_id, 10500, result, dispute_id),
        status="needs_response",
    )
    first, second = (closed, opened) if closed_first else (opened, closed)
    assert endpoint.post(first).status_code == 200
    endpoint.dispatch.drain()
    if not closed_first:
        assert wallet_balance(conn, "acme") == 0  # 100 of credit held
        assert ledger_balance(conn, "liability:dispute_holds") == D(100)
        assert conn.execute("SELECT frozen FROM wallets WHERE account_id = 'acme'").fetchone() == (
            True,
        )
        assert _outbox(conn, FROZEN, "acme") == 1
        assert_audit_clean(conn, q)
    assert endpoint.post(second).status_code == 200
    assert endpoint.post(first).status_code == 200  # a redelivery changes nothing
    endpoint.dispatch.drain()
    assert conn.execute("SELECT frozen FROM wallets WHERE account_id = 'acme'").fetchone() == (
        False,
    )
    assert _outbox(conn, FROZEN, "acme") == 1 and _outbox(conn, UNFROZEN, "acme") == 1
    assert ledger_balance(conn, "liability:dispute_holds") == 0
    if result == "won":
        assert topup_books(conn, "acme") == (D(100), D(5), D(-105))
    else:
        assert topup_books(conn, "acme") == (0, 0, 0)
    assert_audit_clean(conn, q)


def test_a_dispute_on_a_wallet_already_spent_goes_negative_and_usage_still_records(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    settings: Settings,
) -> None:
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme", amount="10")
    conn.execute("SELECT 1")
    from billing import wallets

    wallets.adjust(conn, q, "acme", D("-9"), reason="spent", actor="tests")
    topup = get_topup(conn, q, topup_id)
    assert topup.charge_id and topup.payment_intent_id
    event = envelope(
        "charge.dispute.created",
        dispute_object(
            topup.charge_id, topup.payment_intent_id, 1050, "needs_response", "du_spent"
        ),
    )
    assert endpoint.post(event).status_code == 200
    endpoint.dispatch.drain()
    assert wallet_balance(conn, "acme") == D(-9)
    _debit(conn, q, settings, "acme", "frozen-usage")  # usage on a frozen wallet still records
    assert wallet_balance(conn, "acme") < D(-9)
    assert_audit_clean(conn, q)


def test_checkout_session_completed_credits_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    gateway: StripeGateway,
) -> None:
    """localstripe has no Checkout: Stripe's published session object stands in for its answer."""

    class CheckoutStripe(StripeGateway):
        def create_checkout_session(self, **kw: Any) -> dict[str, Any]:
            session = fixture("checkout_session.json")
            session.update(
                id=f"cs_test_{kw['topup_id']}",
                payment_intent=None,
                client_reference_id=kw["topup_id"],
                metadata=dict(kw["metadata"]),
                customer=kw["customer_id"],
                amount_total=kw["credit_cents"] + kw["fee_cents"],
                currency="usd",
            )
            self.key = kw["key"]
            return session

    stripe = CheckoutStripe(stripe_settings)
    open_account(conn, q, "acme", credit="0")
    created = create_topup(
        conn,
        q,
        stripe_settings,
        stripe,
        "acme",
        D(100),
        request_key="co-1",
        checkout=True,
        success_url="https://example.com/ok",
        cancel_url="https://example.com/cancel",
    )
    assert created.checkout_url and stripe.key.endswith(f"{created.topup.topup_id}:checkout")
    session = fixture("checkout_session.json")
    session.update(
        id=created.topup.checkout_session_id,
        status="complete",
        payment_status="paid",
        amount_total=10500,
        currency="usd",
        payment_intent="pi_from_checkout",
        client_reference_id=created.topup.topup_id,
        metadata={"topup_id": created.topup.topup_id},
    )
    completed = envelope("checkout.session.completed", session)
    for _ in range(2):
        assert endpoint.post(completed).status_code == 200
        endpoint.dispatch.drain()
    assert wallet_balance(conn, "acme") == D(100)
    assert get_topup(conn, q, created.topup.topup_id).payment_intent_id == "pi_from_checkout"
    # a tampered amount is refused, not credited
    other = create_topup(
        conn,
        q,
        stripe_settings,
        stripe,
        "acme",
        D(50),
        request_key="co-2",
        checkout=True,
        success_url="https://example.com/ok",
        cancel_url="https://example.com/cancel",
    )
    session.update(
        id=other.topup.checkout_session_id,
        amount_total=100,
        client_reference_id=other.topup.topup_id,
        metadata={"topup_id": other.topup.topup_id},
        payment_intent=None,
    )
    wrong = envelope("checkout.session.completed", session)
    assert endpoint.post(wrong).status_code == 200
    endpoint.dispatch.drain()
    assert wallet_balance(conn, "acme") == D(100)
    outcome = conn.execute(
        "SELECT outcome FROM stripe_events WHERE event_id = %s", (wrong["id"],)
    ).fetchone()
    assert outcome is not None and "amount mismatch" in outcome[0]
    assert_audit_clean(conn, q)


# --- auto top-up ----------------------------------------------------------------------------
def _saved_card(gateway: StripeGateway, localstripe_url: str, customer: str, number: str) -> str:
    pm = httpx.post(
        f"{localstripe_url}/v1/payment_methods",
        data={
            "type": "card",
            "card[number]": number,
            "card[exp_month]": "12",
            "card[exp_year]": "2030",
            "card[cvc]": "123",
        },
        auth=("sk_test_billing", ""),
        timeout=10,
    ).json()
    gateway.attach_payment_method(pm["id"], customer)
    return str(pm["id"])


def _debit(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, account: str, event_id: str
) -> None:
    priced, rejected = decode_and_price(
        [encode_event(make_event(event_id, account))],
        catalog.snapshot(conn, q),
        settings,
        datetime.now(UTC),
    )
    assert record_isolating(conn, q, priced, rejected).debited == 1


def test_auto_topup_fires_once_under_concurrent_debits(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    open_account(conn, q, "acme", credit="5.01")
    customer = ensure_customer(conn, q, gateway, "acme")
    card = _saved_card(gateway, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, "acme", threshold=D(5), amount=D(20), payment_method=card
    )
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []  # not below yet
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def debit_then_check(n: int) -> None:
        try:
            with db.connect(stripe_settings) as c:
                _debit(c, q, stripe_settings, "acme", f"ev-{n}")
                barrier.wait()
                results.extend(check_auto_topups(c, q, stripe_settings, gateway))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=debit_then_check, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [r.outcome for r in results] == ["created"]
    topup_id = results[0].topup_id
    assert len(_intents_for(localstripe_url, topup_id)) == 1
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    wait_for(lambda: _processed(conn, "payment_intent.succeeded", intent), what="auto credit")
    debited = conn.execute("SELECT sum(debited) FROM usage_events").fetchone()
    assert debited is not None and debited[0] > 0
    assert wallet_balance(conn, "acme") == D("5.01") - debited[0] + D(20)  # credited once
    row = conn.execute(
        "SELECT pending_topup_id, enabled, attempts FROM auto_topup_settings"
    ).fetchone()
    assert row == (None, True, 1)
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []  # above threshold now
    assert_audit_clean(conn, q)


def test_a_declined_auto_topup_disables_it_and_notifies(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    open_account(conn, q, "acme", credit="1")
    customer = ensure_customer(conn, q, gateway, "acme")
    card = _saved_card(gateway, localstripe_url, customer, "4000000000000341")  # charge fails
    set_auto_topup(
        conn, q, stripe_settings, "acme", threshold=D(5), amount=D(20), payment_method=card
    )
    [result] = check_auto_topups(conn, q, stripe_settings, gateway)
    assert result.outcome.startswith("declined")
    topup = get_topup(conn, q, result.topup_id)
    assert topup.status == "failed"
    row = conn.execute(
        "SELECT enabled, pending_topup_id, disabled_reason FROM auto_topup_settings"
    ).fetchone()
    assert row is not None and row[0] is False and row[1] is None and "declined" in row[2]
    assert _outbox(conn, AUTO_TOPUP_FAILED, "acme") == 1
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []  # disabled: no retry
    # localstripe also reports payment_intent.payment_failed: recorded, nothing changes
    wait_for(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM stripe_events WHERE type = 'payment_intent.payment_failed' "
                "AND processed_at IS NOT NULL AND event #>> '{data,object,metadata,topup_id}' = %s",
                (result.topup_id,),
            ).fetchone()
            == (1,)
        ),
        what="failure event",
    )
    assert wallet_balance(conn, "acme") == D(1)
    assert _outbox(conn, AUTO_TOPUP_FAILED, "acme") == 1
    assert_audit_clean(conn, q)


def test_cli_topup_then_reconcile_reports_every_difference(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    from click.testing import CliRunner

    from billing.cli import main

    open_account(conn, q, "acme", credit="0")
    runner = CliRunner()
    args = ["topup", "create", "acme", "100", "--payment-method", "pm_card_visa", "--key", "cli-1"]
    first = runner.invoke(main, args, obj={"settings": stripe_settings})
    assert first.exit_code == 0, first.output
    assert "credit 100.00 + fee 5.00 = 105.00 USD charged" in first.output
    again = runner.invoke(main, args, obj={"settings": stripe_settings})
    assert again.exit_code == 0 and again.output.splitlines()[0] == first.output.splitlines()[0]
    topup_id = first.output.split()[1]
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    wait_for(lambda: _processed(conn, "payment_intent.succeeded", intent), what="credit")
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    clean = runner.invoke(
        main, ["stripe", "reconcile", "--since", since], obj={"settings": stripe_settings}
    )
    assert clean.exit_code == 0 and "0 difference(s)" in clean.output
    # a charge on our customer that the ledger never booked (say, made in the dashboard)
    customer = ensure_customer(conn, q, gateway, "acme")
    stray = gateway.create_payment_intent(
        key="stray-1",
        customer_id=customer,
        amount_cents=777,
        metadata={},
        payment_method="pm_card_visa",
    )
    diff = runner.invoke(
        main, ["stripe", "reconcile", "--since", since], obj={"settings": stripe_settings}
    )
    assert diff.exit_code == 1
    assert "charge not in our books" in diff.output and stray["id"] in diff.output
    assert "7.77" in diff.output
    assert_audit_clean(conn, q)


def test_a_wallet_frozen_by_a_dispute_is_not_auto_topped_up(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    """The dispute holds the balance below the threshold: charging the card holder who disputes
    a payment off-session again would be wrong; auto top-up resumes once the wallet is unfrozen."""
    acme = f"acme-{uuid.uuid4().hex[:8]}"  # localstripe is shared: top-up ids must be new
    open_account(conn, q, acme, credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, acme)
    customer = ensure_customer(conn, q, gateway, acme)
    card = _saved_card(gateway, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(20), amount=D(50), payment_method=card
    )
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []  # 100 is above 20
    topup = get_topup(conn, q, topup_id)
    assert topup.charge_id and topup.payment_intent_id
    opened = envelope(
        "charge.dispute.created",
        dispute_object(topup.charge_id, topup.payment_intent_id, 10500, "needs_response", "du_f"),
    )
    assert endpoint.post(opened).status_code == 200
    endpoint.dispatch.drain()
    assert wallet_balance(conn, acme) == 0  # below the threshold, and frozen
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []
    assert conn.execute("SELECT count(*) FROM topups WHERE kind = 'auto'").fetchone() == (0,)
    won = envelope(
        "charge.dispute.closed",
        dispute_object(topup.charge_id, topup.payment_intent_id, 10500, "won", "du_f"),
    )
    assert endpoint.post(won).status_code == 200
    endpoint.dispatch.drain()
    assert check_auto_topups(conn, q, stripe_settings, gateway) == []  # 100 again: above 20
    from billing import wallets

    wallets.adjust(conn, q, acme, D("-90"), reason="spent", actor="tests")
    [result] = check_auto_topups(conn, q, stripe_settings, gateway)  # unfrozen: it resumes
    assert result.outcome == "created"
    assert_audit_clean(conn, q)


def _refund_object(
    refund: dict[str, Any], status: str, created: int | None = None
) -> dict[str, Any]:
    """Stripe's published refund object carrying a real refund's ids, amount and time."""
    obj = fixture("refund.json")
    for key in ("id", "amount", "charge", "payment_intent", "currency"):
        obj[key] = refund[key]
    obj["created"] = created if created is not None else refund.get("created", obj["created"])
    obj["status"] = status
    if status == "failed":
        obj.update(failure_reason="expired_or_canceled_card", failure_balance_transaction="txn_f")
    return obj


def _at(event: dict[str, Any], created: int) -> dict[str, Any]:
    event["created"] = created
    return event


@pytest.mark.parametrize("order", ["as_sent", "failure_first", "reversed"])
def test_a_failed_refund_gives_the_credit_and_fee_back_then_a_lost_dispute_takes_them_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    order: str,
) -> None:
    """A full refund is booked, then fails (the money came back to us): the clawback is
    reversed with the split the refund used. A lost dispute then takes the payment once."""
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    topup = get_topup(conn, q, topup_id)
    assert topup.charge_id and topup.payment_intent_id
    refund = gateway.create_refund(
        key=f"refund-{topup_id}-1", payment_intent_id=topup.payment_intent_id, amount_cents=10500
    )
    charge = _charge(gateway, topup_id, conn, q)
    assert charge["amount_refunded"] == 10500
    t0 = int(datetime.now(UTC).timestamp())
    refunded = _at(envelope("charge.refunded", charge_object(charge)), t0)
    failed = _at(envelope("refund.failed", _refund_object(refund, "failed")), t0 + 60)
    updated = _at(
        envelope("charge.refund.updated", _refund_object(refund, "failed"), status="succeeded"),
        t0 + 60,
    )
    later = _at(
        envelope("charge.succeeded", charge_object({**charge, "amount_refunded": 0})), t0 + 90
    )
    events = [refunded, failed, updated, later]
    if order == "failure_first":
        events = [failed, refunded, updated, later]
    elif order == "reversed":
        events = events[::-1]
    for event in events + events:  # each delivered twice
        assert endpoint.post(event).status_code == 200
        endpoint.dispatch.drain()
    assert topup_books(conn, "acme") == (D(100), D(5), D(-105))
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (0, 0)
    assert_audit_clean(conn, q)
    for status in ("needs_response", "lost"):
        dispute = dispute_object(topup.charge_id, topup.payment_intent_id, 10500, status, "du_rf")
        assert endpoint.post(envelope("charge.dispute.created", dispute)).status_code == 200
        endpoint.dispatch.drain()
    assert topup_books(conn, "acme") == (0, 0, 0)
    assert_audit_clean(conn, q)


def test_a_partial_refund_that_fails_is_reversed_and_a_later_refund_still_books(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
) -> None:
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    t0 = int(datetime.now(UTC).timestamp())
    first = gateway.create_refund(
        key=f"refund-{topup_id}-1", payment_intent_id=intent, amount_cents=1000
    )
    gateway.create_refund(key=f"refund-{topup_id}-2", payment_intent_id=intent, amount_cents=2000)
    charge = _charge(gateway, topup_id, conn, q)
    assert charge["amount_refunded"] == 3000
    for event in (
        _at(envelope("charge.refunded", charge_object(charge)), t0),
        _at(envelope("refund.failed", _refund_object(first, "failed")), t0 + 60),
    ):
        assert endpoint.post(event).status_code == 200
        endpoint.dispatch.drain()
    # 2000 of 10500 still refunded: credit to_cents(20 * 100/105 = 19.047..) = 19.05, fee 0.95
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (D("19.05"), D("0.95"))
    assert wallet_balance(conn, "acme") == D("80.95")
    assert ledger_balance(conn, "revenue:fees") == D("4.05")
    # a new refund of 1000 after the failure: Stripe's total is 3000 again, and it is booked
    again = {**charge, "amount_refunded": 3000}
    event = _at(envelope("charge.refunded", charge_object(again)), t0 + 120)
    assert endpoint.post(event).status_code == 200
    endpoint.dispatch.drain()
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (D("28.57"), D("1.43"))
    assert wallet_balance(conn, "acme") == D("71.43")
    assert_audit_clean(conn, q)


@pytest.mark.parametrize("timing", ["apart", "failed_in_its_second", "refunds_in_one_second"])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_later_refund_that_fails_never_gives_back_an_earlier_refunds_clawback(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    timing: str,
    order: tuple[int, ...],
) -> None:
    """R1 (30.00) is paid to the card; R2 (20.00), created later, fails. Whatever the order of
    R1's charge.refunded, R2's charge.refunded and R2's refund.failed, R1's clawback stays:
    R2's failure is subtracted only from snapshots that counted R2."""
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    gateway.create_refund(key=f"refund-{topup_id}-1", payment_intent_id=intent, amount_cents=3000)
    first = _charge(gateway, topup_id, conn, q)
    second = gateway.create_refund(
        key=f"refund-{topup_id}-2", payment_intent_id=intent, amount_cents=2000
    )
    both = _charge(gateway, topup_id, conn, q)
    assert (first["amount_refunded"], both["amount_refunded"]) == (3000, 5000)
    t1 = int(datetime.now(UTC).timestamp())
    t2 = t1 if timing == "refunds_in_one_second" else t1 + 60
    t3 = t2 if timing == "failed_in_its_second" else t2 + 60
    events = [
        _at(envelope("charge.refunded", charge_object(first)), t1),
        _at(envelope("charge.refunded", charge_object(both)), t2),
        _at(envelope("refund.failed", _refund_object(second, "failed", created=t2)), t3),
    ]
    for i in order:
        assert endpoint.post(events[i]).status_code == 200
        endpoint.dispatch.drain()
        view = get_topup(conn, q, topup_id)
        booked = view.refunded_credit + view.refunded_fee
        if timing != "refunds_in_one_second" and 0 in order[: order.index(i) + 1]:
            # R1 was paid to the card and we have heard of it: its 30.00 stays taken back
            assert booked >= D(30), (order, i, booked)
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (D("28.57"), D("1.43"))
    assert wallet_balance(conn, "acme") == D("71.43")
    assert ledger_balance(conn, "revenue:fees") == D("3.57")
    assert_audit_clean(conn, q)


@pytest.mark.parametrize("later_report_first", [True, False])
def test_a_refund_failure_reported_twice_counts_from_its_earliest_time(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    endpoint: Endpoint,
    later_report_first: bool,
) -> None:
    """R1 (10.00) fails at t+60 (refund.failed) and is reported again at t+180
    (charge.refund.updated); R2 (20.00) is created at t+100. The charge at t+120 shows only R2
    refunded: R1's failure is not in it, whichever report of the failure came first."""
    open_account(conn, q, "acme", credit="0")
    topup_id = _paid_topup(conn, q, stripe_settings, gateway, "acme")
    intent = get_topup(conn, q, topup_id).payment_intent_id
    assert intent is not None
    t0 = int(datetime.now(UTC).timestamp())
    first = gateway.create_refund(
        key=f"refund-{topup_id}-1", payment_intent_id=intent, amount_cents=1000
    )
    gateway.create_refund(key=f"refund-{topup_id}-2", payment_intent_id=intent, amount_cents=2000)
    charge = _charge(gateway, topup_id, conn, q)
    failed = _refund_object(first, "failed", created=t0)
    reports = [
        _at(envelope("refund.failed", failed), t0 + 60),
        _at(envelope("charge.refund.updated", failed, status="succeeded"), t0 + 180),
    ]
    if later_report_first:
        reports.reverse()
    snapshot = _at(
        envelope("charge.refunded", charge_object({**charge, "amount_refunded": 2000})), t0 + 120
    )
    for event in [*reports, snapshot]:
        assert endpoint.post(event).status_code == 200
        endpoint.dispatch.drain()
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (D("19.05"), D("0.95"))
    assert wallet_balance(conn, "acme") == D("80.95")
    assert_audit_clean(conn, q)


def test_a_failed_refund_of_a_checkout_topup_not_known_yet_waits_for_it(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
) -> None:
    """A refund has no metadata of ours: before checkout.session.completed tells us the
    intent, its failure cannot be matched, and must wait rather than be ignored."""
    stripe = _CheckoutStripe(stripe_settings)
    open_account(conn, q, "acme", credit="0")
    created = create_topup(
        conn,
        q,
        stripe_settings,
        stripe,
        "acme",
        D(100),
        request_key="co-refund",
        checkout=True,
        success_url="https://example.com/ok",
        cancel_url="https://example.com/cancel",
    )
    topup_id = created.topup.topup_id
    pi, charge = f"pi_co_{uuid.uuid4().hex[:12]}", f"ch_co_{uuid.uuid4().hex[:12]}"
    t0 = int(datetime.now(UTC).timestamp())
    refund = {"id": f"re_{uuid.uuid4().hex[:12]}", "amount": 1000, "charge": charge}
    refund.update(payment_intent=pi, currency="usd")
    failed = _at(envelope("refund.failed", _refund_object(refund, "failed", created=t0)), t0 + 60)
    assert endpoint.post(failed).status_code == 200
    endpoint.dispatch.drain()
    row = conn.execute(
        "SELECT processed_at, outcome FROM stripe_events WHERE event_id = %s", (failed["id"],)
    ).fetchone()
    assert row is not None and row[0] is None and row[1].startswith("waiting"), row
    session = fixture("checkout_session.json")
    session.update(
        id=created.topup.checkout_session_id,
        status="complete",
        payment_status="paid",
        amount_total=10500,
        currency="usd",
        payment_intent=pi,
        client_reference_id=topup_id,
        metadata={"topup_id": topup_id},
    )
    assert endpoint.post(envelope("checkout.session.completed", session)).status_code == 200
    endpoint.dispatch.drain()
    process_pending(conn, q, stripe_settings)
    row = conn.execute(
        "SELECT processed_at FROM stripe_events WHERE event_id = %s", (failed["id"],)
    ).fetchone()
    assert row is not None and row[0] is not None
    # the refund's charge.refunded (sent before it failed) arrives last: nothing stays refunded
    paid = {"id": charge, "amount": 10500, "amount_refunded": 1000, "payment_intent": pi}
    paid.update(customer=None, currency="usd")
    refunded = _at(envelope("charge.refunded", charge_object(paid)), t0)
    assert endpoint.post(refunded).status_code == 200
    endpoint.dispatch.drain()
    view = get_topup(conn, q, topup_id)
    assert (view.refunded_credit, view.refunded_fee) == (0, 0)
    assert wallet_balance(conn, "acme") == D(100)
    assert_audit_clean(conn, q)


class _FlakyStripe(StripeGateway):
    """localstripe, except that Stripe is unreachable for the accounts in ``down``."""

    down: set[str]

    def create_payment_intent(self, **kw: Any) -> dict[str, Any]:
        if kw["metadata"].get("account_id") in self.down:
            raise StripeUnavailable("stripe unavailable: APIConnectionError")
        return super().create_payment_intent(**kw)


def test_a_bad_saved_card_disables_only_its_account_and_an_outage_skips_only_its_own(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    """The accounts are checked in order: the first's card is gone (Stripe answers 404), the
    second cannot be reached this run; the third still gets its top-up, the first is disabled
    with the reason and notified, the second is left enabled and created on the next run."""
    flaky = _FlakyStripe(stripe_settings)
    flaky.down = {"b-down"}
    for account in ("a-gone", "b-down", "c-good"):
        open_account(conn, q, account, credit="1")
        customer = ensure_customer(conn, q, flaky, account)
        card = (
            "pm_detached_card"
            if account == "a-gone"
            else _saved_card(flaky, localstripe_url, customer, "4242424242424242")
        )
        set_auto_topup(
            conn, q, stripe_settings, account, threshold=D(5), amount=D(20), payment_method=card
        )
    results = {r.account_id: r for r in check_auto_topups(conn, q, stripe_settings, flaky)}
    assert results["a-gone"].outcome.startswith("refused") and "404" in results["a-gone"].outcome
    assert results["b-down"].outcome.startswith("retry")
    assert results["c-good"].outcome == "created"
    rows = dict(
        (r[0], r[1:])
        for r in conn.execute(
            "SELECT account_id, enabled, disabled_reason FROM auto_topup_settings"
        ).fetchall()
    )
    assert rows["a-gone"][0] is False and "refused" in rows["a-gone"][1]
    assert rows["b-down"] == (True, None) and rows["c-good"] == (True, None)
    assert _outbox(conn, AUTO_TOPUP_FAILED, "a-gone") == 1
    assert _outbox(conn, AUTO_TOPUP_FAILED, "b-down") == 0
    assert get_topup(conn, q, results["a-gone"].topup_id).status == "failed"
    flaky.down = set()
    [again] = check_auto_topups(conn, q, stripe_settings, flaky)  # a disabled, c pending
    assert (again.account_id, again.outcome) == ("b-down", "created")
    assert_audit_clean(conn, q)


class _LostAnswerStripe(StripeGateway):
    """localstripe, except that the first intent's answer is lost: Stripe got the request (and
    confirmed it) when ``reached``, or never did."""

    lose = 1
    reached = True

    def create_payment_intent(self, **kw: Any) -> dict[str, Any]:
        if self.lose:
            self.lose -= 1
            if self.reached:
                super().create_payment_intent(**kw)
            raise StripeUnavailable("stripe unavailable: APIConnectionError")
        return super().create_payment_intent(**kw)


class _BrokenStripe(StripeGateway):
    """localstripe, except that creating an intent fails in a way nobody expected."""

    def create_payment_intent(self, **kw: Any) -> dict[str, Any]:
        raise BillingError("unexpected answer from stripe")


def test_an_unexpected_error_after_the_claim_leaves_the_auto_topup_pending_and_resumes_it(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    gateway: StripeGateway,
    localstripe_url: str,
) -> None:
    """The request may have reached Stripe: the top-up is not failed nor dropped (a new
    attempt number would be a second charge); the next run resends it under its key."""
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, gateway, acme)
    card = _saved_card(gateway, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    broken = _BrokenStripe(stripe_settings)
    [result] = check_auto_topups(conn, q, stripe_settings, broken)
    assert result.outcome.startswith("retry: unexpected answer")
    assert result.topup_id is not None
    assert get_topup(conn, q, result.topup_id).status == "pending"
    row = conn.execute("SELECT enabled, pending_topup_id FROM auto_topup_settings").fetchone()
    assert row == (True, result.topup_id)
    assert _outbox(conn, AUTO_TOPUP_FAILED, acme) == 0
    [resumed] = check_auto_topups(conn, q, stripe_settings, gateway)
    assert (resumed.topup_id, resumed.outcome) == (result.topup_id, "created")
    assert len(_intents_for(localstripe_url, result.topup_id)) == 1
    assert conn.execute("SELECT count(*) FROM topups WHERE kind = 'auto'").fetchone() == (1,)
    assert_audit_clean(conn, q)


@pytest.mark.parametrize("reached", [True, False])
def test_an_auto_topup_whose_answer_was_lost_is_credited_or_resumed_with_the_same_key(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
    reached: bool,
) -> None:
    """The top-up is recorded and committed before Stripe is called: the success webhook of an
    intent whose answer we lost finds it, and an intent Stripe never got is sent again with the
    same key on the next run even though the balance rose above the threshold meanwhile."""
    lossy = _LostAnswerStripe(stripe_settings)
    lossy.reached = reached
    acme = f"acme-{uuid.uuid4().hex[:8]}"  # localstripe is shared: top-up ids must be new
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, lossy, acme)
    card = _saved_card(lossy, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    [first] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert first.outcome.startswith("retry")
    rows = conn.execute("SELECT topup_id, status FROM topups WHERE kind = 'auto'").fetchall()
    assert len(rows) == 1 and rows[0][1] == "pending"  # committed before Stripe was called
    topup_id = rows[0][0]
    if reached:
        # Stripe confirmed it: its success webhook credits the recorded top-up
        wait_for(lambda: get_topup(conn, q, topup_id).status == "succeeded", what="credit")
        assert wallet_balance(conn, acme) == D(21)
        assert check_auto_topups(conn, q, stripe_settings, lossy) == []
    else:
        from billing import wallets

        wallets.adjust(conn, q, acme, D(100), reason="manual", actor="tests")  # now above
        [resumed] = check_auto_topups(conn, q, stripe_settings, lossy)
        assert (resumed.topup_id, resumed.outcome) == (topup_id, "created")
        wait_for(lambda: get_topup(conn, q, topup_id).status == "succeeded", what="credit")
        assert wallet_balance(conn, acme) == D(121)
    assert len(_intents_for(localstripe_url, topup_id)) == 1
    row = conn.execute("SELECT pending_topup_id, enabled, attempts FROM auto_topup_settings")
    assert row.fetchone() == (None, True, 1)
    assert_audit_clean(conn, q)


class _RecordingLostAnswerStripe(_LostAnswerStripe):
    """Loses the first answer (after Stripe got the request) and records what was sent."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[str, str]] = []

    def create_payment_intent(self, **kw: Any) -> dict[str, Any]:
        self.sent.append((kw["key"], kw["payment_method"]))
        return super().create_payment_intent(**kw)


def test_a_resent_auto_topup_uses_the_card_it_was_claimed_with_after_a_card_change(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    """The resend repeats the first request under the same key, so Stripe does not refuse it
    as an idempotency conflict (which would disable auto top-up)."""
    lossy = _RecordingLostAnswerStripe(stripe_settings)
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, lossy, acme)
    old = _saved_card(lossy, localstripe_url, customer, "4242424242424242")
    new = _saved_card(lossy, localstripe_url, customer, "5555555555554444")
    set_auto_topup(conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=old)
    lossy.reached = False  # Stripe never got the first request
    [first] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert first.outcome.startswith("retry")
    set_auto_topup(conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=new)
    [resumed] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert (resumed.topup_id, resumed.outcome) == (first.topup_id, "created")
    assert [pm for _, pm in lossy.sent] == [old, old]
    assert len({key for key, _ in lossy.sent}) == 1
    assert first.topup_id is not None
    wait_for(lambda: get_topup(conn, q, first.topup_id).status == "succeeded", what="credit")
    assert wallet_balance(conn, acme) == D(21)
    assert_audit_clean(conn, q)


def test_disabling_keeps_an_unsent_auto_topup_and_re_enabling_sends_it_before_the_new_amount(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    """We cannot know that Stripe never got it: it stays the one attempt until Stripe answers,
    and the new amount applies to the next attempt."""
    lossy = _LostAnswerStripe(stripe_settings)
    lossy.reached = False
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, lossy, acme)
    card = _saved_card(lossy, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    [first] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert first.outcome.startswith("retry") and first.topup_id is not None
    disable_auto_topup(conn, q, acme)
    assert get_topup(conn, q, first.topup_id).status == "pending"
    assert check_auto_topups(conn, q, stripe_settings, lossy) == []  # disabled: not resent
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(30), amount=D(50), payment_method=card
    )
    [resumed] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert (resumed.topup_id, resumed.outcome) == (first.topup_id, "created")
    wait_for(lambda: get_topup(conn, q, first.topup_id).status == "succeeded", what="credit")
    assert wallet_balance(conn, acme) == D(21)
    [fresh] = check_auto_topups(conn, q, stripe_settings, lossy)  # 21 < 30: the next attempt
    assert fresh.outcome == "created" and fresh.topup_id not in (None, first.topup_id)
    assert fresh.topup_id is not None
    wait_for(lambda: get_topup(conn, q, fresh.topup_id).status == "succeeded", what="credit")
    assert wallet_balance(conn, acme) == D(71)
    assert len(_intents_for(localstripe_url, first.topup_id)) == 1
    assert_audit_clean(conn, q)


class _KeyedLostAnswerStripe(StripeGateway):
    """localstripe behind Stripe's idempotency (which localstripe lacks): a key seen before
    answers with its intent, a different request under it is a conflict. The first answer is
    lost after Stripe created and confirmed the intent (a timeout)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.keys: dict[str, tuple[dict[str, Any], str]] = {}
        self.lose = 1

    def create_payment_intent(self, **kw: Any) -> dict[str, Any]:
        if kw["key"] in self.keys:
            request, intent_id = self.keys[kw["key"]]
            if request != kw:
                raise IdempotencyConflict(f"key {kw['key']} reused for another request")
            return self.retrieve_payment_intent(intent_id)
        intent = super().create_payment_intent(**kw)
        self.keys[kw["key"]] = (dict(kw), intent["id"])
        if self.lose:
            self.lose -= 1
            raise StripeUnavailable("stripe unavailable: APIConnectionError (read timeout)")
        return intent


def test_a_timeout_after_stripe_charged_then_disable_and_re_enable_charges_once(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
) -> None:
    """Stripe created and confirmed the intent, our answer timed out and its webhook is late:
    disabling and re-enabling with a new amount resends the SAME request under the same key
    (Stripe answers with the intent it has) instead of a second attempt, a second charge."""
    endpoint.dispatch.hold = True  # the success webhook is late
    lossy = _KeyedLostAnswerStripe(stripe_settings)
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, lossy, acme)
    card = _saved_card(lossy, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    [first] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert first.outcome.startswith("retry") and first.topup_id is not None
    disable_auto_topup(conn, q, acme)
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(50), payment_method=card
    )
    [again] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert (again.topup_id, again.outcome) == (first.topup_id, "created")
    with endpoint.dispatch.lock:
        endpoint.dispatch.hold = False
        held, endpoint.dispatch.held = endpoint.dispatch.held, []
    for event_id in held:
        endpoint.dispatch.process(event_id)
    wait_for(lambda: get_topup(conn, q, first.topup_id).status == "succeeded", what="credit")
    assert wallet_balance(conn, acme) == D(21)
    assert conn.execute("SELECT count(*) FROM topups WHERE kind = 'auto'").fetchone() == (1,)
    charged = [pi["amount"] for pi in _intents_for(localstripe_url, first.topup_id)]
    assert charged == [2100]
    row = conn.execute("SELECT pending_topup_id, enabled, attempts FROM auto_topup_settings")
    assert row.fetchone() == (None, True, 1)
    assert_audit_clean(conn, q)


def _blocked_on_a_lock(conn: psycopg.Connection[Any], pid: int) -> bool:
    row = conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return bool(row and row[0])


def test_disabling_while_a_checker_claims_loses_nothing_and_starts_no_second_attempt(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    endpoint: Endpoint,
    localstripe_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim holds the settings row; the disable waits for it and then keeps the claimed
    top-up pending (not sent while disabled); re-enabling sends that one, once."""
    from billing import topups

    gateway = StripeGateway(stripe_settings)
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, gateway, acme)
    card = _saved_card(gateway, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    claimed, go = threading.Event(), threading.Event()
    record = topups._record_topup

    def paused_record(*args: Any) -> None:
        record(*args)
        claimed.set()
        assert go.wait(20)

    monkeypatch.setattr(topups, "_record_topup", paused_record)
    checker = db.connect(stripe_settings)
    disabler = db.connect(stripe_settings)
    disabler_pid = disabler.info.backend_pid
    try:
        results: list[Any] = []
        check = threading.Thread(
            target=lambda: results.extend(check_auto_topups(checker, q, stripe_settings, gateway))
        )
        check.start()
        assert claimed.wait(20)
        disable = threading.Thread(target=disable_auto_topup, args=(disabler, q, acme))
        disable.start()
        wait_for(lambda: _blocked_on_a_lock(conn, disabler_pid), what="the disable waits")
        go.set()
        check.join(20)
        disable.join(20)
        assert not check.is_alive() and not disable.is_alive()
    finally:
        go.set()
        checker.close()
        disabler.close()
    monkeypatch.setattr(topups, "_record_topup", record)
    [(topup_id, status)] = conn.execute(
        "SELECT topup_id, status FROM topups WHERE kind = 'auto'"
    ).fetchall()
    assert status == "pending" and results == []  # claimed, not sent while disabled
    row = conn.execute("SELECT enabled, pending_topup_id, attempts FROM auto_topup_settings")
    assert row.fetchone() == (False, topup_id, 1)
    assert _intents_for(localstripe_url, topup_id) == []
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(50), payment_method=card
    )
    [sent] = check_auto_topups(conn, q, stripe_settings, gateway)
    assert (sent.topup_id, sent.outcome) == (topup_id, "created")
    wait_for(lambda: get_topup(conn, q, topup_id).status == "succeeded", what="credit")
    assert wallet_balance(conn, acme) == D(21)
    assert conn.execute("SELECT count(*) FROM topups WHERE kind = 'auto'").fetchone() == (1,)
    assert_audit_clean(conn, q)


def test_refusing_without_a_topup_and_a_webhook_locking_the_topup_do_not_deadlock(
    conn: psycopg.Connection[Any],
    q: Queries,
    stripe_settings: Settings,
    localstripe_url: str,
) -> None:
    """Lock order: the top-up row before the settings row. A webhook (or the sender) holds the
    pending top-up and then updates the settings; a refusal without a top-up (an unexpected
    error) locks only the settings and keeps the pending top-up."""
    from billing import topups

    lossy = _LostAnswerStripe(stripe_settings)
    lossy.reached = False
    acme = f"acme-{uuid.uuid4().hex[:8]}"
    open_account(conn, q, acme, credit="1")
    customer = ensure_customer(conn, q, lossy, acme)
    card = _saved_card(lossy, localstripe_url, customer, "4242424242424242")
    set_auto_topup(
        conn, q, stripe_settings, acme, threshold=D(5), amount=D(20), payment_method=card
    )
    [first] = check_auto_topups(conn, q, stripe_settings, lossy)
    assert first.topup_id is not None
    refuser = db.connect(stripe_settings)
    errors: list[BaseException] = []

    def refuse() -> None:
        try:
            topups._refused(refuser, q, acme, None, "refused: unexpected")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    try:
        with conn.transaction():
            conn.execute(q["topup_lock"], {"topup_id": first.topup_id})  # as a webhook does
            thread = threading.Thread(target=refuse)
            thread.start()
            thread.join(1.5)  # done, or (locking the settings first) waiting for the top-up
            try:
                conn.execute(
                    "UPDATE auto_topup_settings SET updated_at = now() WHERE account_id = %s",
                    (acme,),
                )
            except psycopg.Error as exc:
                errors.append(exc)
                raise
        thread.join(20)
    except psycopg.Error:
        thread.join(20)
    finally:
        refuser.close()
    assert errors == []
    assert get_topup(conn, q, first.topup_id).status == "pending"
    row = conn.execute("SELECT enabled, pending_topup_id FROM auto_topup_settings").fetchone()
    assert row == (False, first.topup_id)


class _CheckoutStripe(StripeGateway):
    """localstripe has no Checkout: Stripe's published session object stands in for its
    answers, one per idempotency key, as Stripe keeps them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.created = 0

    def create_checkout_session(self, **kw: Any) -> dict[str, Any]:
        self.created += 1
        session = fixture("checkout_session.json")
        session.update(
            id=f"cs_test_{kw['topup_id']}",
            url=f"https://checkout.stripe.com/c/pay/cs_test_{kw['topup_id']}",
            payment_intent=None,
            client_reference_id=kw["topup_id"],
            metadata=dict(kw["metadata"]),
            customer=kw["customer_id"],
        )
        self.sessions[session["id"]] = session
        return session

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        return self.sessions[session_id]


def test_a_retried_checkout_topup_returns_the_same_checkout_url(
    conn: psycopg.Connection[Any], q: Queries, stripe_settings: Settings
) -> None:
    stripe = _CheckoutStripe(stripe_settings)
    open_account(conn, q, "acme", credit="0")
    created = [
        create_topup(
            conn,
            q,
            stripe_settings,
            stripe,
            "acme",
            D(100),
            request_key="co-retry",
            checkout=True,
            success_url="https://example.com/ok",
            cancel_url="https://example.com/cancel",
        )
        for _ in range(2)
    ]
    assert stripe.created == 1
    assert created[0].checkout_url is not None
    assert created[1].checkout_url == created[0].checkout_url
    assert created[1].topup.topup_id == created[0].topup.topup_id
