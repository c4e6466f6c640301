"""Reading a request body with a size cap, before it is all in memory (webhook, authorize)."""

from __future__ import annotations

from starlette.requests import Request

from billing.errors import WebhookRejected


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, or ``WebhookRejected`` (413) once it is longer than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise WebhookRejected(f"body larger than {limit} bytes", status=413)
        except ValueError:
            raise WebhookRejected("malformed Content-Length header") from None
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise WebhookRejected(f"body larger than {limit} bytes", status=413)
    return bytes(body)
