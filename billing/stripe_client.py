"""The only module that talks to Stripe (and the only one importing ``stripe``).

* The API version is pinned (``STRIPE_API_VERSION``), so payload shapes do not change under us
  when Stripe ships a new version; webhook endpoints must be created with the same version.
* ``stripe_api_base`` points the client elsewhere (``localstripe`` in tests).
* Every write carries an idempotency key built from *our* ids (``idempotency_key``), so a retried
  call (ours, or the library's own network retries) never charges twice.
* Stripe's exceptions are mapped to the ``BillingError`` hierarchy here; callers never see them.
* Results are returned as plain ``dict``s (Stripe's JSON), the shape webhook events carry too, so
  the domain code handles one representation.
* ``verify_webhook`` checks ``Stripe-Signature`` with the official ``WebhookSignature`` against
  every configured secret (rotation) and a timestamp tolerance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import stripe

from billing.errors import (
    ConfigError,
    IdempotencyConflict,
    PaymentDeclined,
    PaymentError,
    StripeUnavailable,
    WebhookRejected,
)
from billing.settings import Settings

STRIPE_API_VERSION = "2026-10-28.endive"
"""The version stripe-python 16.1 is generated for; pin webhook endpoints to the same one."""

KEY_PREFIX = "gateway-billing"
T = TypeVar("T")


def idempotency_key(*parts: str) -> str:
    """A deterministic Stripe idempotency key from our own ids (never random)."""
    return ":".join((KEY_PREFIX, *parts))


def _call(fn: Callable[[], T]) -> T:
    """Run one Stripe call, mapping its errors to ours."""
    try:
        return fn()
    except stripe.CardError as exc:
        raise PaymentDeclined(
            f"payment declined: {exc.user_message or exc}", exc.code or "card_declined"
        ) from None
    except stripe.IdempotencyError as exc:
        raise IdempotencyConflict(f"stripe idempotency conflict: {exc.user_message}") from None
    except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
        raise StripeUnavailable(f"stripe unavailable: {type(exc).__name__}") from None
    except (stripe.AuthenticationError, stripe.PermissionError) as exc:
        # Our key is wrong for every request, not this one: a setting to fix, not a refusal.
        raise ConfigError(
            f"stripe refused our API key ({type(exc).__name__}, HTTP {exc.http_status})"
        ) from None
    except stripe.APIError as exc:
        raise StripeUnavailable(
            f"stripe error (HTTP {exc.http_status}): {exc.user_message}"
        ) from None
    except stripe.StripeError as exc:
        if exc.http_status == 402:  # a decline reported without the card error type
            raise PaymentDeclined(f"payment declined: {exc.user_message}", exc.code) from None
        raise PaymentError(
            f"stripe refused the request ({type(exc).__name__}, HTTP {exc.http_status}): "
            f"{exc.user_message}"
        ) from None


def _plain(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


class StripeGateway:
    """Our narrow view of the Stripe API: customers, intents, checkout, refunds, charges."""

    def __init__(self, settings: Settings) -> None:
        if not settings.stripe_api_key:
            raise ConfigError("BILLING_STRIPE_API_KEY is not set")
        bases: dict[str, str] = {}
        if settings.stripe_api_base:
            bases["api"] = settings.stripe_api_base.rstrip("/")
        self._client = stripe.StripeClient(
            settings.stripe_api_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses=bases,  # type: ignore[arg-type]
            max_network_retries=2,  # safe: every write carries an idempotency key
        )

    def create_customer(self, account_id: str) -> dict[str, Any]:
        return _plain(
            _call(
                lambda: self._client.v1.customers.create(
                    params={"metadata": {"account_id": account_id}},
                    options={"idempotency_key": idempotency_key("customer", account_id)},
                )
            )
        )

    def create_payment_intent(
        self,
        *,
        key: str,
        customer_id: str,
        amount_cents: int,
        metadata: Mapping[str, str],
        payment_method: str | None = None,
        off_session: bool = False,
    ) -> dict[str, Any]:
        """A USD PaymentIntent; confirmed at once when a payment method is given."""
        params: dict[str, Any] = {
            "amount": amount_cents,
            "currency": "usd",
            "customer": customer_id,
            "metadata": dict(metadata),
            "payment_method_types": ["card"],
        }
        if payment_method is not None:
            params.update(payment_method=payment_method, confirm=True)
            if off_session:
                params["off_session"] = True
        return _plain(
            _call(
                lambda: self._client.v1.payment_intents.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": key},
                )
            )
        )

    def retrieve_payment_intent(self, intent_id: str) -> dict[str, Any]:
        return _plain(_call(lambda: self._client.v1.payment_intents.retrieve(intent_id)))

    def create_checkout_session(
        self,
        *,
        key: str,
        customer_id: str,
        topup_id: str,
        credit_cents: int,
        fee_cents: int,
        metadata: Mapping[str, str],
        success_url: str,
        cancel_url: str,
    ) -> dict[str, Any]:
        """A hosted Checkout page with two lines: the credit and the platform fee."""
        lines: list[dict[str, Any]] = [
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": credit_cents,
                    "product_data": {"name": "Gateway credit"},
                },
            }
        ]
        if fee_cents:
            lines.append(
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": fee_cents,
                        "product_data": {"name": "Platform fee"},
                    },
                }
            )
        params: dict[str, Any] = {
            "mode": "payment",
            "customer": customer_id,
            "client_reference_id": topup_id,
            "line_items": lines,
            "metadata": dict(metadata),
            "payment_intent_data": {"metadata": dict(metadata)},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        return _plain(
            _call(
                lambda: self._client.v1.checkout.sessions.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": key},
                )
            )
        )

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        return _plain(_call(lambda: self._client.v1.checkout.sessions.retrieve(session_id)))

    def create_refund(
        self, *, key: str, payment_intent_id: str, amount_cents: int
    ) -> dict[str, Any]:
        """Refund part of a payment. The ledger moves when ``charge.refunded`` arrives."""
        return _plain(
            _call(
                lambda: self._client.v1.refunds.create(
                    params={"payment_intent": payment_intent_id, "amount": amount_cents},
                    options={"idempotency_key": key},
                )
            )
        )

    def retrieve_charge(self, charge_id: str) -> dict[str, Any]:
        return _plain(_call(lambda: self._client.v1.charges.retrieve(charge_id)))

    def charges_since(self, since: datetime) -> Iterator[dict[str, Any]]:
        """Every charge created after ``since`` (auto-paginated)."""
        page = _call(
            lambda: self._client.v1.charges.list(
                params={"created": {"gt": int(since.timestamp()) - 1}, "limit": 100}
            )
        )
        iterator = page.auto_paging_iter()
        while True:
            try:
                charge = _call(lambda: next(iterator))
            except StopIteration:
                return
            yield _plain(charge)

    def attach_payment_method(self, payment_method: str, customer_id: str) -> dict[str, Any]:
        return _plain(
            _call(
                lambda: self._client.v1.payment_methods.attach(
                    payment_method, params={"customer": customer_id}
                )
            )
        )


def verify_webhook(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    tolerance_s: int,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify a webhook body against any of ``secrets`` and return the parsed event.

    Raises ``WebhookRejected`` with a clear reason: no/malformed header, bad signature, a stale
    (or far-future) timestamp, or a body that is not a Stripe event. Stripe checks the
    signature before the age, so "stale" is only reported for a correctly signed body.
    """
    if not secrets:
        raise ConfigError("BILLING_STRIPE_WEBHOOK_SECRET is not set")
    if not header:
        raise WebhookRejected("missing Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("malformed body: not UTF-8") from None
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance_s)
        except stripe.SignatureVerificationError as exc:
            stale = stale or "tolerance" in str(exc)
            continue
        break
    else:
        if stale:
            raise WebhookRejected(f"stale timestamp: older than {tolerance_s} s (replay?)")
        raise WebhookRejected("bad signature: no v1 signature matches a configured secret")
    timestamp = _signed_timestamp(header)
    current = time.time() if now is None else now
    if tolerance_s and timestamp > current + tolerance_s:
        raise WebhookRejected(f"timestamp more than {tolerance_s} s in the future")
    try:
        event = json.loads(text)
    except ValueError:
        raise WebhookRejected("malformed body: not JSON") from None
    if (
        not isinstance(event, dict)
        or event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance(event.get("data"), dict)
        or not isinstance(event["data"].get("object"), dict)
    ):
        raise WebhookRejected("malformed body: not a Stripe event (id, type, data.object)")
    return event


def _signed_timestamp(header: str) -> int:
    """The header's ``t``, read as Stripe's own parser reads it (the first key exactly ``t``): a
    decoy `` t=`` before it must not be the time the age check sees."""
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key == "t":
            try:
                return int(value)
            except ValueError:
                break
    raise WebhookRejected("malformed Stripe-Signature header")
