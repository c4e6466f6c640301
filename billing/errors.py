"""The small error hierarchy every edge maps into.

psycopg and (later) Stripe errors are translated here, so callers handle *billing* failures and
never driver classes. ``Transient`` errors are worth retrying as they are; the others are not.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BillingError):
    """A setting is missing or malformed."""


class InvalidEvent(BillingError):
    """A usage event failed validation. ``field`` names the offending field (JSON path)."""

    def __init__(self, reason: str, field: str = "$", code: str = "invalid") -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


class Unpriced(BillingError):
    """No price is in force for a (model, provider, class) at the event's time."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CatalogError(BillingError):
    """A price file is malformed or would rewrite history."""


class UnknownAccount(BillingError):
    """An operation named an account that does not exist."""


class AccountExists(BillingError):
    """An account with that id already exists."""


class Transient(BillingError):
    """The database or broker failed in a way that a retry may fix (connection, deadlock)."""


class AuditFailed(BillingError):
    """An invariant does not hold; the message lists the offending rows."""


class DatabaseRejected(BillingError):
    """The database refused the data itself (a constraint, a value out of range): not retryable."""


class PaymentError(BillingError):
    """Stripe refused a request (bad parameters, authentication): not retryable as is."""


class PaymentDeclined(PaymentError):
    """The card or bank declined the charge. ``code`` is Stripe's decline code, if any."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class StripeUnavailable(Transient):
    """Stripe could not be reached, rate-limited us or failed on its side: retry."""


class IdempotencyConflict(BillingError):
    """An idempotency key was reused for a different request."""


class WebhookRejected(BillingError):
    """A webhook request is not a trustworthy Stripe event; ``reason`` says why."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class QueueFull(BillingError):
    """The broker kept refusing a publish (the queue is at its length limit): back-pressure."""
