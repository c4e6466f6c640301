"""The fee rule and the refund/dispute split (pure arithmetic, no database)."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.errors import BillingError, WebhookRejected
from billing.money import to_cents
from billing.settings import Settings
from billing.stripe_client import idempotency_key, verify_webhook
from billing.topups import quote, split_refund, topup_id_for

RATE = Decimal("0.05")


def test_the_worked_example_100_credit_5_fee_105_charged() -> None:
    q = quote(Decimal("100"), RATE)
    assert (q.credit_cents, q.fee_cents, q.charged_cents) == (10000, 500, 10500)
    assert (q.credit, q.fee, q.charged) == (Decimal("100"), Decimal("5"), Decimal("105"))


@pytest.mark.parametrize(
    ("credit", "fee_cents"),
    [
        ("10.10", 50),  # 0.505 -> half-even -> 0.50
        ("10.30", 52),  # 0.515 -> half-even -> 0.52
        ("0.99", 5),  # 0.0495 -> 0.05
        ("12.34", 62),  # 0.617 -> 0.62
        ("1000000", 5000000),
    ],
)
def test_fee_is_rounded_half_even_to_cents(credit: str, fee_cents: int) -> None:
    assert quote(Decimal(credit), RATE).fee_cents == fee_cents


@pytest.mark.parametrize("credit", ["0", "-5", "10.001", "0.10"])
def test_invalid_credits_are_refused(credit: str) -> None:
    with pytest.raises(BillingError):
        quote(Decimal(credit), RATE)


@given(st.integers(min_value=50, max_value=10**10), st.sampled_from(["0", "0.05", "0.029", "0.1"]))
def test_charged_is_credit_plus_the_rounded_fee(credit_cents: int, rate: str) -> None:
    credit = Decimal(credit_cents) / 100
    q = quote(credit, Decimal(rate))
    assert q.credit_cents == credit_cents
    assert q.fee_cents == to_cents(credit * Decimal(rate))
    assert q.charged_cents == q.credit_cents + q.fee_cents
    assert abs(Decimal(q.fee_cents) - credit * Decimal(rate) * 100) <= Decimal("0.5")


def test_split_of_the_worked_example() -> None:
    assert split_refund(10500, 10000, 10500) == (10000, 500)  # full refund: all of it back
    assert split_refund(5250, 10000, 10500) == (5000, 250)  # half
    assert split_refund(1000, 10000, 10500) == (952, 48)  # 952.38 credit + remainder
    assert split_refund(0, 10000, 10500) == (0, 0)


def test_split_refuses_more_than_charged() -> None:
    with pytest.raises(BillingError):
        split_refund(10501, 10000, 10500)


@st.composite
def charges(draw: st.DrawFn) -> tuple[int, int]:
    credit = draw(st.integers(min_value=50, max_value=10**9))
    fee = to_cents(Decimal(credit) / 100 * Decimal(draw(st.sampled_from(["0.05", "0.03", "0"]))))
    return credit, credit + fee


@given(charges(), st.data())
def test_partial_refunds_sum_to_the_split_of_their_total(
    charge: tuple[int, int], data: st.DataObject
) -> None:
    """Booking the difference of cumulative splits: parts are monotone and add up exactly."""
    credit, charged = charge
    totals = sorted(
        data.draw(st.lists(st.integers(min_value=0, max_value=charged), min_size=1, max_size=8))
    )
    booked_credit = booked_fee = 0
    for total in [*totals, charged]:
        c, f = split_refund(total, credit, charged)
        assert c + f == total
        assert c >= booked_credit and f >= booked_fee  # never gives back what was clawed
        booked_credit, booked_fee = c, f
    assert (booked_credit, booked_fee) == (credit, charged - credit)


def test_ids_and_keys_are_deterministic() -> None:
    assert topup_id_for("acme", "k1") == topup_id_for("acme", "k1")
    assert topup_id_for("acme", "k1") != topup_id_for("acme", "k2")
    assert topup_id_for("acme", "k1") != topup_id_for("acme2", "k1")
    assert idempotency_key("topup", "tu_1", "intent") == "gateway-billing:topup:tu_1:intent"


def test_fee_rate_and_secrets_come_from_the_environment() -> None:
    s = Settings.from_env(
        {"BILLING_TOPUP_FEE_RATE": "0.07", "BILLING_STRIPE_WEBHOOK_SECRET": "whsec_a, whsec_b"}
    )
    assert s.topup_fee_rate == Decimal("0.07")
    assert s.stripe_webhook_secret == ("whsec_a", "whsec_b")
    assert "whsec" not in repr(s)
    assert Settings.from_env({}).topup_fee_rate == Decimal("0.05")


def test_verify_webhook_reasons() -> None:
    import stripe

    body = b'{"id": "evt_1", "object": "event", "type": "x", "data": {"object": {}}}'
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_b")
    assert verify_webhook(body, header, ["whsec_a", "whsec_b"], 300)["id"] == "evt_1"
    with pytest.raises(WebhookRejected, match="bad signature"):
        verify_webhook(body, header, ["whsec_a"], 300)
    old = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_a", 1_000_000)
    with pytest.raises(WebhookRejected, match="stale timestamp"):
        verify_webhook(body, old, ["whsec_a"], 300)
    with pytest.raises(WebhookRejected, match="missing"):
        verify_webhook(body, None, ["whsec_a"], 300)
    bad = b'{"id": "evt_1"}'
    header = stripe.WebhookSignature.generate_signature_header(bad.decode(), "whsec_a")
    with pytest.raises(WebhookRejected, match="malformed body"):
        verify_webhook(bad, header, ["whsec_a"], 300)


def test_a_decoy_timestamp_does_not_hide_a_future_one() -> None:
    """Stripe's parser signs and checks the first key exactly `t`; the future-time check must read
    that one too, not a ` t=` placed before it."""
    import stripe

    body = b'{"id": "evt_1", "object": "event", "type": "x", "data": {"object": {}}}'
    future = int(time.time()) + 365 * 86_400
    signed = stripe.WebhookSignature.generate_signature_header(body.decode(), "whsec_a", future)
    with pytest.raises(WebhookRejected, match="in the future"):
        verify_webhook(body, signed, ["whsec_a"], 300)
    with pytest.raises(WebhookRejected, match="in the future"):
        verify_webhook(body, " t=1," + signed, ["whsec_a"], 300)
