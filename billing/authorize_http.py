"""The gateway's authorization endpoint, served beside the Stripe webhook (same app).

``POST /v1/authorize`` with a JSON ``AuthorizationRequest`` (billing/holds.py) answers in one
database round trip:

* 200 ``{"allowed": true, "reason": "held" | "existing" | "byok", "hold_id": ..., "amount": ...,
  "available": ..., "key_remaining": ..., "expires_at": ...}``: dispatch the request and put
  ``hold_id`` in its usage event;
* 402 ``insufficient_credits``, ``key_limit_exceeded`` or ``member_limit_exceeded``, 403
  ``wallet_frozen``, 404 ``unknown_account``, 400 ``no_ceiling`` (no max_tokens and no ceiling
  for the model) or a bad request (``{"error": ..., "field": "$.max_tokens"}``).

``POST /v1/holds/{hold_id}/release`` releases a hold whose request was not dispatched.

Amounts are exact decimal strings. With ``BILLING_AUTHORIZE_TOKEN`` set, both require
``Authorization: Bearer <token>``; without it, they answer only callers on the loopback interface
(the embedded and development setups), so a deployed service without a token refuses everyone:
the endpoint reveals balances and can reserve a customer's credit.
"""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, datetime

from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing import db, holds
from billing.errors import BillingError, InvalidEvent, Transient, Unpriced, WebhookRejected
from billing.holds import Authorization, Authorizer, Decision
from billing.http_body import read_capped
from billing.money import format_usd
from billing.settings import Settings

log = logging.getLogger("billing.authorize")

_LOOPBACK = {"127.0.0.1", "::1"}

MAX_BODY = 16_384
STATUS = {
    Decision.HELD: 200,
    Decision.EXISTING: 200,
    Decision.BYOK: 200,
    Decision.INSUFFICIENT_CREDITS: 402,
    Decision.KEY_LIMIT_EXCEEDED: 402,
    Decision.MEMBER_LIMIT_EXCEEDED: 402,
    Decision.WALLET_FROZEN: 403,
    Decision.UNKNOWN_ACCOUNT: 404,
    Decision.NO_CEILING: 400,
    Decision.HOLD_CLOSED: 409,
}


def routes(settings: Settings, pool: ConnectionPool) -> list[Route]:
    q = db.queries(settings)
    authorizer = Authorizer(q, settings.hold_ttl)
    expected = f"Bearer {settings.authorize_token}".encode()

    def permitted(request: Request) -> bool:
        if not settings.authorize_token:
            return request.client is not None and request.client.host in _LOOPBACK
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    def run(body: bytes) -> Authorization:
        parsed = holds.decode_request(body)
        with pool.connection() as conn:
            return authorizer.authorize(conn, parsed, datetime.now(UTC))

    async def authorize(request: Request) -> JSONResponse:
        if not permitted(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        try:
            body = await read_capped(request, MAX_BODY)
        except WebhookRejected as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        try:
            result = await run_in_threadpool(run, body)
        except InvalidEvent as exc:
            return JSONResponse({"error": exc.reason, "field": exc.field}, status_code=400)
        except Unpriced as exc:
            return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
        except Transient as exc:
            log.warning("authorization failed: %s", exc)
            return JSONResponse({"error": "billing unavailable, retry"}, status_code=503)
        except BillingError as exc:  # refused for its data (never retried as if transient)
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(result.as_json(), status_code=STATUS[result.reason])

    def do_release(hold_id: str) -> str:
        with pool.connection() as conn:
            return format_usd(holds.release(conn, q, hold_id, datetime.now(UTC), "gateway"))

    async def release(request: Request) -> JSONResponse:
        if not permitted(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        hold_id = request.path_params["hold_id"]
        try:
            holds.check_hold_id(hold_id)
        except InvalidEvent as exc:
            return JSONResponse({"error": exc.reason, "field": exc.field}, status_code=400)
        try:
            amount = await run_in_threadpool(do_release, hold_id)
        except Transient:
            return JSONResponse({"error": "billing unavailable, retry"}, status_code=503)
        except BillingError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"released": hold_id, "amount": amount})

    return [
        Route("/v1/authorize", authorize, methods=["POST"]),
        Route("/v1/holds/{hold_id}/release", release, methods=["POST"]),
    ]
