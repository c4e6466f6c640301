"""Operator commands for spend controls: ``billing holds|limits ...``.

Registered in ``billing.cli``. Amounts are exact decimal strings; errors of the billing
hierarchy print one line and exit 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from billing import alerts, db, grants, holds, limits, members
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
    default=None,
    help="Default: the limit's current period; month for a new limit.",
)
@click.option(
    "--time-zone", default=None, help="Where the period resets. Default: current; UTC for new."
)
@click.option(
    "--count-byok/--no-count-byok",
    default=None,
    help="Count BYOK requests' notional cost. Default: current; not for a new limit.",
)
@click.pass_context
@handles_errors
def limits_set(
    ctx: click.Context,
    account_id: str,
    api_key_id: str,
    amount: str,
    period: str | None,
    time_zone: str | None,
    count_byok: bool | None,
) -> None:
    """Limit API_KEY_ID of ACCOUNT_ID to AMOUNT USD per period (options not given are kept)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rule = limits.set_limit(
            conn,
            db.queries(settings),
            account_id=account_id,
            api_key_id=api_key_id,
            amount=parse_amount(amount),
            period=None if period is None else limits.Period(period),
            time_zone=time_zone,
            count_byok=count_byok,
            actor=current_actor(),
        )
    byok = ", BYOK counted" if rule.count_byok else ""
    click.echo(f"{api_key_id}: {amount} USD per {rule.period} ({rule.time_zone}{byok})")


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


# --- grants ---------------------------------------------------------------------------------
def _days(value: str, name: str) -> timedelta:
    try:
        days = float(value)
    except ValueError:
        raise click.BadParameter(f"not a number of days: {value!r}", param_hint=name) from None
    if days <= 0:
        raise click.BadParameter("must be positive", param_hint=name)
    return timedelta(days=days)


@click.group("grants")
def grants_group() -> None:
    """Promotional credit with an expiry, kept apart from paid credit."""


@grants_group.command("add")
@click.argument("account_id")
@click.argument("amount")
@click.option("--expires", "expires", default=None, help="Expiry time (ISO 8601 with offset).")
@click.option("--days", default=None, help="Or: valid this many days from now.")
@click.option("--reason", required=True)
@click.option("--id", "grant_id", default=None, help="Idempotency key: a repeat does nothing.")
@click.pass_context
@handles_errors
def grants_add(
    ctx: click.Context,
    account_id: str,
    amount: str,
    expires: str | None,
    days: str | None,
    reason: str,
    grant_id: str | None,
) -> None:
    """Grant AMOUNT USD of credit to ACCOUNT_ID until --expires (or for --days)."""
    now = datetime.now(UTC)
    if (expires is None) == (days is None):
        raise click.UsageError("give exactly one of --expires and --days")
    until = _now(expires) if expires else now + _days(str(days), "--days")
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        gid = grants.grant_credit(
            conn,
            db.queries(settings),
            account_id=account_id,
            amount=parse_amount(amount),
            expires_at=until,
            reason=reason,
            actor=current_actor(),
            now=now,
            grant_id=grant_id,
        )
    click.echo(f"grant {gid}: {amount} USD to {account_id} until {until.isoformat()}")


@grants_group.command("list")
@click.option("--account", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def grants_list(ctx: click.Context, account: str | None, as_json: bool) -> None:
    """Grants with what was consumed, what expired and what is left."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        data = [_jsonable(r) for r in grants.list_grants(conn, db.queries(settings), account)]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for r in data:
        click.echo(
            f"{r['grant_id']}  {r['account_id']}  {r['amount']:>10}  used {r['consumed']:>10}  "
            f"expired {r['expired']:>10}  left {r['remaining']:>10}  until {r['expires_at']}"
        )


@grants_group.command("credit")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def grants_credit(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """A wallet's balance split into paid and granted credit."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        credit = grants.credit_of(conn, db.queries(settings), account_id)
    data = credit.as_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(
        f"{account_id}: balance {data['balance']} = paid {data['paid']} + granted "
        f"{data['granted']} USD"
    )


@grants_group.command("expire")
@click.pass_context
@handles_errors
def grants_expire(ctx: click.Context) -> None:
    """Issue due scheduled grants and expire lapsed ones now (a beat task does it every 60 s)."""
    settings = settings_of(ctx)
    q = db.queries(settings)
    now = datetime.now(UTC)
    with db.connect(settings) as conn:
        issued = grants.issue_due_grants(conn, q, now)
        expired = grants.expire_grants(conn, q, now)
    click.echo(f"{issued} scheduled grants issued; {format_usd(expired)} USD of grants expired")


@grants_group.command("schedule")
@click.argument("schedule_id")
@click.argument("account_id")
@click.argument("amount")
@click.option("--every-days", default="30", show_default=True)
@click.option("--valid-days", default="30", show_default=True)
@click.option("--reason", required=True)
@click.option("--first", default=None, help="First issue time (ISO 8601; default now).")
@click.pass_context
@handles_errors
def grants_schedule(
    ctx: click.Context,
    schedule_id: str,
    account_id: str,
    amount: str,
    every_days: str,
    valid_days: str,
    reason: str,
    first: str | None,
) -> None:
    """A recurring grant: AMOUNT USD every N days, each valid M days."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        grants.set_schedule(
            conn,
            db.queries(settings),
            schedule_id=schedule_id,
            account_id=account_id,
            amount=parse_amount(amount),
            every=_days(every_days, "--every-days"),
            valid_for=_days(valid_days, "--valid-days"),
            reason=reason,
            first_at=_now(first),
            actor=current_actor(),
        )
    click.echo(f"{schedule_id}: {amount} USD to {account_id} every {every_days} days")


# --- alerts ---------------------------------------------------------------------------------
@click.group("alerts")
def alerts_group() -> None:
    """Low-balance alerts (wallet.low_balance, once per crossing)."""


@alerts_group.command("set")
@click.argument("account_id")
@click.argument("threshold")
@click.pass_context
@handles_errors
def alerts_set(ctx: click.Context, account_id: str, threshold: str) -> None:
    """Publish wallet.low_balance when ACCOUNT_ID's balance falls below THRESHOLD USD."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        alerts.set_alert(
            conn, db.queries(settings), account_id, parse_amount(threshold), current_actor()
        )
    click.echo(f"{account_id}: alert below {threshold} USD")


@alerts_group.command("remove")
@click.argument("account_id")
@click.argument("threshold")
@click.pass_context
@handles_errors
def alerts_remove(ctx: click.Context, account_id: str, threshold: str) -> None:
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        alerts.remove_alert(conn, db.queries(settings), account_id, parse_amount(threshold))
    click.echo(f"{account_id}: no alert at {threshold} USD")


@alerts_group.command("list")
@click.option("--account", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def alerts_list(ctx: click.Context, account: str | None, as_json: bool) -> None:
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        data = [_jsonable(r) for r in alerts.list_alerts(conn, db.queries(settings), account)]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for r in data:
        state = "below" if r["below"] else "above"
        click.echo(f"{r['account_id']}: {r['threshold']} USD ({state}; balance {r['balance']})")


# --- sub-accounts ---------------------------------------------------------------------------
@click.group("members")
def members_group() -> None:
    """Sub-accounts: member accounts whose usage an organisation's wallet pays."""


@members_group.command("add")
@click.argument("org")
@click.argument("member")
@click.option("--limit", "limit_amount", default=None, help="The member's spending limit (USD).")
@click.option("--period", type=click.Choice([p.value for p in limits.Period]), default=None)
@click.option("--time-zone", default="UTC", show_default=True)
@click.pass_context
@handles_errors
def members_add(
    ctx: click.Context,
    org: str,
    member: str,
    limit_amount: str | None,
    period: str | None,
    time_zone: str,
) -> None:
    """Make MEMBER a sub-account of ORG (or change its limit)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        members.add_member(
            conn,
            db.queries(settings),
            org=org,
            member=member,
            actor=current_actor(),
            limit=None if limit_amount is None else parse_amount(limit_amount, "--limit"),
            period=None if period is None else limits.Period(period),
            time_zone=time_zone,
        )
    extra = f", limit {limit_amount} USD per {period} ({time_zone})" if limit_amount else ""
    click.echo(f"{member}: usage paid by {org}{extra}")


@members_group.command("remove")
@click.argument("org")
@click.argument("member")
@click.pass_context
@handles_errors
def members_remove(ctx: click.Context, org: str, member: str) -> None:
    """MEMBER pays for itself again."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        members.remove_member(conn, db.queries(settings), org=org, member=member)
    click.echo(f"{member}: no longer a member of {org}")


@members_group.command("list")
@click.option("--org", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def members_list(ctx: click.Context, org: str | None, as_json: bool) -> None:
    """Members with their limit and what they used in the current period."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = members.list_members(conn, db.queries(settings), datetime.now(UTC), org)
    data = [_jsonable(r) for r in rows]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for r in data:
        limit = (
            f"{r['used']} of {r['limit_amount']} USD this {r['limit_period']}"
            if r["limit_period"]
            else "no limit"
        )
        click.echo(f"{r['org_account_id']} <- {r['member_account_id']}: {limit}")


COMMANDS = (holds_group, limits_group, grants_group, alerts_group, members_group)
