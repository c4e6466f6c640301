"""Operator commands for spend controls: ``billing holds|limits ...``.

Registered in ``billing.cli``. Amounts are exact decimal strings; errors of the billing
hierarchy print one line and exit 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from billing import db, holds, limits
from billing.cli_common import current_actor, handles_errors, parse_amount, settings_of
from billing.money import format_usd


def _now(at: str | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(at)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {at!r}", param_hint="--at") from None
    if value.utcoffset() is None:
        raise click.BadParameter(
            "needs a UTC offset (e.g. 2026-04-01T00:00:00Z)", param_hint="--at"
        )
    return value


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif hasattr(value, "as_tuple"):  # Decimal
            out[key] = format_usd(value)
        else:
            out[key] = value
    return out


# --- holds ----------------------------------------------------------------------------------
@click.group("holds")
def holds_group() -> None:
    """Reservations made by the gateway's authorizations."""


@holds_group.command("list")
@click.option("--account", default=None)
@click.option("--status", type=click.Choice([s.value for s in holds.HoldStatus]), default=None)
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def holds_list(
    ctx: click.Context, account: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """Most recent holds first."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = holds.list_holds(
            conn, db.queries(settings), account, holds.HoldStatus(status) if status else None, limit
        )
    data = [_jsonable(r) for r in rows]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for r in data:
        click.echo(
            f"{r['hold_id']}  {r['account_id']}  {r['api_key_id']}  {r['amount']:>14}  "
            f"{r['status']:<8}  expires {r['expires_at']}"
            + (
                f"  settled {r['settled_amount']} by {r['settled_event_id']}"
                if r["status"] == "settled"
                else ""
            )
        )


@holds_group.command("release")
@click.argument("hold_id")
@click.option("--reason", default="operator", show_default=True)
@click.pass_context
@handles_errors
def holds_release(ctx: click.Context, hold_id: str, reason: str) -> None:
    """Release an active hold (its request will never report usage)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        amount = holds.release(conn, db.queries(settings), hold_id, datetime.now(UTC), reason)
    click.echo(f"released {hold_id}: {format_usd(amount)} USD available again")


@holds_group.command("expire")
@click.pass_context
@handles_errors
def holds_expire(ctx: click.Context) -> None:
    """Close holds past their expiry now (the beat task does this every 30 s)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        n = holds.expire_holds(conn, db.queries(settings), datetime.now(UTC))
    click.echo(f"{n} holds expired")


@holds_group.command("available")
@click.argument("account_id")
@click.pass_context
@handles_errors
def holds_available(ctx: click.Context, account_id: str) -> None:
    """A wallet's balance, what its active holds reserve, and what is available."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        a = holds.availability(conn, db.queries(settings), account_id, datetime.now(UTC))
    click.echo(
        f"{account_id}: balance {format_usd(a.balance)}  held {format_usd(a.held)}  "
        f"available {format_usd(a.available)} USD"
    )


@holds_group.command("ceiling")
@click.argument("model")
@click.argument("amount")
@click.pass_context
@handles_errors
def holds_ceiling(ctx: click.Context, model: str, amount: str) -> None:
    """Hold AMOUNT USD (beyond the input) for a request to MODEL that has no max_tokens."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        holds.set_ceiling(conn, db.queries(settings), model, parse_amount(amount), current_actor())
    click.echo(f"{model}: requests without max_tokens hold input + {amount} USD")


# --- limits ---------------------------------------------------------------------------------
@click.group("limits")
def limits_group() -> None:
    """Spending limits per API key (enforced by the authorization)."""


@limits_group.command("set")
@click.argument("account_id")
@click.argument("api_key_id")
@click.argument("amount")
@click.option(
    "--period",
    type=click.Choice([p.value for p in limits.Period]),
    default="month",
    show_default=True,
)
@click.option("--time-zone", default="UTC", show_default=True, help="Where the period resets.")
@click.option("--count-byok/--no-count-byok", default=False, show_default=True)
@click.pass_context
@handles_errors
def limits_set(
    ctx: click.Context,
    account_id: str,
    api_key_id: str,
    amount: str,
    period: str,
    time_zone: str,
    count_byok: bool,
) -> None:
    """Limit API_KEY_ID of ACCOUNT_ID to AMOUNT USD per period."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        limits.set_limit(
            conn,
            db.queries(settings),
            account_id=account_id,
            api_key_id=api_key_id,
            amount=parse_amount(amount),
            period=limits.Period(period),
            time_zone=time_zone,
            count_byok=count_byok,
            actor=current_actor(),
        )
    click.echo(f"{api_key_id}: {amount} USD per {period} ({time_zone})")


@limits_group.command("remove")
@click.argument("api_key_id")
@click.pass_context
@handles_errors
def limits_remove(ctx: click.Context, api_key_id: str) -> None:
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        limits.remove_limit(conn, db.queries(settings), api_key_id)
    click.echo(f"{api_key_id}: no limit")


@limits_group.command("show")
@click.option("--account", default=None)
@click.option("--key", "api_key_id", default=None)
@click.option("--at", default=None, help="Show the period containing this time (ISO 8601).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def limits_show(
    ctx: click.Context, account: str | None, api_key_id: str | None, at: str | None, as_json: bool
) -> None:
    """Limits with the current period, what was used and what remains."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        found = limits.show_limits(
            conn, db.queries(settings), _now(at), api_key_id=api_key_id, account_id=account
        )
    data = [k.as_json() for k in found]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for k in data:
        click.echo(
            f"{k['account_id']}/{k['api_key_id']}: {k['used']} of {k['limit']} USD used "
            f"({k['remaining']} left) this {k['period']} from {k['period_start']}"
            f" ({k['time_zone']}{', BYOK counts' if k['count_byok'] else ''})"
        )


COMMANDS = (holds_group, limits_group)
