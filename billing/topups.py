"""Top-ups through Stripe: the platform fee, the payment, refunds, disputes and auto top-up.

The customer buys ``credit``; the card pays ``charged = credit + fee``; the wallet gets exactly
``credit``. The fee rule lives in ONE function, ``quote``. Money moves only in
``process_stripe_event`` (and the helpers it calls), always from the *state of the Stripe object*
an event carries (a PaymentIntent's status, a charge's cumulative ``amount_refunded``, a dispute's
``status``) compared with what we already booked, never from the event sequence. So a duplicate
does nothing, and events arriving in any order converge to the same ledger. The inbox row is
marked processed in the transaction that moved the money.

Postings (each balanced, entries written in one statement):

* ``topup``:           wallet +credit, revenue:fees +fee, clearing:stripe -charged
* ``topup_refund``:    wallet -credit part, revenue:fees -fee part, clearing:stripe +refunded
                       (the opposite signs when a refund fails and its clawback is given back)
* ``dispute_hold``:    wallet -held credit, liability:dispute_holds +held credit (wallet frozen)
* ``dispute_release``: liability:dispute_holds -held credit, wallet +held credit (won)
* ``dispute_loss``:    liability:dispute_holds -held credit, revenue:fees -fee part,
                       clearing:stripe +disputed amount (lost: the card holder got it back)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation, localcontext
from enum import StrEnum
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from billing.db import Queries, fetch_dicts, map_error
from billing.errors import (
    BillingError,
    ConfigError,
    IdempotencyConflict,
    PaymentDeclined,
    PaymentError,
    Transient,
)
from billing.ledger import next_posting_id, post_movement, require_account
from billing.money import CENT, EXACT, ZERO, exact, format_cents, format_usd, to_cents
from billing.settings import Settings
from billing.wallets import record_crossings

log = logging.getLogger("billing.topups")

FROZEN = "wallet.frozen"
UNFROZEN = "wallet.unfrozen"
AUTO_TOPUP_FAILED = "wallet.auto_topup_failed"
ACTOR = "stripe"
MIN_CHARGE_CENTS = 50  # Stripe's minimum USD charge


class TopupStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class TopupKind(StrEnum):
    MANUAL = "manual"  # a PaymentIntent (client secret for the front end, or a saved card)
    CHECKOUT = "checkout"  # a hosted Checkout Session
    AUTO = "auto"  # off-session, on the saved payment method, when below threshold


class TopupPosting(StrEnum):
    TOPUP = "topup"
    REFUND = "topup_refund"
    DISPUTE_HOLD = "dispute_hold"
    DISPUTE_RELEASE = "dispute_release"
    DISPUTE_LOSS = "dispute_loss"


class Ledger(StrEnum):
    """Platform ledger accounts added by migration 0002."""

    FEES = "revenue:fees"
    CLEARING = "clearing:stripe"
    DISPUTE_HOLDS = "liability:dispute_holds"


class DisputeState(StrEnum):
    HELD = "held"
    WON = "won"
    LOST = "lost"


# Stripe dispute statuses. Inquiries (warning_*) are held too: they can become chargebacks.
DISPUTE_WON = frozenset({"won", "warning_closed", "prevented"})
DISPUTE_LOST = frozenset({"lost"})


# --- the fee rule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Quote:
    """What a top-up costs, in integer cents: ``charged = credit + fee``."""

    credit_cents: int
    fee_cents: int

    @property
    def charged_cents(self) -> int:
        return self.credit_cents + self.fee_cents

    @property
    def credit(self) -> Decimal:
        return exact(Decimal(self.credit_cents) * CENT)

    @property
    def fee(self) -> Decimal:
        return exact(Decimal(self.fee_cents) * CENT)

    @property
    def charged(self) -> Decimal:
        return exact(Decimal(self.charged_cents) * CENT)


def quote(credit: Decimal, rate: Decimal) -> Quote:
    """THE fee rule: ``fee = to_cents(credit * rate)`` (ROUND_HALF_EVEN, billing.money).

    ``credit`` must be whole cents and positive; the card pays ``credit + fee``. Example at 5%:
    $100.00 credit -> $5.00 fee -> $105.00 charged; $10.10 -> $0.505 rounds (half-even) to $0.50.
    """
    value = exact(credit)
    if value <= 0:
        raise BillingError("a top-up credit must be positive")
    if value != value.quantize(CENT):
        raise BillingError(f"a top-up credit must be whole cents, got {credit}")
    if not 0 <= rate < 1:
        raise BillingError(f"the fee rate must be in [0, 1), got {rate}")
    with localcontext(EXACT):
        fee_cents = to_cents(value * rate)
    result = Quote(credit_cents=to_cents(value), fee_cents=fee_cents)
    if result.charged_cents < MIN_CHARGE_CENTS:
        raise BillingError(f"a charge must be at least {format_cents(MIN_CHARGE_CENTS)} USD")
    return result


_RATIO = Context(prec=EXACT.prec, rounding=EXACT.rounding, traps=[InvalidOperation])


def split_refund(refunded_cents: int, credit_cents: int, charged_cents: int) -> tuple[int, int]:
    """Split a *cumulative* refunded amount into (credit part, fee part), in cents.

    Proportional clawback: credit part = ``to_cents(refunded * credit / charged)`` and the fee
    part is the remainder, so the parts always sum to the refund exactly. Applied to the
    cumulative total (``amount_refunded``), each partial refund books the difference from the
    previous split, so the rounding never drifts and a full refund takes back exactly the
    credit and the fee. Both parts are non-decreasing in ``refunded_cents``.
    """
    if not 0 <= refunded_cents <= charged_cents or charged_cents <= 0:
        raise BillingError(f"refund {refunded_cents} outside 0..{charged_cents} cents")
    with localcontext(_RATIO):  # 60 digits: the ratio may be inexact, to_cents rounds it once
        amount = Decimal(refunded_cents) * credit_cents / charged_cents * CENT
    credit_part = to_cents(amount)
    return credit_part, refunded_cents - credit_part


def topup_id_for(account_id: str, request_key: str) -> str:
    """A deterministic top-up id: the same (account, request key) is the same top-up."""
    digest = hashlib.sha256(f"{account_id}\x00{request_key}".encode()).hexdigest()
    return f"tu_{digest[:24]}"


# --- the Stripe port ------------------------------------------------------------------------
class Gateway(Protocol):
    """What this module needs from Stripe (``billing.stripe_client.StripeGateway``)."""

    def create_customer(self, account_id: str) -> dict[str, Any]: ...

    def create_payment_intent(
        self,
        *,
        key: str,
        customer_id: str,
        amount_cents: int,
        metadata: Mapping[str, str],
        payment_method: str | None = None,
        off_session: bool = False,
    ) -> dict[str, Any]: ...

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
    ) -> dict[str, Any]: ...

    def retrieve_payment_intent(self, intent_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]: ...

    def charges_since(self, since: datetime) -> Iterable[dict[str, Any]]: ...


def intent_key(topup_id: str) -> str:
    return f"gateway-billing:topup:{topup_id}:intent"


def checkout_key(topup_id: str) -> str:
    return f"gateway-billing:topup:{topup_id}:checkout"


# --- creating a top-up ----------------------------------------------------------------------
@dataclass(frozen=True)
class TopupView:
    topup_id: str
    account_id: str
    kind: TopupKind
    status: TopupStatus
    credit: Decimal
    fee: Decimal
    charged: Decimal
    refunded_credit: Decimal
    refunded_fee: Decimal
    payment_intent_id: str | None
    checkout_session_id: str | None
    charge_id: str | None
    failure_reason: str | None
    created_at: datetime
    succeeded_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TopupView:
        return cls(
            topup_id=row["topup_id"],
            account_id=row["account_id"],
            kind=TopupKind(row["kind"]),
            status=TopupStatus(row["status"]),
            credit=row["credit"],
            fee=row["fee"],
            charged=row["charged"],
            refunded_credit=row["refunded_credit"],
            refunded_fee=row["refunded_fee"],
            payment_intent_id=row["stripe_payment_intent_id"],
            checkout_session_id=row["stripe_checkout_session_id"],
            charge_id=row["stripe_charge_id"],
            failure_reason=row["failure_reason"],
            created_at=row["created_at"],
            succeeded_at=row["succeeded_at"],
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "topup_id": self.topup_id,
            "account_id": self.account_id,
            "kind": self.kind.value,
            "status": self.status.value,
            "credit": format_usd(self.credit),
            "fee": format_usd(self.fee),
            "charged": format_usd(self.charged),
            "refunded_credit": format_usd(self.refunded_credit),
            "refunded_fee": format_usd(self.refunded_fee),
            "payment_intent": self.payment_intent_id,
            "checkout_session": self.checkout_session_id,
            "charge": self.charge_id,
            "failure_reason": self.failure_reason,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class TopupCreated:
    topup: TopupView
    client_secret: str | None = None  # for the front end to confirm a PaymentIntent
    checkout_url: str | None = None  # the hosted page of a Checkout Session


def ensure_customer(
    conn: psycopg.Connection[Any], q: Queries, gateway: Gateway, account_id: str
) -> str:
    """The account's Stripe customer, created once (idempotency key from the account id)."""
    row = conn.execute(q["stripe_customer_get"], {"account_id": account_id}).fetchone()
    if row is not None:
        return str(row[0])
    require_account(conn, q, account_id)
    customer = gateway.create_customer(account_id)
    conn.execute(
        q["stripe_customer_insert"],
        {"account_id": account_id, "stripe_customer_id": customer["id"]},
    )
    row = conn.execute(q["stripe_customer_get"], {"account_id": account_id}).fetchone()
    assert row is not None
    return str(row[0])


def get_topup(conn: psycopg.Connection[Any], q: Queries, topup_id: str) -> TopupView:
    rows = fetch_dicts(conn, q["topup_get"], {"topup_id": topup_id})
    if not rows:
        raise BillingError(f"no top-up {topup_id!r}")
    return TopupView.from_row(rows[0])


def list_topups(
    conn: psycopg.Connection[Any], q: Queries, account_id: str | None = None, limit: int = 50
) -> list[TopupView]:
    rows = fetch_dicts(conn, q["topups_list"], {"account_id": account_id, "limit": limit})
    return [TopupView.from_row(r) for r in rows]


def _metadata(topup_id: str, account_id: str, quote_: Quote, kind: TopupKind) -> dict[str, str]:
    return {
        "topup_id": topup_id,
        "account_id": account_id,
        "kind": kind.value,
        "credit": format_cents(quote_.credit_cents),
        "fee": format_cents(quote_.fee_cents),
        "charged": format_cents(quote_.charged_cents),
    }


def _record_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup_id: str,
    account_id: str,
    quote_: Quote,
    kind: TopupKind,
    payment_method: str | None = None,
) -> None:
    """Insert the top-up row (a repeat with the same id and amount is fine)."""
    require_account(conn, q, account_id)
    conn.execute(
        q["topup_insert"],
        {
            "topup_id": topup_id,
            "account_id": account_id,
            "kind": kind.value,
            "credit": quote_.credit,
            "fee": quote_.fee,
            "charged": quote_.charged,
            "payment_method": payment_method,
        },
    )
    existing = fetch_dicts(conn, q["topup_get"], {"topup_id": topup_id})[0]
    if (existing["account_id"], existing["charged"], existing["kind"]) != (
        account_id,
        quote_.charged,
        kind.value,
    ):
        raise IdempotencyConflict(
            f"top-up {topup_id} already exists for {existing['account_id']} with "
            f"{format_usd(existing['charged'])} USD ({existing['kind']}); use a new key"
        )


def create_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    gateway: Gateway,
    account_id: str,
    credit: Decimal,
    *,
    request_key: str,
    payment_method: str | None = None,
    checkout: bool = False,
    success_url: str | None = None,
    cancel_url: str | None = None,
) -> TopupCreated:
    """Create (once per ``request_key``) a top-up and its PaymentIntent or Checkout Session.

    Retrying with the same key returns the same top-up and never creates a second intent: the
    top-up row is locked while Stripe is called and stores the intent's id in that transaction;
    Stripe's idempotency key (from the top-up id) guards a crash between the two.
    Nothing is credited here: the wallet moves when Stripe reports success (webhook).
    """
    kind = TopupKind.CHECKOUT if checkout else TopupKind.MANUAL
    if checkout and not (success_url and cancel_url):
        raise BillingError("a checkout top-up needs a success URL and a cancel URL")
    quote_ = quote(credit, settings.topup_fee_rate)
    topup_id = topup_id_for(account_id, request_key)
    with conn.transaction():
        _record_topup(conn, q, topup_id, account_id, quote_, kind)
    customer_id = ensure_customer(conn, q, gateway, account_id)
    metadata = _metadata(topup_id, account_id, quote_, kind)
    try:
        with conn.transaction():
            row = fetch_dicts(conn, q["topup_lock"], {"topup_id": topup_id})[0]
            if row["stripe_checkout_session_id"] or row["stripe_payment_intent_id"]:
                view = TopupView.from_row(row)
                secret = url = None
                if view.status is TopupStatus.PENDING and view.checkout_session_id and checkout:
                    # the hosted page of the session already created (None once it is closed)
                    url = gateway.retrieve_checkout_session(view.checkout_session_id).get("url")
                elif view.payment_intent_id and view.status is TopupStatus.PENDING and not checkout:
                    secret = gateway.retrieve_payment_intent(view.payment_intent_id).get(
                        "client_secret"
                    )
                return TopupCreated(view, client_secret=secret, checkout_url=url)
            if checkout:
                assert success_url is not None and cancel_url is not None
                session = gateway.create_checkout_session(
                    key=checkout_key(topup_id),
                    customer_id=customer_id,
                    topup_id=topup_id,
                    credit_cents=quote_.credit_cents,
                    fee_cents=quote_.fee_cents,
                    metadata=metadata,
                    success_url=success_url,
                    cancel_url=cancel_url,
                )
                _set_ids(conn, q, topup_id, pi=_id(session.get("payment_intent")), cs=session["id"])
                return TopupCreated(get_topup(conn, q, topup_id), checkout_url=session.get("url"))
            intent = gateway.create_payment_intent(
                key=intent_key(topup_id),
                customer_id=customer_id,
                amount_cents=quote_.charged_cents,
                metadata=metadata,
                payment_method=payment_method,
            )
            _set_ids(conn, q, topup_id, pi=intent["id"], charge=_id(intent.get("latest_charge")))
            return TopupCreated(
                get_topup(conn, q, topup_id), client_secret=intent.get("client_secret")
            )
    except PaymentDeclined as exc:
        with conn.transaction():
            conn.execute(
                q["topup_mark_unpaid"],
                {"topup_id": topup_id, "status": TopupStatus.FAILED.value, "reason": str(exc)},
            )
        raise


def _id(value: Any) -> str | None:
    """A Stripe reference that may be an id or an expanded object."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        found = value.get("id")
        return found if isinstance(found, str) else None
    return None


def _set_ids(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup_id: str,
    *,
    pi: str | None = None,
    cs: str | None = None,
    charge: str | None = None,
) -> None:
    conn.execute(
        q["topup_set_stripe_ids"],
        {
            "topup_id": topup_id,
            "payment_intent_id": pi,
            "checkout_session_id": cs,
            "charge_id": charge,
        },
    )


# --- applying Stripe state to the ledger ----------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What processing an event did. ``done`` False: not applicable yet, retry later
    (``abandoned``: not any more, the event gave up waiting; an operator may replay it)."""

    text: str
    done: bool = True
    abandoned: bool = False


WAITING_GIVE_UP = timedelta(days=3)
"""How long an event waits for a top-up we do not know before it gives up (is abandoned).

A top-up is recorded before Stripe hears of it, so an event of ours finds it within seconds;
three days is Stripe's own retry window. Abandoned events are listed and replayable."""


def _outbox(conn: psycopg.Connection[Any], q: Queries, key: str, payload: dict[str, Any]) -> None:
    conn.execute(
        q["insert_outbox"], {"routing_keys": [key], "payloads": [Jsonb({"type": key, **payload})]}
    )


def _post(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup: Mapping[str, Any],
    kind: TopupPosting,
    *,
    reference: str,
    memo: str,
    wallet: Decimal = ZERO,
    system: Mapping[str, Decimal],
) -> int:
    posting_id = next_posting_id(conn, q)
    changes = post_movement(
        conn,
        q,
        posting_id=posting_id,
        kind=kind.value,
        wallet_deltas={topup["account_id"]: wallet},
        system_deltas=system,
        reference=reference,
        memo=memo,
        actor=ACTOR,
    )
    conn.execute(
        q["topup_posting_insert"],
        {"posting_id": posting_id, "topup_id": topup["topup_id"], "kind": kind.value},
    )
    record_crossings(conn, q, changes)
    return posting_id


def _cents(amount: Decimal) -> int:
    return to_cents(amount)


def _book_payment_first(
    conn: psycopg.Connection[Any], q: Queries, topup: dict[str, Any], source: str
) -> list[str]:
    """A refund or dispute exists only on a successful charge: book the payment first if its
    own event has not come yet. The outcome's notes so far (``credited``, or none)."""
    if topup["status"] == TopupStatus.SUCCEEDED:
        return []
    _ensure_succeeded(conn, q, topup, amount_cents=None, currency=None, source=source)
    return ["credited"]


def _ensure_succeeded(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup: dict[str, Any],
    *,
    amount_cents: int | None,
    currency: str | None,
    source: str,
) -> str | None:
    """Credit the wallet once; returns a refusal reason if Stripe's amount is not ours."""
    if topup["status"] == TopupStatus.SUCCEEDED:
        return None
    charged = _cents(topup["charged"])
    if amount_cents is not None and amount_cents != charged:
        return f"amount mismatch: stripe {amount_cents} cents, top-up {charged} cents"
    if currency is not None and currency.lower() != "usd":
        return f"currency mismatch: stripe {currency}, top-up USD"
    posting_id = _post(
        conn,
        q,
        topup,
        TopupPosting.TOPUP,
        reference=topup["topup_id"],
        memo=(
            f"top-up {format_usd(topup['credit'])} + fee {format_usd(topup['fee'])} "
            f"= {format_usd(topup['charged'])} USD charged ({source})"
        ),
        wallet=topup["credit"],
        system={Ledger.FEES: topup["fee"], Ledger.CLEARING: -topup["charged"]},
    )
    conn.execute(
        q["topup_mark_succeeded"], {"topup_id": topup["topup_id"], "posting_id": posting_id}
    )
    conn.execute(
        q["auto_topup_settle"], {"topup_id": topup["topup_id"], "succeeded": True, "reason": None}
    )
    topup["status"] = TopupStatus.SUCCEEDED.value
    return None


def _mark_unpaid(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup: Mapping[str, Any],
    status: TopupStatus,
    reason: str,
) -> str:
    if topup["status"] == TopupStatus.SUCCEEDED:
        return f"ignored: top-up already succeeded ({status.value} is stale)"
    changed = conn.execute(
        q["topup_mark_unpaid"],
        {"topup_id": topup["topup_id"], "status": status.value, "reason": reason},
    ).fetchone()
    settled = conn.execute(
        q["auto_topup_settle"],
        {"topup_id": topup["topup_id"], "succeeded": False, "reason": reason},
    ).fetchone()
    if settled is not None:
        _outbox(
            conn,
            q,
            AUTO_TOPUP_FAILED,
            {"account_id": topup["account_id"], "topup_id": topup["topup_id"], "reason": reason},
        )
    return f"{status.value}: {reason}" if changed else f"already {topup['status']}"


def _converge_refunds(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup: dict[str, Any],
    snapshot: tuple[datetime, int] | None = None,
) -> str:
    """Book the difference between the refunded total Stripe's state implies and ours.

    The target is the cumulative ``amount_refunded`` of the newest charge snapshot (by event
    time; the largest at that time) minus the failed refunds it still counted: created at or
    before it and failed at or after it (``stripe_refund_failures``). A failed or canceled
    refund returns the money to us and lowers Stripe's total; a refund created after the
    snapshot is not in it, so its failure must not give back an earlier refund's clawback.
    That is a function of the events received, not of their order, so duplicates and late
    events converge; an older snapshot never moves the total. The split is applied to the
    cumulative target, so a reversal gives back exactly the credit and fee parts its refund
    took.
    """
    topup_id = topup["topup_id"]
    at, snapshot_cents = topup["refund_snapshot_at"], int(topup["refund_snapshot_cents"])
    if snapshot is not None:
        row = conn.execute(
            q["topup_refund_snapshot"],
            {"topup_id": topup_id, "at": snapshot[0], "cents": snapshot[1]},
        ).fetchone()
        assert row is not None
        at, snapshot_cents = row[0], int(row[1])
        topup["refund_snapshot_at"], topup["refund_snapshot_cents"] = at, snapshot_cents
    failed = conn.execute(
        q["refund_failures_not_in_snapshot"], {"topup_id": topup_id, "at": at}
    ).fetchone()
    assert failed is not None
    credit_c, charged_c = _cents(topup["credit"]), _cents(topup["charged"])
    target = max(0, min(snapshot_cents, charged_c) - _cents(failed[0]))
    booked_credit, booked_fee = _cents(topup["refunded_credit"]), _cents(topup["refunded_fee"])
    booked = booked_credit + booked_fee
    if target == booked:
        return f"refunds up to date ({format_cents(booked)} USD booked)"
    credit_part, fee_part = split_refund(target, credit_c, charged_c)
    d_credit, d_fee = credit_part - booked_credit, fee_part - booked_fee
    credit_dec, fee_dec = exact(Decimal(d_credit) * CENT), exact(Decimal(d_fee) * CENT)
    number = int(topup["refund_postings"]) + 1
    if target > booked:
        what = f"refund of {format_cents(d_credit + d_fee)} USD"
    else:
        what = f"failed refunds give back {format_cents(-(d_credit + d_fee))} USD"
    _post(
        conn,
        q,
        topup,
        TopupPosting.REFUND,
        reference=f"{topup_id}:refund:{number}:{target}",
        memo=(
            f"{what}: credit {format_cents(abs(d_credit))}, fee {format_cents(abs(d_fee))} "
            f"(refunded in total {format_cents(target)})"
        ),
        wallet=-credit_dec,
        system={Ledger.FEES: -fee_dec, Ledger.CLEARING: credit_dec + fee_dec},
    )
    conn.execute(
        q["topup_add_refund"],
        {"topup_id": topup_id, "credit": credit_dec, "fee": fee_dec, "refund_postings": number},
    )
    topup["refunded_credit"] += credit_dec
    topup["refunded_fee"] += fee_dec
    topup["refund_postings"] = number
    if target > booked:
        return f"refunded {format_cents(d_credit + d_fee)} USD (total {format_cents(target)})"
    return f"{what} (total refunded {format_cents(target)})"


def _converge_dispute(
    conn: psycopg.Connection[Any], q: Queries, topup: dict[str, Any], dispute: Mapping[str, Any]
) -> str:
    """Hold on an open dispute; release (won) or give up (lost) the hold once it closes."""
    dispute_id = str(dispute["id"])
    status = str(dispute.get("status") or "")
    row = fetch_dicts(conn, q["dispute_lock"], {"dispute_id": dispute_id})
    account = topup["account_id"]
    notes: list[str] = []
    if not row:
        amount_c = min(int(dispute.get("amount") or 0), _cents(topup["charged"]))
        if amount_c <= 0:
            return "ignored: dispute without an amount"
        held_c, fee_c = split_refund(amount_c, _cents(topup["credit"]), _cents(topup["charged"]))
        held = exact(Decimal(held_c) * CENT)
        posting = _post(
            conn,
            q,
            topup,
            TopupPosting.DISPUTE_HOLD,
            reference=dispute_id,
            memo=f"dispute {dispute_id} opened: {format_cents(held_c)} USD of credit held",
            wallet=-held,
            system={Ledger.DISPUTE_HOLDS: held},
        )
        conn.execute(
            q["dispute_insert"],
            {
                "dispute_id": dispute_id,
                "topup_id": topup["topup_id"],
                "account_id": account,
                "amount": exact(Decimal(amount_c) * CENT),
                "held_credit": held,
                "fee_part": exact(Decimal(fee_c) * CENT),
                "stripe_status": status,
                "posting_id": posting,
            },
        )
        frozen = conn.execute(q["wallet_freeze"], {"account_id": account}).fetchone()
        if frozen is not None:
            _outbox(
                conn,
                q,
                FROZEN,
                {"account_id": account, "reason": "dispute", "dispute_id": dispute_id},
            )
        notes.append(f"held {format_cents(held_c)} USD")
        row = fetch_dicts(conn, q["dispute_lock"], {"dispute_id": dispute_id})
    current = row[0]
    if current["status"] != DisputeState.HELD:
        return "; ".join([*notes, f"dispute already {current['status']}"])
    if status in DISPUTE_WON or status in DISPUTE_LOST:
        held = current["held_credit"]
        system: dict[str, Decimal]
        if status in DISPUTE_WON:
            state, kind = DisputeState.WON, TopupPosting.DISPUTE_RELEASE
            wallet, system = held, {Ledger.DISPUTE_HOLDS: -held}
            memo = f"dispute {dispute_id} won: {format_usd(held)} USD released"
        else:
            state, kind = DisputeState.LOST, TopupPosting.DISPUTE_LOSS
            wallet = ZERO
            system = {
                Ledger.DISPUTE_HOLDS: -held,
                Ledger.FEES: -current["fee_part"],
                Ledger.CLEARING: current["amount"],
            }
            memo = (
                f"dispute {dispute_id} lost: {format_usd(current['amount'])} USD charged back "
                f"(credit {format_usd(held)}, fee {format_usd(current['fee_part'])})"
            )
        posting = _post(
            conn, q, topup, kind, reference=dispute_id, memo=memo, wallet=wallet, system=system
        )
        conn.execute(
            q["dispute_close"],
            {
                "dispute_id": dispute_id,
                "status": state.value,
                "stripe_status": status,
                "posting_id": posting,
            },
        )
        unfrozen = conn.execute(q["wallet_unfreeze"], {"account_id": account}).fetchone()
        if unfrozen is not None:
            _outbox(conn, q, UNFROZEN, {"account_id": account, "dispute_id": dispute_id})
        notes.append(f"dispute {state.value}")
    else:
        conn.execute(q["dispute_touch"], {"dispute_id": dispute_id, "stripe_status": status})
        notes.append(f"dispute open ({status})")
    return "; ".join(notes)


def _lock_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    topup_id: str | None = None,
    pi: str | None = None,
    charge: str | None = None,
    cs: str | None = None,
) -> dict[str, Any] | None:
    if not (topup_id or pi or charge or cs):
        return None
    rows = fetch_dicts(
        conn,
        q["topup_lock_by_stripe"],
        {
            "topup_id": topup_id,
            "payment_intent_id": pi,
            "charge_id": charge,
            "checkout_session_id": cs,
        },
    )
    if not rows:
        return None
    topup = rows[0]
    _set_ids(conn, q, topup["topup_id"], pi=pi, cs=cs, charge=charge)
    return topup


def _metadata_topup(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("topup_id"), str):
        return str(metadata["topup_id"])
    return None


NOT_OURS = Outcome("ignored: not a top-up of ours")


def _waiting(what: str) -> Outcome:
    return Outcome(f"waiting: no top-up known for {what}", done=False)


def _on_payment_intent(
    conn: psycopg.Connection[Any], q: Queries, event_type: str, pi: Mapping[str, Any]
) -> Outcome:
    topup_id = _metadata_topup(pi)
    topup = _lock_topup(
        conn, q, topup_id=topup_id, pi=pi.get("id"), charge=_id(pi.get("latest_charge"))
    )
    if topup is None:
        return _waiting(f"payment intent {pi.get('id')}") if topup_id else NOT_OURS
    if event_type == "payment_intent.succeeded" or pi.get("status") == "succeeded":
        amount = pi.get("amount_received") or pi.get("amount")
        refused = _ensure_succeeded(
            conn,
            q,
            topup,
            amount_cents=int(amount) if amount is not None else None,
            currency=pi.get("currency"),
            source=f"payment intent {pi.get('id')}",
        )
        return Outcome(f"refused: {refused}") if refused else Outcome("credited")
    if event_type == "payment_intent.canceled":
        return Outcome(_mark_unpaid(conn, q, topup, TopupStatus.CANCELED, "canceled"))
    error = pi.get("last_payment_error") or {}
    reason = str(error.get("code") or error.get("message") or "payment failed")
    return Outcome(_mark_unpaid(conn, q, topup, TopupStatus.FAILED, reason))


def _on_checkout(
    conn: psycopg.Connection[Any], q: Queries, event_type: str, session: Mapping[str, Any]
) -> Outcome:
    topup_id = _metadata_topup(session) or session.get("client_reference_id")
    pi = _id(session.get("payment_intent"))
    topup = _lock_topup(conn, q, topup_id=topup_id, pi=pi, cs=session.get("id"))
    if topup is None:
        return _waiting(f"checkout session {session.get('id')}") if topup_id else NOT_OURS
    if event_type == "checkout.session.async_payment_failed":
        return Outcome(_mark_unpaid(conn, q, topup, TopupStatus.FAILED, "async payment failed"))
    if event_type == "checkout.session.expired":
        return Outcome(_mark_unpaid(conn, q, topup, TopupStatus.CANCELED, "checkout expired"))
    if session.get("payment_status") != "paid":
        return Outcome(f"checkout {session.get('status')}, payment {session.get('payment_status')}")
    amount = session.get("amount_total")
    refused = _ensure_succeeded(
        conn,
        q,
        topup,
        amount_cents=int(amount) if amount is not None else None,
        currency=session.get("currency"),
        source=f"checkout session {session.get('id')}",
    )
    return Outcome(f"refused: {refused}") if refused else Outcome("credited")


def _charge_succeeded(charge: Mapping[str, Any]) -> bool:
    return (
        bool(charge.get("paid"))
        and charge.get("status") == "succeeded"
        and charge.get("captured", True) is not False
    )


def _on_charge(
    conn: psycopg.Connection[Any],
    q: Queries,
    event_type: str,
    charge: Mapping[str, Any],
    at: datetime,
) -> Outcome:
    pi = _id(charge.get("payment_intent"))
    topup_id = _metadata_topup(charge)
    topup = _lock_topup(conn, q, topup_id=topup_id, pi=pi, charge=charge.get("id"))
    if topup is None:
        # Stripe copies an intent's metadata to its charge: without our topup_id it is another
        # product's charge on the same account, not one of ours arriving early.
        return _waiting(f"charge {charge.get('id')}") if topup_id else NOT_OURS
    notes = []
    if topup["status"] != TopupStatus.SUCCEEDED:
        if not _charge_succeeded(charge):
            return Outcome(f"ignored: charge {charge.get('status')}")
        refused = _ensure_succeeded(
            conn,
            q,
            topup,
            amount_cents=int(charge["amount"]),
            currency=charge.get("currency"),
            source=f"charge {charge.get('id')}",
        )
        if refused:
            return Outcome(f"refused: {refused}")
        notes.append("credited")
    if charge.get("amount_refunded") is not None and _charge_succeeded(charge):
        snapshot = (at, int(charge["amount_refunded"]))
        notes.append(_converge_refunds(conn, q, topup, snapshot))
    return Outcome("; ".join(notes) or "nothing to do")


REFUND_REVERSED = frozenset({"failed", "canceled"})


def _on_refund(
    conn: psycopg.Connection[Any], q: Queries, refund: Mapping[str, Any], at: datetime
) -> Outcome:
    """A refund that failed or was canceled: the money is back with us, so is the clawback.

    Refunds themselves are booked from the charge's cumulative total (``charge.refunded``);
    a refund object only matters when its status says it will never reach the card holder.
    """
    status = str(refund.get("status") or "")
    if status not in REFUND_REVERSED:
        return Outcome(f"ignored: refund {status} (refunds are booked from charge.refunded)")
    pi, charge = _id(refund.get("payment_intent")), _id(refund.get("charge"))
    topup = _lock_topup(conn, q, topup_id=_metadata_topup(refund), pi=pi, charge=charge)
    if topup is None:
        # A refund carries none of our metadata: it may be one of ours whose charge we do not
        # know yet (a checkout top-up before checkout.session.completed). It waits, and gives
        # up after the window like other waiting events (listed, replayable).
        return _waiting(f"refund {refund.get('id')} (charge {charge})")
    notes = _book_payment_first(conn, q, topup, f"refund {refund.get('id')}")
    amount = int(refund.get("amount") or 0)
    if amount <= 0:
        return Outcome("ignored: refund without an amount")
    inserted = conn.execute(
        q["refund_failure_insert"],
        {
            "refund_id": str(refund["id"]),
            "topup_id": topup["topup_id"],
            "amount": exact(Decimal(amount) * CENT),
            "stripe_status": status,
            "failure_reason": refund.get("failure_reason"),
            "refund_created": _stripe_time(refund.get("created")),
            "at": at,
        },
    ).fetchone()
    if inserted is not None:
        notes.append(f"refund {refund['id']} {status}: {format_cents(amount)} USD")
    notes.append(_converge_refunds(conn, q, topup))
    return Outcome("; ".join(notes))


def _on_dispute(conn: psycopg.Connection[Any], q: Queries, dispute: Mapping[str, Any]) -> Outcome:
    pi, charge = _id(dispute.get("payment_intent")), _id(dispute.get("charge"))
    topup = _lock_topup(conn, q, topup_id=_metadata_topup(dispute), pi=pi, charge=charge)
    if topup is None:
        return _waiting(f"dispute {dispute.get('id')} (charge {charge})")
    notes = _book_payment_first(conn, q, topup, f"dispute {dispute.get('id')}")
    notes.append(_converge_dispute(conn, q, topup, dispute))
    return Outcome("; ".join(notes))


REFUND_EVENTS = frozenset(
    {"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"}
)


def _stripe_time(value: object) -> datetime | None:
    """A Stripe unix timestamp, or None when absent or not an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def event_time(event: Mapping[str, Any], received_at: datetime | None = None) -> datetime:
    """When Stripe says the event happened (``created``), else when we received it."""
    created = _stripe_time(event.get("created"))
    if created is not None:
        return created
    return received_at if received_at is not None else datetime.now(UTC)


def apply_event(
    conn: psycopg.Connection[Any],
    q: Queries,
    event: Mapping[str, Any],
    received_at: datetime | None = None,
) -> Outcome:
    """Apply one verified event's object state to our records. Call inside a transaction."""
    event_type = str(event.get("type"))
    obj = event["data"]["object"]
    at = event_time(event, received_at)
    if event_type.startswith("payment_intent."):
        if event_type in (
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
        ):
            return _on_payment_intent(conn, q, event_type, obj)
    elif event_type.startswith("checkout.session."):
        return _on_checkout(conn, q, event_type, obj)
    elif event_type.startswith("charge.dispute."):
        return _on_dispute(conn, q, obj)
    elif event_type in ("charge.succeeded", "charge.refunded", "charge.captured"):
        return _on_charge(conn, q, event_type, obj, at)
    elif event_type in REFUND_EVENTS:
        return _on_refund(conn, q, obj, at)
    return Outcome(f"ignored: {event_type} is not handled")


def process_stripe_event(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, event_id: str
) -> Outcome:
    """Process one stored event: move the money and mark it processed in ONE transaction.

    A processed event is a no-op; a failure leaves it unprocessed (with ``last_error``) for a
    retry; an event whose top-up is not known yet stays pending (``Outcome.done`` False) until
    ``WAITING_GIVE_UP`` has passed, then it is abandoned (listed, replayable, no longer scanned).
    """
    del settings  # part of the task signature; nothing here depends on it yet
    try:
        with conn.transaction():
            conn.execute(q["stripe_event_attempt"], {"event_id": event_id})
        with conn.transaction():
            rows = fetch_dicts(conn, q["stripe_event_lock"], {"event_id": event_id})
            if not rows:
                raise BillingError(f"no stored stripe event {event_id!r}")
            if rows[0]["processed_at"] is not None:
                return Outcome("duplicate: already processed")
            outcome = apply_event(conn, q, rows[0]["event"], rows[0]["received_at"])
            if outcome.done:
                conn.execute(
                    q["stripe_event_done"], {"event_id": event_id, "outcome": outcome.text}
                )
            else:
                waiting = conn.execute(
                    q["stripe_event_waiting"],
                    {"event_id": event_id, "outcome": outcome.text, "give_up": WAITING_GIVE_UP},
                ).fetchone()
                if waiting is not None and waiting[0] is not None:
                    outcome = Outcome(outcome.text, done=False, abandoned=True)
        log.info("stripe event %s: %s", event_id, outcome.text)
        return outcome
    except (BillingError, psycopg.Error) as exc:
        error = map_error(exc) if isinstance(exc, psycopg.Error) else exc
        try:
            with conn.transaction():
                conn.execute(q["stripe_event_error"], {"event_id": event_id, "error": str(error)})
        except psycopg.Error:
            log.warning("could not record the error of stripe event %s", event_id)
        if error is exc:
            raise
        raise error from exc


@dataclass(frozen=True)
class PendingResult:
    processed: int
    waiting: int
    failed: int
    abandoned: int = 0


def process_pending(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, limit: int = 1000
) -> PendingResult:
    """Re-run stored events not processed yet (lost hand-offs, failures, early arrivals).

    The least-tried go first, so events that keep waiting or failing never crowd out fresh
    ones; abandoned events are not scanned (``replay_stripe_events`` brings them back).
    """
    ids = [r[0] for r in conn.execute(q["stripe_events_pending"], {"limit": limit})]
    processed = waiting = failed = abandoned = 0
    for event_id in ids:
        try:
            outcome = process_stripe_event(conn, q, settings, event_id)
        except BillingError as exc:
            log.warning("stripe event %s failed: %s", event_id, exc)
            failed += 1
            continue
        if outcome.done:
            processed += 1
        elif outcome.abandoned:
            abandoned += 1
        else:
            waiting += 1
    return PendingResult(processed, waiting, failed, abandoned)


EVENT_STATES = ("pending", "abandoned", "ignored", "processed")


def list_stripe_events(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    state: str | None = None,
    event_type: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Stored events, newest first, in a state (``EVENT_STATES``) and of a type."""
    if state is not None and state not in EVENT_STATES:
        raise BillingError(f"unknown event state {state!r}; one of {', '.join(EVENT_STATES)}")
    return fetch_dicts(
        conn, q["stripe_events_list"], {"state": state, "type": event_type, "limit": limit}
    )


def replay_stripe_events(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, event_ids: Iterable[str]
) -> list[tuple[str, Outcome]]:
    """Process abandoned or ignored events again now (after a fix), with a fresh window.

    Processing converges from the state each event carries, so a replay books only what is
    still missing. Events in another state are refused (use ``process_pending``).
    """
    results = []
    for event_id in event_ids:
        with conn.transaction():
            reopened = conn.execute(q["stripe_event_replay"], {"event_id": event_id}).fetchone()
        if reopened is None:
            raise BillingError(f"stripe event {event_id!r} is not abandoned or ignored")
        results.append((event_id, process_stripe_event(conn, q, settings, event_id)))
    return results


def store_event(
    conn: psycopg.Connection[Any], q: Queries, payload: bytes, event: Mapping[str, Any]
) -> bool:
    """Store a verified event in the inbox; returns True when it still needs processing."""
    with conn.transaction():
        row = conn.execute(
            q["stripe_event_store"],
            {
                "event_id": event["id"],
                "type": event["type"],
                "api_version": event.get("api_version"),
                "livemode": bool(event.get("livemode")),
                "payload": payload,
                "event": Jsonb(event),
            },
        ).fetchone()
    assert row is not None
    return row[0] is None


# --- auto top-up ----------------------------------------------------------------------------
# The attempt rule. A pending auto top-up (claimed and committed under the key of its attempt
# number) may have reached Stripe as soon as it is committed. It is never canceled, marked
# failed or replaced by a new attempt number until Stripe answers for it: an intent (recorded;
# its webhook settles it and clears pending_topup_id), or a decline / permanent refusal of THAT
# request (marked failed, auto top-up disabled). Until then it is resent under its own key with
# its stored request (amount, payment method), and only while auto top-up is enabled and the
# wallet not frozen: disabling stops resends, re-enabling resumes the same attempt, and new
# settings (amount, card) apply to the next attempt only. An unexpected error leaves it pending.
#
# Lock order, every path: the top-up row (topups) BEFORE the settings row
# (auto_topup_settings). The sender and the webhooks lock both in that order; the claim,
# set_auto_topup, disable_auto_topup and _refused without a top-up lock only the settings row
# (the claim inserts the new top-up, which nobody else can see until it commits).
def set_auto_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    account_id: str,
    *,
    threshold: Decimal,
    amount: Decimal,
    payment_method: str,
) -> None:
    """Enable auto top-up: below ``threshold``, buy ``amount`` of credit (plus the fee)."""
    quote(amount, settings.topup_fee_rate)  # validates the amount
    if exact(threshold) < 0:
        raise BillingError("the threshold must not be negative")
    if not payment_method.strip():
        raise BillingError("a saved payment method is required")
    with conn.transaction():
        require_account(conn, q, account_id)
        conn.execute(
            q["auto_topup_upsert"],
            {
                "account_id": account_id,
                "threshold": exact(threshold),
                "amount": exact(amount),
                "payment_method": payment_method,
            },
        )


def disable_auto_topup(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, reason: str = "disabled"
) -> None:
    """Disable: no new attempt is claimed. A pending top-up already claimed is NOT canceled.

    Its request may have reached Stripe (an answer lost to a timeout): canceling it and later
    claiming a new attempt number would send a second request under a new key, a second
    charge. It stays pending: its webhook settles it if Stripe has it, and it is resent (same
    key, same request) only after auto top-up is enabled again. Only the settings row is
    locked (see "Lock order" above).
    """
    with conn.transaction():
        row = conn.execute(
            q["auto_topup_disable"], {"account_id": account_id, "reason": reason}
        ).fetchone()
        if row is None:
            raise BillingError(f"no auto top-up for {account_id!r}")


@dataclass(frozen=True)
class AutoTopupResult:
    account_id: str
    topup_id: str | None
    outcome: str  # "created", "declined: ..." / "refused: ..." (disabled), "retry: ..." (skipped)


def check_auto_topups(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    gateway: Gateway,
    limit: int = 100,
) -> list[AutoTopupResult]:
    """Create one off-session PaymentIntent per account below its threshold.

    Safe under concurrent callers: each account is claimed with ``FOR UPDATE SKIP LOCKED`` on its
    settings row and its top-up recorded as pending and committed BEFORE Stripe is called, so a
    second caller sees the pending top-up and a webhook arriving first finds it. The intent is
    then created while the top-up row is locked (``SKIP LOCKED``: one sender), with the
    idempotency key of the top-up id (from account and attempt number), and recorded. If the
    call fails transiently, or the process dies before the intent is recorded, the top-up stays
    pending without an intent and the next run sends it again with the same key, whatever the
    balance did meanwhile (Stripe answers with the intent it may already have created).

    One account never stops the others: a permanent refusal (a decline, a payment method
    Stripe no longer knows, an idempotency conflict) disables that account's auto top-up with
    the reason and writes ``wallet.auto_topup_failed``; a transient failure (Stripe or the
    database unreachable) skips it until the next run, and so does an unexpected error while a
    top-up is pending (it may have reached Stripe: see the attempt rule above). Each outcome is
    in the result. Only a configuration error stops the run: it is the same for every account.
    """
    accounts = [r[0] for r in conn.execute(q["auto_topup_candidates"], {"limit": limit})]
    results = []
    for account_id in accounts:
        try:
            result = _auto_topup(conn, q, settings, gateway, account_id)
        except ConfigError:
            raise
        except (BillingError, psycopg.Error) as exc:
            error = map_error(exc) if isinstance(exc, psycopg.Error) else exc
            if isinstance(error, Transient):
                log.warning("auto top-up of %s skipped this run: %s", account_id, error)
                result = AutoTopupResult(account_id, None, f"retry: {error}")
            else:
                result = _unexpected(conn, q, account_id, error)
        if result is not None:
            results.append(result)
    return results


def _refusal_reason(exc: BillingError) -> str:
    if isinstance(exc, PaymentDeclined):
        return f"declined: {exc.code or exc}"
    return f"refused: {exc}"


def _unexpected(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, error: BillingError
) -> AutoTopupResult:
    """An error nobody expected (the transaction it came from rolled back).

    With a pending top-up (claimed and committed, perhaps already sent) nothing is changed:
    Stripe may have it, so it is resent under its key next run. Without one the error came
    before any request of this account: auto top-up is disabled with the reason.
    """
    row = conn.execute(q["auto_topup_pending_get"], {"account_id": account_id}).fetchone()
    if row is not None and row[0] is not None:
        log.error(
            "auto top-up %s of %s left pending after an unexpected error: %s",
            row[0],
            account_id,
            error,
        )
        return AutoTopupResult(account_id, str(row[0]), f"retry: {error}")
    log.warning("auto top-up of %s refused: %s", account_id, error)
    return _refused(conn, q, account_id, None, _refusal_reason(error))


def _refused(
    conn: psycopg.Connection[Any],
    q: Queries,
    account_id: str,
    topup_id: str | None,
    reason: str,
    attempt: int | None = None,
) -> AutoTopupResult:
    """Disable the account's auto top-up for good, and tell the gateway.

    ``topup_id`` is the top-up Stripe refused (locked by the caller, before the settings): it
    is marked failed and no longer pending. Without it only the settings row is locked and a
    pending top-up is kept (it may have reached Stripe; re-enabling resumes it).
    """
    with conn.transaction():
        if topup_id is not None:
            conn.execute(
                q["topup_mark_unpaid"],
                {"topup_id": topup_id, "status": TopupStatus.FAILED.value, "reason": reason},
            )
        conn.execute(
            q["auto_topup_declined"],
            {"account_id": account_id, "reason": reason, "attempts": attempt, "topup_id": topup_id},
        )
        _outbox(
            conn,
            q,
            AUTO_TOPUP_FAILED,
            {"account_id": account_id, "topup_id": topup_id, "reason": reason},
        )
    return AutoTopupResult(account_id, topup_id, reason)


def _auto_topup(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    gateway: Gateway,
    account_id: str,
) -> AutoTopupResult | None:
    customer_id = ensure_customer(conn, q, gateway, account_id)
    # 1. Claim and record the top-up as pending, and COMMIT, before Stripe hears of it: a
    #    webhook arriving before our answer (or after an answer we lost) finds the top-up.
    with conn.transaction():
        rows = fetch_dicts(conn, q["auto_topup_claim"], {"account_id": account_id})
        if rows:
            claim = rows[0]
            attempt = int(claim["attempts"]) + 1
            quote_ = quote(claim["amount"], settings.topup_fee_rate)
            topup_id = topup_id_for(account_id, f"auto:{attempt}")
            _record_topup(
                conn, q, topup_id, account_id, quote_, TopupKind.AUTO, claim["payment_method"]
            )
            conn.execute(
                q["auto_topup_set_pending"],
                {"account_id": account_id, "topup_id": topup_id, "attempts": attempt},
            )
    # 2. Send the pending top-up that has no intent yet: the one just claimed, or one a
    #    transient failure left (whatever the balance did since), always with the same key.
    with conn.transaction():
        unsent = conn.execute(q["auto_topup_unsent"], {"account_id": account_id}).fetchone()
        if unsent is None:
            return None  # nothing to send (or another checker claimed it)
        topup_id = str(unsent[0])
        topups_ = fetch_dicts(conn, q["topup_lock_skip_locked"], {"topup_id": topup_id})
        if not topups_:
            return None  # another checker is sending it, or a webhook is settling it
        sending = fetch_dicts(
            conn, q["auto_topup_lock_unsent"], {"account_id": account_id, "topup_id": topup_id}
        )
        if not sending or topups_[0]["status"] != TopupStatus.PENDING:
            return None  # sent or settled meanwhile
        topup = topups_[0]
        quote_ = Quote(_cents(topup["credit"]), _cents(topup["fee"]))
        try:
            intent = gateway.create_payment_intent(
                key=intent_key(topup_id),
                customer_id=customer_id,
                amount_cents=quote_.charged_cents,
                metadata=_metadata(topup_id, account_id, quote_, TopupKind.AUTO),
                # the first request's payment method: a resend under the same key repeats it
                payment_method=topup["payment_method"] or sending[0]["payment_method"],
                off_session=True,
            )
        except Transient as exc:
            # The top-up stays pending without an intent: the next run sends the same key.
            log.warning("auto top-up %s of %s not sent this run: %s", topup_id, account_id, exc)
            return AutoTopupResult(account_id, topup_id, f"retry: {exc}")
        except (PaymentError, IdempotencyConflict) as exc:
            # Permanent for this account (a decline, a payment method Stripe does not know).
            return _refused(conn, q, account_id, topup_id, _refusal_reason(exc))
        _set_ids(conn, q, topup_id, pi=intent["id"], charge=_id(intent.get("latest_charge")))
        conn.execute(
            q["auto_topup_set_intent"],
            {"account_id": account_id, "topup_id": topup_id, "intent_id": intent["id"]},
        )
    return AutoTopupResult(account_id, topup_id, "created")


# --- reconciliation -------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    what: str
    reference: str
    ours: str
    stripe: str


def reconcile(
    conn: psycopg.Connection[Any], q: Queries, gateway: Gateway, since: datetime
) -> list[Difference]:
    """Compare our top-ups, fees and refunds with Stripe's charges since ``since``.

    Only charges of customers this system created are considered. Every difference is listed:
    a charge we did not book, a top-up credited without a successful charge, a different
    amount, refunded total or dispute.
    """
    customers = {row[1]: row[0] for row in conn.execute(q["stripe_customer_ids"])}
    topups = fetch_dicts(conn, q["topups_since"], {"since": since})
    by_intent = {t["stripe_payment_intent_id"]: t for t in topups if t["stripe_payment_intent_id"]}
    disputed = {
        r[0]
        for r in conn.execute(
            q["disputes_for_topups"], {"topup_ids": [t["topup_id"] for t in topups]}
        )
    }
    diffs: list[Difference] = []
    seen: set[str] = set()
    for charge in gateway.charges_since(since):
        if _id(charge.get("customer")) not in customers or not _charge_succeeded(charge):
            continue
        intent = _id(charge.get("payment_intent")) or ""
        topup = by_intent.get(intent)
        ref = f"{charge.get('id')} ({intent})"
        if topup is None:
            diffs.append(
                Difference("charge not in our books", ref, "-", format_cents(int(charge["amount"])))
            )
            continue
        seen.add(topup["topup_id"])
        ref = f"{topup['topup_id']} {ref}"
        if topup["status"] != TopupStatus.SUCCEEDED:
            diffs.append(
                Difference(
                    "charge succeeded, top-up not credited", ref, topup["status"], "succeeded"
                )
            )
            continue
        if int(charge["amount"]) != _cents(topup["charged"]):
            diffs.append(
                Difference(
                    "amount charged",
                    ref,
                    format_usd(topup["charged"]),
                    format_cents(int(charge["amount"])),
                )
            )
        refunded = _cents(topup["refunded_credit"] + topup["refunded_fee"])
        if int(charge.get("amount_refunded") or 0) != refunded:
            diffs.append(
                Difference(
                    "amount refunded",
                    ref,
                    format_cents(refunded),
                    format_cents(int(charge.get("amount_refunded") or 0)),
                )
            )
        if charge.get("disputed") and topup["topup_id"] not in disputed:
            diffs.append(Difference("dispute not booked", ref, "no dispute", "disputed"))
    for topup in topups:
        if topup["status"] == TopupStatus.SUCCEEDED and topup["topup_id"] not in seen:
            diffs.append(
                Difference(
                    "top-up credited, no successful Stripe charge",
                    topup["topup_id"],
                    format_usd(topup["charged"]),
                    "-",
                )
            )
    return diffs


Dispatch = Callable[[str], None]
"""dispatch(event_id): hand a stored event to processing (the Celery task's ``.delay``)."""
