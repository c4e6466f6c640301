"""Fixtures for the Stripe tests: a real localstripe server and our webhook endpoint in-process.

* ``localstripe_url`` (session): ``localstripe --from-scratch`` on a free port, as a subprocess.
* ``stripe_settings``: the test's settings pointed at it (api_base), with two webhook secrets
  (the current one and a rotated-out one, both accepted).
* ``endpoint``: our Starlette app served by uvicorn in a thread on a free port, registered with
  localstripe (``POST /_config/webhooks/billing``) so its PaymentIntent events arrive signed.
  ``dispatch`` processes each stored event with the real domain function on a worker thread,
  or holds it when a test wants to choose the processing order.

Events localstripe cannot produce (refunds, disputes, checkout) are built from Stripe's published
objects (``tests/fixtures/stripe``) and signed exactly as Stripe signs them.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import stripe
import uvicorn

from billing import db
from billing.settings import Settings
from billing.stripe_client import StripeGateway
from billing.topups import process_stripe_event
from billing.webhooks import create_app

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "stripe"
SECRET = "whsec_test_current"
OLD_SECRET = "whsec_test_rotated_out"
# Only these, so a test's counts are not disturbed by customer.created and the like.
LOCALSTRIPE_EVENTS = ["payment_intent.succeeded", "payment_intent.payment_failed"]
LOCALSTRIPE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "localstripe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


@pytest.fixture(scope="session")
def localstripe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(LOCALSTRIPE), "--port", str(port), "--from-scratch"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/v1/customers", auth=("sk_test_billing", ""), timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"localstripe did not start: {log.read_text()}") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def stripe_settings(settings: Settings, localstripe_url: str) -> Settings:
    return replace(
        settings,
        stripe_api_key="sk_test_billing",
        stripe_api_base=localstripe_url,
        stripe_webhook_secret=(SECRET, OLD_SECRET),
    )


@pytest.fixture
def gateway(stripe_settings: Settings) -> StripeGateway:
    return StripeGateway(stripe_settings)


class Dispatcher:
    """The webhook app's hand-off: process on a thread now, or hold until ``release``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.q = db.queries(settings)
        self.hold = False
        self.fail = False  # simulate a broker outage: the hand-off raises
        self.held: list[str] = []
        self.futures: list[Future[Any]] = []
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.lock = threading.Lock()

    def __call__(self, event_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        with self.lock:
            if self.hold:
                self.held.append(event_id)
                return
            self.futures.append(self.pool.submit(self.process, event_id))

    def process(self, event_id: str) -> str:
        with db.connect(self.settings) as conn:
            return process_stripe_event(conn, self.q, self.settings, event_id).text

    def drain(self) -> None:
        for f in list(self.futures):
            f.result(timeout=30)


class Endpoint:
    def __init__(self, url: str, dispatcher: Dispatcher) -> None:
        self.url = url
        self.dispatch = dispatcher

    def post(
        self,
        event: dict[str, Any] | bytes,
        *,
        secret: str = SECRET,
        timestamp: int | None = None,
        body: bytes | None = None,
    ) -> httpx.Response:
        """Sign ``event`` as Stripe does (t=..., v1=HMAC-SHA256(secret, "t.payload")), POST it.

        ``body`` replaces the bytes sent after signing (to tamper with them).
        """
        payload = event if isinstance(event, bytes) else json.dumps(event, indent=2).encode()
        header = stripe.WebhookSignature.generate_signature_header(
            payload.decode(), secret, timestamp or int(time.time())
        )
        return httpx.post(
            f"{self.url}/stripe/webhook",
            content=payload if body is None else body,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
            timeout=10,
        )


@pytest.fixture
def endpoint(stripe_settings: Settings, localstripe_url: str) -> Iterator[Endpoint]:
    dispatcher = Dispatcher(stripe_settings)
    pool = db.make_pool(stripe_settings, min_size=1, max_size=4)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(stripe_settings, pool, dispatcher),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    httpx.post(
        f"{localstripe_url}/_config/webhooks/billing",
        json={"url": f"{url}/stripe/webhook", "secret": SECRET, "events": LOCALSTRIPE_EVENTS},
        timeout=5,
    ).raise_for_status()
    try:
        yield Endpoint(url, dispatcher)
    finally:
        dispatcher.drain()
        server.should_exit = True
        thread.join(timeout=10)
        dispatcher.pool.shutdown(wait=True)
        pool.close()


# --- building events from Stripe's published objects ----------------------------------------
def envelope(event_type: str, obj: dict[str, Any], **previous: Any) -> dict[str, Any]:
    """A complete event in the shape of a recorded Stripe delivery (zulip fixture)."""
    event = fixture("zulip_charge_dispute_created_with_pi.json")
    event.update(id=f"evt_{uuid.uuid4().hex[:24]}", type=event_type, created=int(time.time()))
    event["data"] = {"object": obj}
    if previous:
        event["data"]["previous_attributes"] = previous
    return event


def charge_object(charge: dict[str, Any]) -> dict[str, Any]:
    """Stripe's published charge object carrying a real charge's ids and amounts."""
    obj = fixture("charge.json")
    for key in ("id", "amount", "amount_refunded", "payment_intent", "customer", "currency"):
        obj[key] = charge[key]
    obj.update(
        amount_captured=charge["amount"],
        captured=True,
        paid=True,
        status="succeeded",
        refunded=charge["amount_refunded"] >= charge["amount"],
    )
    return obj


def dispute_object(
    charge_id: str, intent_id: str, amount: int, status: str, dispute_id: str
) -> dict[str, Any]:
    """A dispute in the shape of the recorded 2026 delivery, on our charge."""
    obj = copy.deepcopy(fixture("zulip_charge_dispute_created_with_pi.json")["data"]["object"])
    obj.update(id=dispute_id, charge=charge_id, payment_intent=intent_id, amount=amount)
    obj["status"] = status
    return obj


# --- assertions -----------------------------------------------------------------------------
def ledger_balance(conn: psycopg.Connection[Any], code: str) -> Decimal:
    row = conn.execute(
        "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
        "JOIN ledger_accounts a USING (ledger_account_id) WHERE a.code = %s",
        (code,),
    ).fetchone()
    assert row is not None
    return Decimal(row[0])


def wallet_balance(conn: psycopg.Connection[Any], account_id: str) -> Decimal:
    row = conn.execute(
        "SELECT balance FROM wallets WHERE account_id = %s", (account_id,)
    ).fetchone()
    assert row is not None
    return Decimal(row[0])


def topup_books(conn: psycopg.Connection[Any], account_id: str) -> tuple[Decimal, ...]:
    """(the wallet's balance, ``revenue:fees``, ``clearing:stripe``): what a top-up moves."""
    return (
        wallet_balance(conn, account_id),
        ledger_balance(conn, "revenue:fees"),
        ledger_balance(conn, "clearing:stripe"),
    )


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)


def event_rows(conn: psycopg.Connection[Any], event_type: str, intent_id: str) -> list[Any]:
    """Stored events of a type about a payment intent (localstripe's or ours)."""
    return conn.execute(
        "SELECT event_id, processed_at, outcome, deliveries FROM stripe_events "
        "WHERE type = %s AND event #>> '{data,object,id}' = %s ORDER BY received_at",
        (event_type, intent_id),
    ).fetchall()
