"""Statement, invoice and report order does not depend on the database's default collation.

An issued invoice's figures are compared line by line, and its cents are allocated in line
order, so a restore onto a cluster with another default collation (or a glibc/ICU upgrade) must
not reorder the lines. The test databases are C.UTF-8 (code point order); a database whose
default is ICU's root collation ('und': 'alpha' < 'Zeta', '_' < '-') must give the same order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from billing import catalog, db
from billing.catalog import BillableClass, PriceComponent, PriceVersion
from billing.exports import figures as fig
from billing.exports import invoices as inv
from billing.exports.report import build_report
from billing.exports.statements import Period, statement_for
from billing.settings import Settings

from .conftest import _admin, _url_for
from .helpers import make_event, open_account
from .test_exports import paid_topup, record

# Pairs whose order differs between "C" and ICU 'und': upper before lower case in "C" only.
MODELS = ("Zeta/x", "alpha/y")
PROVIDERS = ("Beta", "acme")
ISSUERS = ("a-1", "a_1")  # '-' (0x2d) < '_' (0x5f) in "C"; ICU puts '_' first
SHEET = {
    BillableClass.INPUT: PriceComponent(Decimal("1.10"), 1_000_000),
    BillableClass.OUTPUT: PriceComponent(Decimal("4.40"), 1_000_000),
}


@pytest.fixture
def icu_settings(settings: Settings) -> Iterator[Settings]:
    """A migrated database whose default collation is ICU's root ('und'), dropped after."""
    name = f"billing_test_icu_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        row = conn.execute("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'").fetchone()
        if row is None or row[0] == 0:
            pytest.skip("PostgreSQL was built without ICU")
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und' "
                "LOCALE 'C.UTF-8'"
            ).format(sql.Identifier(name))
        )
    try:
        icu = replace(settings, database_url=_url_for(name))
        with psycopg.connect(icu.database_url, autocommit=True) as conn:
            db.migrate(conn, icu.sql_dir)
        yield icu
    finally:
        with _admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def populate(settings: Settings, now: datetime) -> None:
    """Usage of every (model, provider) pair, BYOK too; a receipt from each issuer."""
    q = db.queries(settings)
    with db.connect(settings) as conn:
        versions = [
            PriceVersion(m, p, datetime(2025, 1, 1, tzinfo=UTC), SHEET, "test")
            for m in MODELS
            for p in PROVIDERS
        ]
        catalog.load_versions(conn, q, versions, now=now, loaded_by="tests", allow_backdate=True)
        open_account(conn, q, "acme", "100")
        events = [
            make_event(
                f"e-{i}-{byok}",
                model=m,
                provider=p,
                byok=byok,
                input_tokens=1_004_567 + 1_111 * i,  # fractions of a cent: the allocation
                output_tokens=3_337 + i,  # of the cents depends on the line order
            )
            for byok in (False, True)
            for i, (m, p) in enumerate((m, p) for m in MODELS for p in PROVIDERS)
        ]
        record(conn, q, settings, events)
        for n, issuer in enumerate(ISSUERS):
            inv.add_issuer(conn, q, issuer, f"Issuer {issuer}", f"P{n}-")
            paid_topup(conn, q, "acme", f"tu_{n}", "10.01")
            inv.issue_receipt(conn, q, f"tu_{n}", issuer=issuer)


def observe(settings: Settings, period: Period) -> dict[str, list[Any]]:
    """What the statement's figures, the invoice list and the report show, in their order."""
    q = db.queries(settings)
    with db.connect(settings) as conn:
        figures = fig.statement_figures(statement_for(conn, q, "acme", period))
        issuers = [r["issuer"] for r in inv.list_invoices(conn, q)]
    report = build_report(settings, period, "acme")
    return {
        "lines": [
            tuple(line.get(k) for k in ("section", "model", "provider", "billable_class", "cents"))
            for line in figures["lines"]
        ],
        "issuers": issuers,
        "daily": list(report.daily["model"]),
        "latency": list(zip(report.latency["model"], report.latency["provider"], strict=True)),
    }


def test_statement_and_report_order_does_not_depend_on_the_default_collation(
    settings: Settings, icu_settings: Settings
) -> None:
    with psycopg.connect(icu_settings.database_url) as conn:  # the data discriminates
        row = conn.execute(
            'SELECT %(a)s < %(b)s, %(a)s COLLATE "C" < %(b)s, %(c)s < %(d)s',
            {"a": MODELS[1], "b": MODELS[0], "c": ISSUERS[1], "d": ISSUERS[0]},
        ).fetchone()
    assert row == (True, False, True)

    now = datetime.now(UTC)
    period = Period.of(now)
    for s in (settings, icu_settings):
        populate(s, now)
    default, icu = observe(settings, period), observe(icu_settings, period)

    for section in ("usage", "byok"):  # code point order: "Zeta/x" before "alpha/y"
        pairs = list(dict.fromkeys((m, p) for s, m, p, _, _ in default["lines"] if s == section))
        assert pairs == sorted(pairs) and len(pairs) == 4 and pairs[0] == ("Zeta/x", "Beta")
    assert default["issuers"] == list(ISSUERS)
    assert default["daily"] == sorted(default["daily"]) and default["daily"][0] == "Zeta/x"
    assert default["latency"] == sorted(default["latency"])
    assert icu == default
