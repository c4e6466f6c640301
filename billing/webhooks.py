"""The Stripe webhook endpoint: verify, store, acknowledge, hand off.

``POST /stripe/webhook``:

1. refuse bodies over ``webhook_max_body_bytes`` (413, read no further);
2. verify ``Stripe-Signature`` with Stripe's library against every configured secret (so a
   secret can be rotated without downtime) and the timestamp tolerance (400 with the reason:
   bad signature, stale timestamp, malformed body); nothing unverified is stored;
3. store the raw bytes and the parsed event in the ``stripe_events`` inbox, keyed by Stripe's
   event id, in this request (a redelivery only counts a delivery);
4. answer 200 at once and hand the event id to ``dispatch`` (the Celery task's ``.delay``).
   If the hand-off fails the event is still stored; ``billing stripe process-pending`` (and
   the beat task) pick it up. Money moves only in the worker.

``GET /healthz`` answers 200 when the database answers. The same app serves the gateway's
``POST /v1/authorize`` (billing/authorize_http.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing import authorize_http, db
from billing.errors import WebhookRejected
from billing.http_body import read_capped
from billing.settings import Settings
from billing.stripe_client import verify_webhook
from billing.topups import store_event

log = logging.getLogger("billing.webhooks")

Dispatch = Callable[[str], None]


def create_app(settings: Settings, pool: ConnectionPool, dispatch: Dispatch) -> Starlette:
    """The ASGI app. ``pool`` gives database connections; ``dispatch`` hands events off."""
    q = db.queries(settings)

    def store(payload: bytes, event: dict[str, Any]) -> bool:
        with pool.connection() as conn:
            return store_event(conn, q, payload, event)

    def hand_off(event_id: str) -> None:
        try:
            dispatch(event_id)
        except Exception:  # stored already: process-pending will pick it up
            log.exception("could not hand off stripe event %s; it stays pending", event_id)

    async def webhook(request: Request) -> JSONResponse:
        try:
            payload = await read_capped(request, settings.webhook_max_body_bytes)
            event = verify_webhook(
                payload,
                request.headers.get("stripe-signature"),
                settings.stripe_webhook_secret,
                settings.webhook_tolerance_s,
            )
        except WebhookRejected as exc:
            log.warning("stripe webhook rejected: %s", exc.reason)
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        pending = await run_in_threadpool(store, payload, event)
        if pending:
            await run_in_threadpool(hand_off, event["id"])
        return JSONResponse({"received": event["id"]})

    def healthz(request: Request) -> JSONResponse:
        try:
            with pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            return JSONResponse({"ok": False, "error": type(exc).__name__}, status_code=503)
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/stripe/webhook", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *authorize_http.routes(settings, pool),  # the gateway's holds (issue 9)
        ]
    )


def serve(settings: Settings, dispatch: Dispatch, host: str, port: int) -> None:
    """Run the endpoint with uvicorn until interrupted."""
    import uvicorn

    pool = db.make_pool(settings, min_size=1, max_size=8)
    try:
        uvicorn.run(
            create_app(settings, pool, dispatch),
            host=host,
            port=port,
            log_level="info",
            # The client address decides whether a token-less authorization is allowed
            # (loopback only): never taken from X-Forwarded-For, whatever FORWARDED_ALLOW_IPS says.
            proxy_headers=False,
            server_header=False,
        )
    finally:
        pool.close()
