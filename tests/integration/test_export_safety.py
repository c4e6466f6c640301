"""What a finance desk opens must show what happened, where it happened, and nothing else.

* customer-chosen text (account ids and names) never becomes a spreadsheet formula;
* the HTML statement prints its period and its movements' dates in the account's zone, the zone
  its heading names, whatever the database session's zone;
* an account's zone cannot move once a statement was issued in it (its periods would no longer
  tile with the issued ones).
"""

from __future__ import annotations

import csv
import io
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import openpyxl
import psycopg
import pytest

from billing import db, wallets
from billing.db import Queries
from billing.errors import BillingError
from billing.exports import invoices as inv
from billing.exports.formats import SUMMARY_COLUMNS, csv_bytes, statement_bytes, summary_record
from billing.exports.statements import Period, set_time_zone, statement_for
from billing.settings import Settings

from .test_exports import backdated_credit

FORMULA = '=HYPERLINK("http://x.example/?"&A1,"Click")'
OCTOBER = Period(2025, 10)


def test_customer_text_never_becomes_a_spreadsheet_formula(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    wallets.create_account(conn, q, "=cmd|'/c,calc'!A0", name=FORMULA)
    wallets.create_account(conn, q, "@sum", name="-2+3")
    for account in ("=cmd|'/c,calc'!A0", "@sum"):
        backdated_credit(conn, account, Decimal("10"), datetime(2025, 10, 5, tzinfo=UTC))
        backdated_credit(conn, account, Decimal("-2.5"), datetime(2025, 10, 6, tzinfo=UTC))
        st = statement_for(conn, q, account, OCTOBER)

        summary_csv = csv_bytes([summary_record(st)], SUMMARY_COLUMNS).decode()
        [summary] = csv.DictReader(io.StringIO(summary_csv))
        assert summary["account_id"] == "'" + account
        assert summary["account_name"] == "'" + (st.account_name or "")
        lines = statement_bytes(st, "csv").decode()
        assert {r["account_id"] for r in csv.DictReader(io.StringIO(lines))} == {"'" + account}
        assert "-2.50" in lines and "'-2.50" not in lines  # amounts stay numbers

        book = openpyxl.load_workbook(io.BytesIO(statement_bytes(st, "xlsx")))
        cells = [c for row in book["Summary"].iter_rows(min_row=2) for c in row]
        texts = {c.value: c.data_type for c in cells if isinstance(c.value, str)}
        assert texts[account] == "s" and texts[st.account_name] == "s"
        assert not any(c.data_type == "f" for s in book for row in s.iter_rows() for c in row)


def test_html_statement_prints_the_period_and_dates_in_the_account_zone(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    wallets.create_account(conn, q, "nyc")
    set_time_zone(conn, q, "nyc", "America/New_York")
    new_york = ZoneInfo("America/New_York")
    last_evening = datetime(2025, 10, 31, 23, 30, tzinfo=new_york)  # 2025-11-01 03:30 UTC
    backdated_credit(conn, "nyc", Decimal("3"), last_evening)
    pages = []
    for session_zone in ("UTC", "Asia/Tokyo"):
        conn.execute("SELECT set_config('TimeZone', %s, false)", (session_zone,))
        st = statement_for(conn, q, "nyc", OCTOBER)
        pages.append(statement_bytes(st, "html").decode())
    assert pages[0] == pages[1]  # invoices --verify re-renders in whatever zone it runs
    assert "2025-10-01 00:00 to 2025-11-01 00:00 (America/New_York)" in pages[0]
    assert "<td>2025-10-31</td>" in pages[0] and "2025-11-01</td>" not in pages[0]
    assert st.closing == Decimal("3")


def test_time_zone_is_fixed_once_a_statement_was_issued(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    for account in ("issued", "fresh"):
        wallets.create_account(conn, q, account)
        backdated_credit(conn, account, Decimal("10"), datetime(2025, 10, 5, tzinfo=UTC))
    st = statement_for(conn, q, "issued", OCTOBER)
    inv.issue_statement(conn, q, "issued", OCTOBER, now=st.period_end + inv.CLOSE_GRACE)

    with pytest.raises(BillingError, match=r"issued in UTC \(the last for 2025-10\)"):
        set_time_zone(conn, q, "issued", "America/New_York")
    set_time_zone(conn, q, "issued", None)  # the zone it has: nothing moves
    set_time_zone(conn, q, "fresh", "America/New_York")  # no statement issued yet
    zones = dict(conn.execute("SELECT account_id, time_zone FROM accounts").fetchall())
    assert (zones["issued"], zones["fresh"]) == (None, "America/New_York")
    november = statement_for(conn, q, "issued", OCTOBER.next())
    assert november.opening == st.closing == Decimal("10")


def test_a_zone_change_racing_an_issue_waits_for_it_then_refuses(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """set_time_zone locked the account row, but issuing did not: a change could commit while
    a statement in the old zone was being issued. Issuing now holds the row FOR SHARE."""
    wallets.create_account(conn, q, "racer")
    backdated_credit(conn, "racer", Decimal("10"), datetime(2025, 10, 5, tzinfo=UTC))
    closed = statement_for(conn, q, "racer", OCTOBER).period_end + inv.CLOSE_GRACE
    outcome: list[BaseException | None] = []

    def change_zone() -> None:
        with db.connect(settings) as other:
            try:
                set_time_zone(other, q, "racer", "America/New_York")
                outcome.append(None)
            except BillingError as exc:
                outcome.append(exc)

    with conn.transaction():  # the issue, not committed yet
        inv.issue_statement(conn, q, "racer", OCTOBER, now=closed)
        changer = threading.Thread(target=change_zone)
        changer.start()
        changer.join(timeout=1.0)
        assert changer.is_alive(), "the zone change did not wait for the issue"
    changer.join(timeout=10)
    [error] = outcome
    assert isinstance(error, BillingError) and "issued in UTC" in str(error)
