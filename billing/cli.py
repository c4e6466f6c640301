"""``billing``: the operator CLI. Every routine action is a command here.

Amounts are printed as exact decimal strings. Errors of the billing hierarchy print one line and
exit 2; ``billing audit`` exits 1 when an invariant fails.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from billing import __version__, broker, catalog, db, deadletters, wallets
from billing.audit import AuditReport, run_audit
from billing.cli_common import (
    console,
    current_actor,
    handles_errors,
    parse_amount,
    settings_of,
)
from billing.cli_exports import COMMANDS as EXPORT_COMMANDS
from billing.cli_ops import COMMANDS as OPS_COMMANDS
from billing.cli_spend import COMMANDS as SPEND_COMMANDS
from billing.cli_stripe import COMMANDS as STRIPE_COMMANDS
from billing.errors import BillingError
from billing.events import SCHEMA_V1, Usage, UsageEvent, decode_event
from billing.money import format_usd
from billing.provider_usage import ProviderFormat
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier
from billing.settings import Settings


@click.group()
@click.version_option(__version__)
@click.pass_context
def main(ctx: click.Context) -> None:
    """gateway-billing: usage metering and prepaid wallets for an LLM gateway."""
    ctx.ensure_object(dict)


# --- schema ---------------------------------------------------------------------------------
@main.command()
@click.pass_context
@handles_errors
def migrate(ctx: click.Context) -> None:
    """Apply pending SQL migrations (safe to run from many processes at once)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        applied = db.migrate(conn, settings.sql_dir)
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


# --- prices ---------------------------------------------------------------------------------
@main.group()
def prices() -> None:
    """The price catalog (versions are appended, never rewritten)."""


@prices.command("load")
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--allow-backdate",
    is_flag=True,
    help="Allow a new version to take effect in the past (only if no events exist then).",
)
@click.pass_context
@handles_errors
def prices_load(ctx: click.Context, file: Path | None, allow_backdate: bool) -> None:
    """Load a catalog TOML file (default: the catalog shipped with the package)."""
    settings = settings_of(ctx)
    path = file or catalog.DEFAULT_CATALOG
    versions = catalog.read_catalog_file(path)
    with db.connect(settings) as conn:
        result = catalog.load_versions(
            conn,
            db.queries(settings),
            versions,
            now=datetime.now(UTC),
            loaded_by=current_actor(),
            allow_backdate=allow_backdate,
            max_clock_skew=settings.max_clock_skew,
        )
    for version in result.added:
        click.echo(f"added {version.label()}")
    click.echo(
        f"{len(result.added)} versions added, {len(result.unchanged)} already loaded ({path})"
    )


@prices.command("list")
@click.option("--model", help="Only this model.")
@click.option("--at", "at", help="Only the versions in force at this RFC 3339 time.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def prices_list(ctx: click.Context, model: str | None, at: str | None, as_json: bool) -> None:
    """List price versions."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        snap = catalog.snapshot(conn, db.queries(settings))
    versions = snap.all_versions()
    if at is not None:
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise click.BadParameter("needs a UTC offset", param_hint="--at")
        in_force = {v.key for v in versions if snap.in_force(v.model, v.provider, when) == v}
        versions = [v for v in versions if v.key in in_force]
    if model:
        versions = [v for v in versions if v.model == model]
    rows: list[dict[str, str]] = [
        {
            "model": v.model,
            "provider": v.provider,
            "effective_from": v.effective_from.isoformat(),
            "tier": tier.value,
            "class": c.value,
            "usd": format_usd(p.unit_price),
            "per": f"{p.per:,}",
        }
        for v in versions
        for tier, sheet in v.sheets().items()
        for c, p in sorted(sheet.items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "provider", "effective from", "tier", "class", "USD", "per")
    for r in rows:
        table.add_row(
            r["model"],
            r["provider"],
            r["effective_from"],
            r["tier"],
            r["class"],
            r["usd"],
            r["per"],
        )
    console.print(table)


# --- accounts and wallets -------------------------------------------------------------------
@main.group()
def accounts() -> None:
    """Customer accounts."""


@accounts.command("create")
@click.argument("account_id")
@click.option("--name", help="Display name.")
@click.pass_context
@handles_errors
def accounts_create(ctx: click.Context, account_id: str, name: str | None) -> None:
    """Create an account with an empty USD wallet."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        wallets.create_account(conn, db.queries(settings), account_id, name)
    click.echo(f"created account {account_id}")


@main.group()
def wallet() -> None:
    """Prepaid wallets."""


@wallet.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Amounts as exact decimal strings.")
@click.pass_context
@handles_errors
def wallet_show(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """Show a wallet's balance (exact), state and usage totals."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        view = wallets.show(conn, db.queries(settings), account_id)
    data = view.as_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:>20}: {value}")


@wallet.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("account_id")
@click.argument("amount")
@click.option("--reason", required=True, help="Why (kept in the ledger).")
@click.option("--actor", default=None, help="Who (default: the OS user).")
@click.option("--reference", default=None, help="Idempotency key: a repeat does nothing.")
@click.pass_context
@handles_errors
def wallet_adjust(
    ctx: click.Context,
    account_id: str,
    amount: str,
    reason: str,
    actor: str | None,
    reference: str | None,
) -> None:
    """Credit (positive AMOUNT) or debit (negative) a wallet, with a reason."""
    settings = settings_of(ctx)
    q = db.queries(settings)
    with db.connect(settings) as conn:
        posting = wallets.adjust(
            conn,
            q,
            account_id,
            parse_amount(amount),
            reason=reason,
            actor=actor or current_actor(),
            reference=reference,
        )
        view = wallets.show(conn, q, account_id)
    click.echo(f"posting {posting}: balance of {account_id} is {format_usd(view.balance)} USD")


# --- usage ----------------------------------------------------------------------------------
@main.group()
def usage() -> None:
    """Usage events (the gateway's side, for testing and operations)."""


@usage.command("emit")
@click.option("--account", "account_id", help="account_id of the event.")
@click.option("--model", help="e.g. openai/o4-mini")
@click.option("--provider", help="e.g. openai, azure")
@click.option("--api-key", "api_key_id", default="key-cli", show_default=True)
@click.option("--event-id", default=None, help="Default: a new UUID.")
@click.option("--occurred-at", default=None, help="RFC 3339 (default: now).")
@click.option("--input", "input_tokens", type=int, default=0)
@click.option("--cached", "cached_input_tokens", type=int, default=0)
@click.option("--cache-write", "cache_write_tokens", type=int, default=0)
@click.option("--output", "output_tokens", type=int, default=0)
@click.option("--reasoning", "reasoning_tokens", type=int, default=0)
@click.option("--images", "image_count", type=int, default=0)
@click.option("--searches", "web_search_count", type=int, default=0)
@click.option("--cache-write-1h", "cache_write_1h_tokens", type=int, default=0)
@click.option("--audio-in", "audio_input_tokens", type=int, default=0)
@click.option("--audio-out", "audio_output_tokens", type=int, default=0)
@click.option(
    "--tier",
    "service_tier",
    type=click.Choice([t.value for t in ServiceTier]),
    default=None,
    help="Service tier (default: standard).",
)
@click.option(
    "--status",
    type=click.Choice([s.value for s in RequestStatus]),
    default=None,
    help="How the request ended (default: completed).",
)
@click.option(
    "--provider-usage",
    "provider_usage",
    default=None,
    help="The provider's usage object as JSON (instead of the token options).",
)
@click.option(
    "--format",
    "provider_usage_format",
    type=click.Choice([f.value for f in ProviderFormat]),
    default=None,
    help="Format of --provider-usage.",
)
@click.option("--byok", is_flag=True)
@click.option("--repeat", type=int, default=1, help="Publish the same message N times.")
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    help="Publish each line of a JSON-lines file as-is (use - for stdin).",
)
@click.pass_context
@handles_errors
def usage_emit(ctx: click.Context, /, file: Any, repeat: int, **fields: Any) -> None:
    """Publish a usage.v1 event (validated first) or raw JSON lines to the usage queue."""
    settings = settings_of(ctx)
    with broker.UsagePublisher(settings) as publisher:
        if file is not None:
            sent = 0
            for line in file:
                if line.strip():
                    publisher.publish_raw(line.strip())
                    sent += 1
            click.echo(f"published {sent} messages")
            return
        missing = [n for n in ("account_id", "model", "provider") if not fields.get(n)]
        if missing:
            raise click.UsageError("missing " + ", ".join(f"--{m.split('_')[0]}" for m in missing))
        occurred = fields.pop("occurred_at") or datetime.now(UTC).isoformat()
        event_id = fields.pop("event_id") or str(uuid.uuid4())
        usage_fields = {k: fields.pop(k) for k in Usage.__struct_fields__}
        extra = {k: v for k, v in fields.items() if v is not None}
        if extra.get("provider_usage") is not None:
            try:
                extra["provider_usage"] = json.loads(extra["provider_usage"])
            except json.JSONDecodeError as exc:
                raise click.BadParameter(str(exc), param_hint="--provider-usage") from None
            if any(usage_fields.values()):
                extra["usage"] = usage_fields  # beside it: must agree (checked on decode)
        else:
            extra["usage"] = usage_fields
        body = json.dumps(
            {"schema": SCHEMA_V1, "event_id": event_id, "occurred_at": occurred, **extra}
        ).encode()
        checked = decode_event(body, datetime.now(UTC), settings.max_clock_skew)
        if not isinstance(checked, UsageEvent):
            raise BillingError(f"{checked.field}: {checked.reason}")
        for _ in range(repeat):
            publisher.publish_raw(body)
    click.echo(f"published {event_id} x{repeat}")


@usage.command("provider-costs")
@click.option("--since", default=None, help="RFC 3339 (default: 30 days ago).")
@click.option("--until", default=None, help="RFC 3339 (default: now).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def usage_provider_costs(
    ctx: click.Context, since: str | None, until: str | None, as_json: bool
) -> None:
    """Our price vs. the cost the provider reported (OpenRouter), per model: never billed."""
    settings = settings_of(ctx)
    end = datetime.fromisoformat(until) if until else datetime.now(UTC)
    start = datetime.fromisoformat(since) if since else end - timedelta(days=30)
    with db.connect(settings) as conn:
        rows = db.fetch_dicts(
            conn, db.queries(settings)["provider_cost_comparison"], {"since": start, "until": end}
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("model", "provider", "format", "events", "our amount", "reported", "difference")
    for r in rows:
        table.add_row(
            r["model"],
            r["provider"],
            r["provider_usage_format"],
            str(r["events"]),
            str(r["our_amount"]),
            str(r["reported_cost"]),
            str(r["difference"]),
        )
    console.print(table)


# --- worker ---------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--no-usage", is_flag=True, help="General tasks only (no usage consumer).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--migrate/--no-migrate",
    "run_migrations",
    default=True,
    show_default=True,
    help="Apply pending migrations before starting.",
)
@click.pass_context
@handles_errors
def worker(ctx: click.Context, no_usage: bool, loglevel: str, run_migrations: bool) -> None:
    """Run a Celery worker: the batched usage consumer plus general tasks (solo pool).

    Extra arguments are passed to `celery worker`.
    """
    import os
    import socket

    if no_usage:
        os.environ["BILLING_USAGE_CONSUMER"] = "0"
    settings = Settings.from_env()
    if settings.embedded_database:
        # Resolve the embedded server once and hand its URL to the worker's code.
        os.environ["BILLING_DATABASE_URL"] = db.database_url(settings)
    if run_migrations:
        with db.connect(settings) as conn:
            db.migrate(conn, settings.sql_dir)
    from workers.app import app

    name = f"billing-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--loglevel={loglevel}",
            "-n",
            name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *ctx.args,
        ]
    )


# --- dead letters ---------------------------------------------------------------------------
@main.group("dead-letters")
def dead_letters() -> None:
    """Items parked instead of debited: list, replay after a fix, discard."""


@dead_letters.command("list")
@click.option(
    "--status",
    default="parked",
    show_default=True,
    type=click.Choice(["parked", "resolved", "discarded", "all"]),
)
@click.option("--reason", "reason_code", default=None, help="Only this reason code.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def dead_letters_list(
    ctx: click.Context, status: str, reason_code: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters with their reason and the offending field."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = deadletters.list_dead_letters(
            conn,
            db.queries(settings),
            status=None if status == "all" else status,
            reason_code=reason_code,
            limit=limit,
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("id", "status", "reason", "field", "detail", "event_id", "account", "tries")
    for r in rows:
        table.add_row(
            str(r["dead_letter_id"]),
            r["status"],
            r["reason_code"],
            r["field"],
            r["reason"],
            r["event_id"] or "-",
            r["account_id"] or "-",
            str(r["attempts"]),
        )
    console.print(table)


@dead_letters.command("replay")
@click.option("--id", "ids", type=int, multiple=True, help="Only these ids (repeatable).")
@click.option("--reason", "reason_code", default=None, help="Only this reason code.")
@click.pass_context
@handles_errors
def dead_letters_replay(ctx: click.Context, ids: tuple[int, ...], reason_code: str | None) -> None:
    """Re-process parked items (e.g. after loading a missing price). Exactly-once."""
    settings = settings_of(ctx)
    q = db.queries(settings)
    with db.connect(settings) as conn:
        result = deadletters.replay(
            conn,
            q,
            catalog.CatalogCache(q),
            settings,
            datetime.now(UTC),
            ids=list(ids) or None,
            reason_code=reason_code,
        )
    click.echo(
        f"replayed {result.items}: {result.debited} debited, {result.byok} BYOK, "
        f"{result.duplicates} already recorded, {result.parked} still parked"
    )


@dead_letters.command("discard")
@click.argument("ids", type=int, nargs=-1, required=True)
@click.option("--reason", required=True)
@click.pass_context
@handles_errors
def dead_letters_discard(ctx: click.Context, ids: tuple[int, ...], reason: str) -> None:
    """Close parked items that will never be billed (kept, with the reason, for the record)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        done = deadletters.discard(
            conn, db.queries(settings), list(ids), reason=reason, actor=current_actor()
        )
    click.echo(f"discarded {len(done)}: {', '.join(map(str, done)) or '-'}")


# --- outbox, audit --------------------------------------------------------------------------
@main.group()
def outbox() -> None:
    """Messages for the gateway (wallet.exhausted / wallet.replenished)."""


@outbox.command("relay")
@click.pass_context
@handles_errors
def outbox_relay(ctx: click.Context) -> None:
    """Publish pending outbox rows now."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn, broker.connect(settings) as bconn:
        sent = wallets.relay_outbox(
            conn, db.queries(settings), broker.WalletEventPublisher(settings, bconn)
        )
    click.echo(f"published {sent}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def audit(ctx: click.Context, as_json: bool) -> None:
    """Check every invariant; exit 1 and print offending rows if any fails."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        report = run_audit(conn, db.queries(settings))
    print_audit(report, as_json)
    if not report.ok:
        sys.exit(1)


def print_audit(report: AuditReport, as_json: bool = False) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "states": report.states,
                    "checks": [
                        {"name": c.name, "ok": c.ok, "violations": c.violations}
                        for c in report.checks
                    ],
                },
                indent=2,
                default=str,
            )
        )
        return
    for check in report.checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name}")
        for row in check.violations[:50]:
            console.print(f"       {row}", highlight=False)
        if len(check.violations) > 50:
            console.print(f"       ... and {len(check.violations) - 50} more")
    console.print("events: " + ", ".join(f"{k} {v}" for k, v in report.states.items()))


# --- demo -----------------------------------------------------------------------------------
@main.command()
@click.option("--events", "count", default=20_000, show_default=True)
@click.option("--workers", "worker_count", default=2, show_default=True)
@click.option("--envelope", default=50, show_default=True, help="Events per message (1 = single).")
@click.option("--accounts", "account_count", default=40, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.pass_context
@handles_errors
def demo(
    ctx: click.Context, count: int, worker_count: int, envelope: int, account_count: int, seed: int
) -> None:
    """Publish realistic gateway traffic and watch separate worker processes bill it."""
    from billing.demo import run_demo

    ok = run_demo(
        settings_of(ctx),
        count=count,
        worker_count=worker_count,
        envelope=envelope,
        account_count=account_count,
        seed=seed,
        console=console,
    )
    if not ok:
        sys.exit(1)


# --- feature commands (their own modules; they import cli_common, never this module) -------
for _command in (*STRIPE_COMMANDS, *EXPORT_COMMANDS, *OPS_COMMANDS, *SPEND_COMMANDS):
    main.add_command(_command)


if __name__ == "__main__":
    main()
