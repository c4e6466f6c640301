"""Holds: "may this request run?" answered before the gateway dispatches it.

A *hold* reserves the worst-case cost of one request against the wallet (and against the API
key's spending limit, see ``billing.limits``). It is a reservation, not ledger money::

    held      = sum of the wallet's active, unexpired, non-BYOK holds
    available = balance - held - granted credit past its expiry not yet expired by the task

``Authorizer.authorize`` prices the worst case in Python (pure: ``worst_case``, from the catalog
version in force) and makes ONE database call, ``billing_authorize`` (migration 0005): it locks
the wallet row, reads balance, holds and key spend in one snapshot, and inserts the hold or
answers why not (``insufficient_credits``, ``key_limit_exceeded``, ``wallet_frozen``, ...). The
row lock serialises every authorization and every debit of one wallet, so concurrent holds can
never together exceed the available balance.

The usage event that follows names its hold (``hold_id``); ``billing.spend_controls.after_debit``
settles the holds of a batch's newly recorded events in the batch transaction (one statement):
the wallet was debited the actual cost by the batch, and the hold stops counting. Holds never
settled expire (``expire_holds``, a beat task); an expired hold stops counting at ``expires_at``
even before the task marks it. BYOK requests need no hold (unless the key's limit counts BYOK).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import msgspec
import psycopg

from billing.catalog import Catalog, snapshot
from billing.db import Queries, fetch_dicts, map_error
from billing.errors import BillingError, InvalidEvent, Unpriced
from billing.events import Count, Ident, Usage, is_identifier
from billing.money import ZERO, exact, format_usd
from billing.pricing import price
from billing.service_tier import ServiceTier


class HoldStatus(StrEnum):
    ACTIVE = "active"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


class Decision(StrEnum):
    """Why a request was allowed or denied (the ``reason`` of an authorization)."""

    HELD = "held"  # allowed, the worst case is reserved
    EXISTING = "existing"  # allowed: a retried call, the hold made the first time
    HOLD_CLOSED = "hold_closed"  # refused: that hold_id was settled, released or expired
    BYOK = "byok"  # allowed, nothing to reserve
    INSUFFICIENT_CREDITS = "insufficient_credits"
    KEY_LIMIT_EXCEEDED = "key_limit_exceeded"
    MEMBER_LIMIT_EXCEEDED = "member_limit_exceeded"  # a sub-account's own limit
    WALLET_FROZEN = "wallet_frozen"
    UNKNOWN_ACCOUNT = "unknown_account"
    NO_CEILING = "no_ceiling"  # no max_tokens and no ceiling configured for the model


class AuthorizationRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the gateway knows before dispatching: who, which model, input size, max_tokens.

    ``hold_id`` is optional: the gateway may pass its request id, making a retried call return
    the same hold; otherwise one is generated.
    """

    account_id: Ident
    api_key_id: Ident
    model: Ident
    provider: Ident
    input_tokens: Count
    max_tokens: Count | None = None
    image_count: Count = 0
    byok: bool = False
    hold_id: Ident | None = None
    service_tier: ServiceTier | None = None  # None: standard; priority costs more


@dataclass(frozen=True)
class Authorization:
    allowed: bool
    reason: Decision
    hold_id: str | None
    amount: Decimal | None
    available: Decimal | None
    key_remaining: Decimal | None
    expires_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        def usd(v: Decimal | None) -> str | None:
            return None if v is None else format_usd(v)

        return {
            "allowed": self.allowed,
            "reason": self.reason.value,
            "hold_id": self.hold_id,
            "amount": usd(self.amount),
            "available": usd(self.available),
            "key_remaining": usd(self.key_remaining),
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
        }


_decode_request = msgspec.json.Decoder(AuthorizationRequest).decode


def decode_request(body: bytes) -> AuthorizationRequest:
    """Parse an authorization request; a bad one raises ``InvalidEvent`` naming the field."""
    try:
        request = _decode_request(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        raise InvalidEvent(text.split(" - at `")[0], field=path) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    for name in ("account_id", "api_key_id", "model", "provider", "hold_id"):
        value = getattr(request, name)
        if value is not None and not is_identifier(value):
            raise InvalidEvent(_NOT_AN_IDENTIFIER, field=f"$.{name}")
    return request


_NOT_AN_IDENTIFIER = "must be visible ASCII characters without spaces, as in usage events"


def check_hold_id(hold_id: str) -> None:
    """A hold id from a URL path, held to the request body's rule."""
    if not 1 <= len(hold_id) <= 200 or not is_identifier(hold_id):
        raise InvalidEvent(_NOT_AN_IDENTIFIER, field="hold_id")


def worst_case(request: AuthorizationRequest, catalog: Catalog, at: datetime) -> Decimal:
    """Pure: the most this request can cost at the version (and service tier) in force at ``at``.

    The provider decides how the prompt is billed: every input token may land in the dearest
    input-side class the version prices (uncached input, a 5-minute or 1-hour cache write, audio
    input), and every one of ``max_tokens`` in the dearest output-side class (text or audio
    output); plus images and the per-request fee, all at the request's tier. A class the version
    does not price cannot be billed (such usage is parked as unpriced), so it is not held for.
    Without ``max_tokens`` the output part is the model's configured ceiling, added by the
    database call. Raises ``Unpriced`` naming the field.
    """
    version = catalog.in_force(request.model, request.provider, at)
    if version is None:
        raise Unpriced(f"no price for {request.model} on {request.provider}", field="$.model")
    worst: Decimal | None = None
    for input_class in _INPUT_SIDE:
        for output_class in _OUTPUT_SIDE:
            usage = Usage(
                image_count=request.image_count,
                **{input_class: request.input_tokens, output_class: request.max_tokens or 0},
            )
            try:
                total = price(usage, version, request.service_tier).total
            except Unpriced as exc:
                if input_class == _INPUT_SIDE[0] and output_class == _OUTPUT_SIDE[0]:
                    field = exc.field.replace("$.usage.output_tokens", "$.max_tokens")
                    raise Unpriced(str(exc), field=field.replace("$.usage.", "$.")) from None
                continue
            worst = total if worst is None else max(worst, total)
    assert worst is not None  # the plain text combination priced, or raised
    return worst


# Where the provider may bill a request's prompt and its completion (disjoint Usage classes).
_INPUT_SIDE = ("input_tokens", "cache_write_tokens", "cache_write_1h_tokens", "audio_input_tokens")
_OUTPUT_SIDE = ("output_tokens", "audio_output_tokens")


class Authorizer:
    """Authorizes requests; keeps a catalog snapshot refreshed every ``catalog_ttl``.

    Prices are append-only and a new version never takes effect in the past, so a snapshot at
    most ``catalog_ttl`` old prices the worst case of a request correctly except in the seconds
    after a price change (the settlement always debits the real price).
    """

    def __init__(self, q: Queries, ttl: timedelta, catalog_ttl: float = 30.0) -> None:
        self.q = q
        self.ttl = ttl
        self.catalog_ttl = catalog_ttl
        self._catalog: Catalog | None = None
        self._loaded = 0.0

    def catalog(self, conn: psycopg.Connection[Any]) -> Catalog:
        if self._catalog is None or time.monotonic() - self._loaded > self.catalog_ttl:
            self._catalog = snapshot(conn, self.q)
            self._loaded = time.monotonic()
        return self._catalog

    def authorize(
        self, conn: psycopg.Connection[Any], request: AuthorizationRequest, now: datetime
    ) -> Authorization:
        """One round trip (after the first call, which loads the catalog)."""
        if now.utcoffset() is None:
            raise BillingError("now must be timezone-aware")
        amount = worst_case(request, self.catalog(conn), now)
        try:
            row = conn.execute(
                self.q["authorize"],
                {
                    "hold_id": request.hold_id or f"hold_{uuid.uuid4().hex}",
                    "account_id": request.account_id,
                    "api_key_id": request.api_key_id,
                    "model": request.model,
                    "provider": request.provider,
                    "byok": request.byok,
                    "amount": amount,
                    "use_ceiling": request.max_tokens is None,
                    "ttl": self.ttl,
                    "now": now,
                },
            ).fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate == "23505":
                raise InvalidEvent(str(exc).splitlines()[0], field="$.hold_id") from None
            raise map_error(exc) from exc
        assert row is not None
        allowed, reason, hold_id, held, available, key_remaining, expires_at = row
        return Authorization(
            allowed, Decision(reason), hold_id, held, available, key_remaining, expires_at
        )


def expire_holds(
    conn: psycopg.Connection[Any], q: Queries, now: datetime, limit: int = 5000
) -> int:
    """Mark active holds past their expiry as expired (the beat task); returns how many.

    Safe with several callers at once: each hold is claimed by one (SKIP LOCKED).
    """
    total = 0
    while True:
        with conn.transaction():
            n = len(conn.execute(q["expire_holds"], {"now": now, "limit": limit}).fetchall())
        total += n
        if n < limit:
            return total


def release(
    conn: psycopg.Connection[Any], q: Queries, hold_id: str, now: datetime, reason: str
) -> Decimal:
    """Release an active hold (the request was not dispatched); returns the amount released."""
    with conn.transaction():
        row = conn.execute(
            q["release_hold"], {"hold_id": hold_id, "now": now, "reason": reason}
        ).fetchone()
        if row is None:
            found = fetch_dicts(conn, q["hold_by_id"], {"hold_id": hold_id})
            if not found:
                raise BillingError(f"no hold {hold_id!r}")
            raise BillingError(f"hold {hold_id!r} is {found[0]['status']}, not active")
    return exact(row[2])


def list_holds(
    conn: psycopg.Connection[Any],
    q: Queries,
    account_id: str | None = None,
    status: HoldStatus | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    return fetch_dicts(
        conn,
        q["list_holds"],
        {"account_id": account_id, "status": status and status.value, "limit": limit},
    )


@dataclass(frozen=True)
class Availability:
    account_id: str
    balance: Decimal
    held: Decimal
    lapsed: Decimal  # granted credit past its expiry, not yet moved out by the expiry task
    available: Decimal


def availability(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, now: datetime
) -> Availability:
    rows = fetch_dicts(conn, q["wallet_availability"], {"account_id": account_id, "now": now})
    if not rows:
        raise BillingError(f"no account {account_id!r}")
    return Availability(**rows[0])


def set_ceiling(
    conn: psycopg.Connection[Any], q: Queries, model: str, amount: Decimal, actor: str
) -> None:
    """The worst case of a request to ``model`` without max_tokens (USD, beyond its input)."""
    if amount <= ZERO:
        raise BillingError("a ceiling must be positive")
    with conn.transaction():
        conn.execute(q["set_hold_ceiling"], {"model": model, "amount": amount, "actor": actor})
