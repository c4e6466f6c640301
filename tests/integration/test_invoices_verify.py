"""Issued invoices store their figures (migration 0016), tied to the row and never changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from billing import wallets
from billing.db import Queries
from billing.exports import invoices as inv
from billing.exports.statements import Period

from .test_exports import backdated_credit


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
