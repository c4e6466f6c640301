"""``billing invoices show N --verify``: does an issued invoice still follow from the ledger?

A change in how invoices are rendered (simulated by changing the HTML stylesheet and dropping a
column of the CSV, XLSX and Parquet lines) leaves the figures matching and exits 0; a change in
the books after the issue (a posting dated into the invoiced month, an entry edited with the
append-only trigger off, a top-up's fee changed) is a difference naming its field and exits 1.
Invoices issued before migration 0016 have no stored figures and are checked by their bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from billing import db, wallets
from billing.cli import main
from billing.db import Queries
from billing.exports import formats
from billing.exports import invoices as inv
from billing.exports.formats import InvoiceHeader, statement_bytes
from billing.exports.statements import Period, statement_for
from billing.settings import Settings

from .conftest import worker_env
from .test_exports import backdated_credit, build_scenario, paid_topup

FORMATS = ("html", "csv", "xlsx", "parquet")
Run = Callable[..., tuple[int, dict[str, str]]]


def cli(settings: Settings) -> Run:
    """Run ``billing ...``; returns the exit code and the ``key: value`` lines shown."""
    runner = CliRunner(env=worker_env(settings))

    def run(*args: str) -> tuple[int, dict[str, str]]:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        shown = {}
        for line in result.output.splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                shown[key.strip()] = value
        return result.exit_code, shown

    return run


def change_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a release that changes invoices' looks but not their numbers does."""
    monkeypatch.setattr(formats, "_CSS", formats._CSS + "td.num { color: #000; }\n")
    monkeypatch.setattr(
        formats, "LINE_COLUMNS", tuple(c for c in formats.LINE_COLUMNS if c[0] != "actor")
    )


def closed_period() -> tuple[Period, datetime]:
    """A month that ended at least 9 days ago (closed), and its start in UTC."""
    period = Period.of(datetime.now(UTC) - timedelta(days=40))
    return period, datetime(period.year, period.month, 1, tzinfo=UTC)


def account_with_closed_month(conn: psycopg.Connection[Any], q: Queries) -> tuple[Period, datetime]:
    period, start = closed_period()
    wallets.create_account(conn, q, "acme")
    backdated_credit(conn, "acme", Decimal("10"), start + timedelta(days=2))
    backdated_credit(conn, "acme", Decimal("-2.345"), start + timedelta(days=5))
    return period, start


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rendering_change_leaves_the_figures_matching(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    scenario = build_scenario(conn, q, settings)  # usage, BYOK, top-up, refund, adjustments
    closed = statement_for(conn, q, "acme", scenario.period).period_end + inv.CLOSE_GRACE
    statement = inv.issue_statement(conn, q, "acme", scenario.period, now=closed, fmt=fmt)
    receipt = inv.issue_receipt(conn, q, "tu_acme_1")
    run = cli(settings)
    for invoice in (statement, receipt):
        assert invoice.intact and invoice.figures is not None
        code, shown = run("invoices", "show", str(invoice.number), "--verify")
        assert (code, shown["figures"], shown["rendering"]) == (0, "match", "identical bytes")
        assert shown["fig sha256"] == invoice.figures_sha256

    change_rendering(monkeypatch)
    for invoice in (statement, receipt):
        assert inv.render_again(conn, q, invoice) != invoice.content  # the rendering did change
        code, shown = run("invoices", "show", str(invoice.number), "--verify")
        assert (code, shown["figures"], shown["rendering"]) == (
            0,
            "match",
            "changed since issue (figures match)",
        ), shown
        assert shown["hash ok"] == "True"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_posting_dated_into_the_invoiced_month_is_a_difference(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, fmt: str
) -> None:
    """Postings are dated when they commit, so none can reach a closed month through the code;
    an INSERT with an earlier date (which no trigger refuses) can, and --verify finds it."""
    period, start = account_with_closed_month(conn, q)
    invoice = inv.issue_statement(conn, q, "acme", period, now=datetime.now(UTC), fmt=fmt)
    run = cli(settings)
    assert run("invoices", "show", "1", "--verify")[0] == 0

    backdated_credit(conn, "acme", Decimal("2.5"), start + timedelta(days=9))
    code, shown = run("invoices", "show", "1", "--verify")
    assert code == 1
    assert shown["figures"] == (
        "DIFFERENT (first difference: closing stored 7.655000000000, now 10.155000000000)"
    )
    assert shown["rendering"] == "changed since issue"
    assert shown["hash ok"] == "True"  # the stored invoice itself is intact
    assert inv.verify(conn, q, invoice).difference == (
        "closing stored 7.655000000000, now 10.155000000000"
    )


def test_an_edited_entry_is_a_difference_even_where_the_bytes_do_not_show_it(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    """An entry's time moved within its day: the HTML statement prints the date only, so its bytes
    are the same, but the figures hold the posting time."""
    period, start = account_with_closed_month(conn, q)
    inv.issue_statement(conn, q, "acme", period, now=datetime.now(UTC), fmt="html")
    posting = conn.execute("SELECT min(posting_id) FROM postings").fetchone()
    assert posting is not None
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # the append-only trigger off
        conn.execute(
            "UPDATE ledger_entries SET created_at = created_at + interval '1 hour' "
            "WHERE posting_id = %s",
            (posting[0],),
        )
    code, shown = cli(settings)("invoices", "show", "1", "--verify")
    stored = (start + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    moved = (start + timedelta(days=2, hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert code == 1
    assert shown["figures"] == (
        f"DIFFERENT (first difference: lines[1].posted_at stored {stored}, now {moved})"
    )
    assert shown["rendering"] == "identical bytes"


def test_a_statement_the_ledger_no_longer_reconciles_is_a_failed_verification(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    """A usage entry's amount edited with the append-only trigger off: the statement cannot be
    rebuilt (its usage lines no longer sum to the usage debited). That is a verification that
    failed (exit 1), not a usage error (exit 2, which an unknown number still is)."""
    scenario = build_scenario(conn, q, settings)
    closed = statement_for(conn, q, "acme", scenario.period).period_end + inv.CLOSE_GRACE
    statement = inv.issue_statement(conn, q, "acme", scenario.period, now=closed)
    receipt = inv.issue_receipt(conn, q, "tu_acme_1")
    run = cli(settings)
    assert run("invoices", "show", str(statement.number), "--verify")[0] == 0

    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # the append-only trigger off
        edited = conn.execute(
            "UPDATE ledger_entries SET amount = amount - 1 WHERE entry_id = ("
            " SELECT min(e.entry_id) FROM ledger_entries e JOIN postings p USING (posting_id)"
            " JOIN wallets w USING (ledger_account_id)"
            " WHERE p.kind = 'usage' AND w.account_id = 'acme')"
        )
        assert edited.rowcount == 1
    code, shown = run("invoices", "show", str(statement.number), "--verify")
    assert code == 1, shown
    assert shown["figures"].startswith("cannot be recomputed from the ledger: acme ")
    assert "usage lines total" in shown["figures"]
    assert shown["figures"].endswith("for usage in the period (run billing audit)")
    assert shown["rendering"] == "not compared (the invoice cannot be rebuilt)"
    assert shown["hash ok"] == "True"
    checked = inv.verify(conn, q, statement)
    assert (checked.figures, checked.ok) == (inv.FiguresCheck.UNRECOMPUTABLE, False)

    # the receipt does not depend on that entry; an unknown number is still a usage error
    assert run("invoices", "show", str(receipt.number), "--verify")[0] == 0
    assert run("invoices", "show", "99", "--verify")[0] == 2


def test_a_changed_top_up_is_a_difference_on_its_receipt(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    wallets.create_account(conn, q, "acme")
    paid_topup(conn, q, "acme", "tu_1", "100")
    receipt = inv.issue_receipt(conn, q, "tu_1")
    run = cli(settings)
    assert run("invoices", "show", str(receipt.number), "--verify")[0] == 0
    conn.execute("UPDATE topups SET fee = 4, charged = 104 WHERE topup_id = 'tu_1'")
    code, shown = run("invoices", "show", str(receipt.number), "--verify")
    assert code == 1
    assert shown["figures"] == (
        "DIFFERENT (first difference: total stored 105.000000000000, now 104.000000000000)"
    )


def test_the_figures_are_stored_with_their_invoice_and_never_change(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    period, _ = account_with_closed_month(conn, q)
    invoice = inv.issue_statement(conn, q, "acme", period, now=datetime.now(UTC))
    row = conn.execute(
        "SELECT figures::text, figures_sha256, figures->>'closing' FROM invoices"
    ).fetchone()
    assert row == (invoice.figures, invoice.figures_sha256, "7.655000000000")
    assert conn.execute(q["audit_invoice_hashes"]).fetchall() == []
    for change in (
        "UPDATE invoices SET figures = NULL, figures_sha256 = NULL",
        "UPDATE invoices SET figures = '{}', figures_sha256 = encode(sha256('{}'), 'hex')",
        "DELETE FROM invoices",
    ):
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute(change)

    conn.execute("INSERT INTO invoice_issuers (issuer, legal_name, prefix) VALUES ('o', 'O', 'O-')")
    copy = (
        "INSERT INTO invoices (issuer, number, kind, account_id, period, format, total, content, "
        "content_sha256, figures, figures_sha256) SELECT 'o', 1, kind, account_id, '2000-01', "
        "format, total, content, content_sha256, {} FROM (SELECT *, replace(figures::text, "
        '\'"total":"0.000000000000"\', \'"total":"1.000000000000"\') AS other FROM invoices) i'
    )
    refused = {
        "no figures": "NULL, NULL",
        "a hash of other text": "figures, encode(sha256('x'), 'hex')",
        "another total": "other::json, encode(sha256(convert_to(other, 'UTF8')), 'hex')",
    }
    for why, columns in refused.items():
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(copy.format(columns))  # type: ignore[arg-type]
            pytest.fail(f"{why}: accepted")
    conn.execute(copy.format("figures, figures_sha256"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        {"figures": 1},
        {"figures": 1, "kind": "usage_statement", "account_id": "acme"},
        {"figures": 1, "kind": "usage_statement", "total": "0.000000000000"},
        {"figures": 1, "account_id": "acme", "total": "0.000000000000"},
    ],
)
def test_a_record_missing_the_kind_account_or_total_is_refused(
    conn: psycopg.Connection[Any], q: Queries, record: dict[str, Any]
) -> None:
    """The CHECK ties the record's kind, account and total to the row: a field the record lacks
    is NULL in the comparison, and a CHECK that is NULL passes, so each one must be required."""
    period, _ = account_with_closed_month(conn, q)
    inv.issue_statement(conn, q, "acme", period, now=datetime.now(UTC))
    conn.execute("INSERT INTO invoice_issuers (issuer, legal_name, prefix) VALUES ('o', 'O', 'O-')")
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    with pytest.raises(psycopg.errors.CheckViolation, match="invoices_figures_of_this_invoice"):
        conn.execute(
            "INSERT INTO invoices (issuer, number, kind, account_id, period, format, total, "
            "content, content_sha256, figures, figures_sha256) SELECT 'o', 1, kind, account_id, "
            "'2000-01', format, total, content, content_sha256, %(text)s::text::json, "
            "encode(sha256(convert_to(%(text)s, 'UTF8')), 'hex') FROM invoices",
            {"text": text},
        )


def test_an_invoice_issued_before_figures_were_stored_is_checked_by_its_bytes(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tmp_path / "sql"
    (before / "migrations").mkdir(parents=True)
    for path in sorted((settings.sql_dir / "migrations").glob("*.sql")):
        if int(path.name[:4]) < 16:
            shutil.copy(path, before / "migrations" / path.name)
    q = db.queries(settings)
    issued_at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    with db.connect(settings) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        db.migrate(conn, before)
        period, _ = account_with_closed_month(conn, q)
        header = InvoiceHeader("Gateway Billing", "", "INV-000001", issued_at)
        content = statement_bytes(statement_for(conn, q, "acme", period), "html", header)
        with conn.transaction():  # what 0003's issue wrote: no figures columns yet
            conn.execute(
                "INSERT INTO invoices (issuer, number, kind, account_id, period, issued_at, "
                "format, total, content, content_sha256) VALUES ('default', 1, 'usage_statement', "
                "'acme', %s, %s, 'html', 0, %s, encode(sha256(%s), 'hex'))",
                (str(period), issued_at, content, content),
            )
            conn.execute("UPDATE invoice_issuers SET last_number = 1 WHERE issuer = 'default'")
        assert db.migrate(conn, settings.sql_dir) == ["0016_invoice_figures"]
        assert conn.execute(q["audit_invoice_hashes"]).fetchall() == []

        run = cli(settings)
        code, shown = run("invoices", "show", "1", "--verify")
        assert code == 0
        assert shown["fig sha256"] == "none (issued before figures were stored)"
        assert shown["figures"] == (
            "not stored (issued before migration 0016): comparing bytes instead"
        )
        assert shown["rendering"] == "identical bytes"
        with pytest.raises(psycopg.errors.RestrictViolation):  # it cannot gain figures later
            conn.execute("UPDATE invoices SET figures = '{}'")

        change_rendering(monkeypatch)
        code, shown = run("invoices", "show", "1", "--verify")
        assert (code, shown["rendering"]) == (1, "DIFFERENT")
