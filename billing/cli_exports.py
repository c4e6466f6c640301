"""``billing export``, ``billing invoices ...`` and ``billing report``: the admin exports CLI.

Registered on the main group in ``billing/cli.py``. See docs/exports.md.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from billing import db
from billing.cli_common import console, current_actor, handles_errors, settings_of
from billing.exports import invoices as inv
from billing.exports.fleet import export_period
from billing.exports.formats import Format
from billing.exports.report import build_report, write_report
from billing.exports.statements import Period, set_time_zone
from billing.money import format_usd


def _period(value: str) -> Period:
    try:
        return Period.parse(value)
    except Exception:
        raise click.BadParameter(f"expected YYYY-MM, got {value!r}") from None


@click.command("export")
@click.option("--period", required=True, help="Month, YYYY-MM (in each account's time zone).")
@click.option(
    "--format", "fmt", type=click.Choice(list(Format.ALL)), default="csv", show_default=True
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--account", default=None, help="Only this account (default: all).")
@click.pass_context
@handles_errors
def export(ctx: click.Context, period: str, fmt: str, out_dir: Path, account: str | None) -> None:
    """Write the period's statements (summary + lines) for one account or all."""
    settings = settings_of(ctx)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(f"statements {period}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = export_period(settings, _period(period), fmt, out_dir, account, progress)
    for path in result.files[:20]:
        click.echo(f"wrote {path}")
    if len(result.files) > 20:
        click.echo(f"... and {len(result.files) - 20} more files in {out_dir}")
    click.echo(
        f"{result.accounts} accounts, usage {format_usd(result.usage)} USD, closing balances "
        f"{format_usd(result.closing)} USD, {result.seconds:.1f} s"
    )


@click.group("invoices")
def invoices() -> None:
    """Numbered, immutable invoices: usage statements and top-up receipts."""


@invoices.command("issue")
@click.option("--account", default=None, help="Usage statement of this account ...")
@click.option("--period", default=None, help="... for this month (YYYY-MM, must be closed).")
@click.option("--topup", "topup_id", default=None, help="Or: the receipt of this paid top-up.")
@click.option("--issuer", default=inv.DEFAULT_ISSUER, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(list(Format.ALL)), default="html", show_default=True
)
@click.pass_context
@handles_errors
def invoices_issue(
    ctx: click.Context,
    account: str | None,
    period: str | None,
    topup_id: str | None,
    issuer: str,
    fmt: str,
) -> None:
    """Issue (or show the already issued) statement or receipt; numbers never skip."""
    settings = settings_of(ctx)
    q = db.queries(settings)
    with db.connect(settings) as conn:
        if topup_id is not None and account is None and period is None:
            invoice = inv.issue_receipt(conn, q, topup_id, issuer=issuer, actor=current_actor())
        elif topup_id is None and account is not None and period is not None:
            invoice = inv.issue_statement(
                conn,
                q,
                account,
                _period(period),
                now=datetime.now(UTC),
                issuer=issuer,
                fmt=fmt,
                actor=current_actor(),
            )
        else:
            raise click.UsageError("give --account and --period, or --topup")
    click.echo(
        f"{invoice.label} ({invoice.kind.value}, {invoice.account_id}) issued "
        f"{invoice.issued_at.isoformat()} sha256 {invoice.content_sha256}"
    )


@invoices.command("list")
@click.option("--account", default=None)
@click.option("--issuer", default=None)
@click.option("--limit", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def invoices_list(
    ctx: click.Context, account: str | None, issuer: str | None, limit: int, as_json: bool
) -> None:
    """List issued invoices in number order."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = inv.list_invoices(
            conn, db.queries(settings), account=account, issuer=issuer, limit=limit
        )
    if as_json:
        for r in rows:
            r["total"] = format_usd(r["total"])
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("number", "issuer", "kind", "account", "subject", "issued", "format", "total")
    for r in rows:
        table.add_row(
            f"{r['prefix']}{r['number']:06d}",
            r["issuer"],
            r["kind"],
            r["account_id"],
            r["period"] or r["topup_id"],
            r["issued_at"].isoformat(timespec="seconds"),
            r["format"],
            format_usd(r["total"]),
        )
    console.print(table)


@invoices.command("show")
@click.argument("number", type=int)
@click.option("--issuer", default=inv.DEFAULT_ISSUER, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), help="Write the stored bytes.")
@click.option(
    "--verify",
    is_flag=True,
    help="Recompute the figures from the ledger and compare them (and the bytes).",
)
@click.pass_context
@handles_errors
def invoices_show(
    ctx: click.Context, number: int, issuer: str, out: Path | None, verify: bool
) -> None:
    """Show an invoice; --out writes its exact stored bytes.

    --verify answers whether the invoice still follows from the ledger: its stored figures are
    recomputed and compared (exit 1 if one differs, if the ledger no longer gives the invoice, or
    if a stored hash is broken). Whether today's
    rendering gives the same bytes is shown too, but a changed rendering alone is no failure.
    Invoices issued before figures were stored (migration 0016) can only be compared by bytes.
    """
    settings = settings_of(ctx)
    q = db.queries(settings)
    with db.connect(settings) as conn:
        invoice = inv.find_invoice(conn, q, issuer, number)
        checked = inv.verify(conn, q, invoice) if verify else None
    for key, value in (
        ("number", invoice.label),
        ("kind", invoice.kind.value),
        ("account", invoice.account_id),
        ("subject", invoice.period or invoice.topup_id),
        ("issued_at", invoice.issued_at.isoformat()),
        ("issued_by", invoice.issued_by),
        ("format", invoice.format),
        ("total", format_usd(invoice.total)),
        ("sha256", invoice.content_sha256),
        ("fig sha256", invoice.figures_sha256 or "none (issued before figures were stored)"),
        ("hash ok", invoice.intact),
    ):
        click.echo(f"{key:>10}: {value}")
    if checked is not None:
        for key, value in _verification_lines(checked):
            click.echo(f"{key:>10}: {value}")
    if out is not None:
        out.write_bytes(invoice.content)
        click.echo(f"wrote {out}")
    if invoice.intact is False or (checked is not None and not checked.ok):
        raise SystemExit(1)


def _verification_lines(checked: inv.Verification) -> list[tuple[str, str]]:
    if checked.figures is inv.FiguresCheck.UNRECOMPUTABLE:
        reason = (checked.difference or "").removesuffix(" (run `billing audit`)")
        return [
            ("figures", f"cannot be recomputed from the ledger: {reason} (run billing audit)"),
            ("rendering", "not compared (the invoice cannot be rebuilt)"),
        ]
    if checked.figures is inv.FiguresCheck.NOT_STORED:
        return [
            ("figures", "not stored (issued before migration 0016): comparing bytes instead"),
            ("rendering", "identical bytes" if checked.same_bytes else "DIFFERENT"),
        ]
    if checked.figures is inv.FiguresCheck.MATCH:
        figures = "match"
        rendering = "changed since issue (figures match)"
    else:
        figures = f"DIFFERENT (first difference: {checked.difference})"
        rendering = "changed since issue"
    return [
        ("figures", figures),
        ("rendering", "identical bytes" if checked.same_bytes else rendering),
    ]


@invoices.command("add-issuer")
@click.argument("issuer")
@click.option("--legal-name", required=True)
@click.option("--prefix", required=True, help="Number prefix, e.g. INV-EU-")
@click.option("--address", default="")
@click.pass_context
@handles_errors
def invoices_add_issuer(
    ctx: click.Context, issuer: str, legal_name: str, prefix: str, address: str
) -> None:
    """Register an issuer; its invoices are numbered from 1 without gaps."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        added = inv.add_issuer(conn, db.queries(settings), issuer, legal_name, prefix, address)
    click.echo(f"issuer {issuer} " + ("added" if added else "already exists"))


@invoices.command("time-zone")
@click.argument("account_id")
@click.argument("time_zone", required=False)
@click.pass_context
@handles_errors
def invoices_time_zone(ctx: click.Context, account_id: str, time_zone: str | None) -> None:
    """Set the time zone an account's periods are cut in (omit it for UTC)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        set_time_zone(conn, db.queries(settings), account_id, time_zone)
    click.echo(f"{account_id}: periods in {time_zone or 'UTC'}")


@click.command("report")
@click.option("--period", required=True, help="Month, YYYY-MM.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--account", default=None, help="Only this account (default: fleet-wide).")
@click.pass_context
@handles_errors
def report(ctx: click.Context, period: str, out_dir: Path, account: str | None) -> None:
    """Usage report with charts: tokens/spend per day per model, BYOK share, latency."""
    result = build_report(settings_of(ctx), _period(period), account)
    for path in write_report(result, out_dir):
        click.echo(f"wrote {path}")


COMMANDS = (export, invoices, report)
