"""How a request ended, and THE policy for billing requests that did not complete.

The gateway reports ``status`` on each usage event (default ``completed``):

* ``completed``: the response was delivered in full.
* ``cancelled``: the client disconnected or stopped a stream mid-way. The provider has already
  processed the prompt and generated the tokens up to the cancellation, and it bills us for them
  (OpenAI, Anthropic and Gemini all meter a cancelled stream by the tokens produced so far). So
  we bill **what the provider reports as consumed**, including any per-request fee and web
  searches that were actually executed: the request was served, partially.
* ``failed``: the provider (or the gateway) returned an error. We bill only what the provider
  reports as consumed (usually nothing; some providers do charge for the input of a request that
  failed after processing it, and then report it). The flat per-request fee is **not** charged:
  no service was delivered and providers do not charge request fees on errors.

Missing usage is never priced at zero silently: a ``completed`` event whose provider usage object
reports no token at all (typically a stream read without ``stream_options.include_usage``) is
parked by the adapters (``billing.provider_usage``), because a completed request always consumed
at least its prompt.

This module is the one place these rules live; ``billing.pricing.price`` asks
``request_fee_applies`` and ``billing.provider_usage`` asks ``must_report_tokens``.
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


def request_fee_applies(status: RequestStatus) -> bool:
    """The flat per-request fee is charged unless the request failed."""
    return status is not RequestStatus.FAILED


def must_report_tokens(status: RequestStatus) -> bool:
    """A completed request must come with a non-empty usage object (else it is parked)."""
    return status is RequestStatus.COMPLETED
