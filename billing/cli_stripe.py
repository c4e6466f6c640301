"""Operator commands for Stripe top-ups: ``billing topup|webhooks|stripe|autotopup ...``.

Registered in ``billing.cli``. Errors of the billing hierarchy print one line and exit 2;
``billing stripe reconcile`` exits 1 when it finds a difference.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime

import click

from billing import db, topups
from billing.cli_common import handles_errors, parse_amount, settings_of
from billing.errors import BillingError
from billing.money import format_usd
from billing.stripe_client import StripeGateway


# --- topup ----------------------------------------------------------------------------------
@click.group()
def topup() -> None:
    """Buy wallet credit through Stripe (credit + the platform fee)."""


@topup.command("create")
@click.argument("account_id")
@click.argument("amount")
@click.option("--checkout", is_flag=True, help="A hosted Checkout Session instead of an intent.")
@click.option("--payment-method", default=None, help="Confirm now with this saved method.")
@click.option(
    "--key",
    "request_key",
    default=None,
    help="Idempotency key: repeating the command with it never charges twice (default: new).",
)
@click.option("--success-url", default=None, help="Checkout: where Stripe sends the payer.")
@click.option("--cancel-url", default=None, help="Checkout: where a cancel goes.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def topup_create(
    ctx: click.Context,
    account_id: str,
    amount: str,
    checkout: bool,
    payment_method: str | None,
    request_key: str | None,
    success_url: str | None,
    cancel_url: str | None,
    as_json: bool,
) -> None:
    """Create a top-up of AMOUNT USD of credit; the card pays AMOUNT plus the fee."""
    settings = settings_of(ctx)
    key = request_key or str(uuid.uuid4())
    with db.connect(settings) as conn:
        created = topups.create_topup(
            conn,
            db.queries(settings),
            settings,
            StripeGateway(settings),
            account_id,
            parse_amount(amount, "AMOUNT"),
            request_key=key,
            payment_method=payment_method,
            checkout=checkout,
            success_url=success_url,
            cancel_url=cancel_url,
        )
    data = {
        **created.topup.as_json(),
        "key": key,
        "client_secret": created.client_secret,
        "checkout_url": created.checkout_url,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    t = created.topup
    click.echo(
        f"top-up {t.topup_id} ({t.status.value}): credit {format_usd(t.credit)} + fee "
        f"{format_usd(t.fee)} = {format_usd(t.charged)} USD charged"
    )
    if created.checkout_url:
        click.echo(f"checkout: {created.checkout_url}")
    if t.payment_intent_id:
        click.echo(f"payment intent: {t.payment_intent_id}")
    click.echo(f"retry safely with: --key {key}")


@topup.command("show")
@click.argument("topup_id")
@click.pass_context
@handles_errors
def topup_show(ctx: click.Context, topup_id: str) -> None:
    """A top-up with its credit, fee, amount charged and refunds (exact strings)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        view = topups.get_topup(conn, db.queries(settings), topup_id)
    click.echo(json.dumps(view.as_json(), indent=2))


@topup.command("list")
@click.option("--account", "account_id", default=None)
@click.option("--limit", default=50, show_default=True)
@click.pass_context
@handles_errors
def topup_list(ctx: click.Context, account_id: str | None, limit: int) -> None:
    """Recent top-ups, newest first (JSON lines)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        for view in topups.list_topups(conn, db.queries(settings), account_id, limit):
            click.echo(json.dumps(view.as_json()))


# --- webhooks -------------------------------------------------------------------------------
@click.group()
def webhooks() -> None:
    """The Stripe webhook endpoint."""


@webhooks.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True)
@click.pass_context
@handles_errors
def webhooks_serve(ctx: click.Context, host: str, port: int) -> None:
    """Serve POST /stripe/webhook and GET /healthz; events go to the Celery task."""
    settings = settings_of(ctx)
    if not settings.stripe_webhook_secret:
        raise BillingError("BILLING_STRIPE_WEBHOOK_SECRET is not set")
    from billing.webhooks import serve
    from workers.tasks import process_stripe_event_task

    def dispatch(event_id: str) -> None:
        process_stripe_event_task.delay(event_id)

    serve(settings, dispatch, host, port)


# --- stripe ---------------------------------------------------------------------------------
@click.group("stripe")
def stripe_group() -> None:
    """Stripe events and reconciliation."""


@stripe_group.command("process-pending")
@click.option("--limit", default=1000, show_default=True)
@click.pass_context
@handles_errors
def stripe_process_pending(ctx: click.Context, limit: int) -> None:
    """Re-run stored webhook events that are not processed yet."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        result = topups.process_pending(conn, db.queries(settings), settings, limit)
    click.echo(
        f"processed {result.processed}, still waiting {result.waiting}, "
        f"gave up {result.abandoned} (billing stripe events --state abandoned), "
        f"failed {result.failed}"
    )
    if result.failed:
        sys.exit(1)


@stripe_group.command("events")
@click.option(
    "--state",
    type=click.Choice(topups.EVENT_STATES),
    default=None,
    help="pending, abandoned (gave up waiting), ignored (not ours), processed; default all.",
)
@click.option("--type", "event_type", default=None, help="Only this Stripe event type.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def stripe_events(
    ctx: click.Context, state: str | None, event_type: str | None, limit: int, as_json: bool
) -> None:
    """Stored webhook events, newest first, with their outcome."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = topups.list_stripe_events(
            conn, db.queries(settings), state=state, event_type=event_type, limit=limit
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        click.echo(
            f"{r['event_id']} {r['type']} received {r['received_at'].isoformat()} "
            f"attempts {r['attempts']}: {r['outcome'] or r['last_error'] or '-'}"
        )
    click.echo(f"{len(rows)} event(s)")


@stripe_group.command("replay")
@click.argument("event_ids", nargs=-1, required=True)
@click.pass_context
@handles_errors
def stripe_replay(ctx: click.Context, event_ids: tuple[str, ...]) -> None:
    """Process abandoned or ignored events again now (after a fix); they wait afresh if needed."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        results = topups.replay_stripe_events(conn, db.queries(settings), settings, event_ids)
    for event_id, outcome in results:
        click.echo(f"{event_id}: {outcome.text}")


@stripe_group.command("reconcile")
@click.option("--since", required=True, help="A date (YYYY-MM-DD, UTC) or an RFC 3339 time.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def stripe_reconcile(ctx: click.Context, since: str, as_json: bool) -> None:
    """Compare our top-ups, fees and refunds with Stripe's charges; exit 1 on any difference."""
    settings = settings_of(ctx)
    try:
        when = datetime.fromisoformat(since)
    except ValueError:
        raise click.BadParameter(f"not a date: {since!r}", param_hint="--since") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    with db.connect(settings) as conn:
        diffs = topups.reconcile(conn, db.queries(settings), StripeGateway(settings), when)
    if as_json:
        click.echo(json.dumps([d.__dict__ for d in diffs], indent=2))
    else:
        for d in diffs:
            click.echo(f"{d.what}: {d.reference}: ours {d.ours}, stripe {d.stripe}")
        click.echo(f"{len(diffs)} difference(s) since {when.isoformat()}")
    if diffs:
        sys.exit(1)


# --- autotopup ------------------------------------------------------------------------------
@click.group()
def autotopup() -> None:
    """Automatic top-ups on a saved payment method when the balance runs low."""


@autotopup.command("set")
@click.argument("account_id")
@click.option("--threshold", required=True, help="Top up when the balance is below this (USD).")
@click.option("--amount", required=True, help="Credit to buy (USD); the fee is added.")
@click.option("--payment-method", required=True, help="The saved Stripe payment method.")
@click.pass_context
@handles_errors
def autotopup_set(
    ctx: click.Context, account_id: str, threshold: str, amount: str, payment_method: str
) -> None:
    """Enable (or change) auto top-up for an account."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        topups.set_auto_topup(
            conn,
            db.queries(settings),
            settings,
            account_id,
            threshold=parse_amount(threshold, "--threshold"),
            amount=parse_amount(amount, "--amount"),
            payment_method=payment_method,
        )
    click.echo(f"auto top-up of {account_id}: {amount} USD when below {threshold} USD")


@autotopup.command("disable")
@click.argument("account_id")
@click.pass_context
@handles_errors
def autotopup_disable(ctx: click.Context, account_id: str) -> None:
    """Disable auto top-up for an account."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        topups.disable_auto_topup(conn, db.queries(settings), account_id, "disabled by operator")
    click.echo(f"auto top-up of {account_id} disabled")


@autotopup.command("run")
@click.pass_context
@handles_errors
def autotopup_run(ctx: click.Context) -> None:
    """Create the intents of accounts below their threshold now (beat does it every 15 s)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        results = topups.check_auto_topups(
            conn, db.queries(settings), settings, StripeGateway(settings)
        )
    for r in results:
        click.echo(f"{r.account_id}: {r.topup_id or '-'} {r.outcome}")
    click.echo(f"{len(results)} auto top-up(s)")


COMMANDS = (topup, webhooks, stripe_group, autotopup)
