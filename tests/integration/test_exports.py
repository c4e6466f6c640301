"""Statements, invoices and fleet exports on real PostgreSQL: exact to the cent in every format.

The scenario month is the current UTC month (usage is debited "now", and usage belongs to the
period it was debited in): a mid-month price change, BYOK traffic, a Stripe top-up with its 5%
fee, a partial refund, admin adjustments, a late event from the previous month, and an opening
balance from a posting dated in the previous month.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import openpyxl
import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest

from billing import catalog, db, wallets
from billing.audit import run_audit
from billing.catalog import BillableClass, PriceComponent, PriceVersion
from billing.db import Queries
from billing.errors import BillingError, UnknownAccount
from billing.events import UsageEvent, encode_event
from billing.exports import invoices as inv
from billing.exports.fleet import export_period
from billing.exports.formats import statement_bytes
from billing.exports.report import build_report, write_report
from billing.exports.statements import Period, Section, set_time_zone, statement_for
from billing.money import EXACT, format_cents, format_usd, sum_exact, to_cents
from billing.pricing import price
from billing.settings import Settings
from billing.topups import apply_event, quote
from billing.usage import decode_and_price, record_batch

from .helpers import make_event, open_account

# The scenario's model has versions of its own (OLD_SHEET from 2025, and the test's mid-month
# change): a shipped catalog version starting on the 1st of the current month (o4-mini's of
# 2026-12-01) would otherwise split the early events from the late one.
MODEL, PROVIDER = "test/o4-mini-like", "openai"
OLD_SHEET = {  # o4-mini's 2025 standard sheet
    BillableClass.INPUT: PriceComponent(Decimal("1.10"), 1_000_000),
    BillableClass.CACHED_INPUT: PriceComponent(Decimal("0.275"), 1_000_000),
    BillableClass.OUTPUT: PriceComponent(Decimal("4.40"), 1_000_000),
    BillableClass.IMAGE: PriceComponent(Decimal("0.842"), 1_000),
}


def record(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, events: list[UsageEvent]
) -> Decimal:
    """Record events as one batch (recorded now); returns what the batch debited."""
    priced, rejected = decode_and_price(
        [encode_event(e) for e in events], catalog.snapshot(conn, q), settings, datetime.now(UTC)
    )
    assert not rejected, rejected
    with conn.transaction():
        return record_batch(conn, q, priced, rejected).amount_debited


def backdated_credit(
    conn: psycopg.Connection[Any], account: str, amount: Decimal, at: datetime
) -> None:
    """An adjustment posted at a past time (INSERT only, balanced, wallet cache kept equal)."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO postings (kind, memo, actor, created_at) "
            "VALUES ('adjustment', 'carried over', 'tests', %(at)s)",
            {"at": at},
        )
        conn.execute(
            "INSERT INTO ledger_entries (posting_id, ledger_account_id, amount, created_at) "
            "SELECT currval('posting_ids'), x.id, x.amount, %(at)s FROM (VALUES "
            "((SELECT ledger_account_id FROM wallets WHERE account_id = %(a)s), %(m)s::numeric),"
            "((SELECT ledger_account_id FROM ledger_accounts WHERE code = 'equity:adjustments'),"
            " -%(m)s::numeric)) AS x(id, amount)",
            {"at": at, "a": account, "m": amount},
        )
        conn.execute(
            "UPDATE wallets SET balance = balance + %(m)s, "
            "state = CASE WHEN balance + %(m)s > 0 THEN 'active' ELSE 'exhausted' END "
            "WHERE account_id = %(a)s",
            {"a": account, "m": amount},
        )


def paid_topup(
    conn: psycopg.Connection[Any], q: Queries, account: str, topup_id: str, credit: str
) -> tuple[int, int]:
    """A top-up paid through the Stripe event path of billing/topups.py; returns (credit, fee)."""
    quoted = quote(Decimal(credit), Decimal("0.05"))
    with conn.transaction():
        conn.execute(
            q["topup_insert"],
            {
                "topup_id": topup_id,
                "account_id": account,
                "kind": "manual",
                "credit": quoted.credit,
                "fee": quoted.fee,
                "charged": quoted.charged,
                "payment_method": None,
            },
        )
        outcome = apply_event(
            conn,
            q,
            {
                "type": "payment_intent.succeeded",
                "data": {
                    "object": {
                        "id": f"pi_{topup_id}",
                        "status": "succeeded",
                        "amount": quoted.charged_cents,
                        "amount_received": quoted.charged_cents,
                        "currency": "usd",
                        "metadata": {"topup_id": topup_id},
                    }
                },
            },
        )
    assert "credited" in outcome.text
    return quoted.credit_cents, quoted.fee_cents


def refund(
    conn: psycopg.Connection[Any], q: Queries, topup_id: str, charged: int, refunded: int
) -> None:
    with conn.transaction():
        outcome = apply_event(
            conn,
            q,
            {
                "type": "charge.refunded",
                "data": {
                    "object": {
                        "id": f"ch_{topup_id}",
                        "payment_intent": f"pi_{topup_id}",
                        "amount": charged,
                        "amount_refunded": refunded,
                        "paid": True,
                        "status": "succeeded",
                        "currency": "usd",
                        "metadata": {"topup_id": topup_id},
                    }
                },
            },
        )
    assert "refunded" in outcome.text


@dataclass(frozen=True)
class Scenario:
    period: Period
    usage: dict[str, Decimal]  # independently priced debits per account
    byok: dict[str, Decimal]  # independently priced notional BYOK cost
    opening: dict[str, Decimal]
    old: PriceVersion
    new: PriceVersion
    zone: str  # globex's time zone


def build_scenario(conn: psycopg.Connection[Any], q: Queries, settings: Settings) -> Scenario:
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    elapsed = now - month_start
    t1, change_at, t2 = (month_start + elapsed * k for k in (0.25, 0.5, 0.75))
    sheet = PriceVersion(MODEL, PROVIDER, datetime(2025, 1, 1, tzinfo=UTC), OLD_SHEET, "test")
    catalog.load_versions(conn, q, [sheet], now=now, loaded_by="tests", allow_backdate=True)
    snap = catalog.snapshot(conn, q)
    old = snap.in_force(MODEL, PROVIDER, t1)
    assert old is not None and old.effective_from < month_start
    new = PriceVersion(
        MODEL,
        PROVIDER,
        change_at,
        {
            **old.prices,
            BillableClass.INPUT: PriceComponent(Decimal("0.77"), 1_000_000),
            BillableClass.OUTPUT: PriceComponent(Decimal("3.333"), 1_000_000),
        },
        "test: mid-month price change",
    )
    catalog.load_versions(
        conn, q, [new], now=now, loaded_by="tests", allow_backdate=True
    )  # events are recorded below, after the change is known

    for account in ("acme", "globex"):
        open_account(conn, q, account, "0")
    # A zone far from UTC whose month is the same as UTC's right now (Auckland is ahead, so it
    # is already next month near a month's end; Los Angeles is behind, still last month early on).
    zone = next(
        z
        for z in ("Pacific/Auckland", "America/Los_Angeles")
        if Period.of(now.astimezone(ZoneInfo(z))) == Period.of(now)
    )
    set_time_zone(conn, q, "globex", zone)
    backdated_credit(conn, "acme", Decimal("7.77"), month_start - timedelta(days=3))
    wallets.adjust(conn, q, "acme", Decimal("50"), reason="welcome credit", actor="tests")
    credit_c, fee_c = paid_topup(conn, q, "acme", "tu_acme_1", "100")
    assert (credit_c, fee_c) == (10_000, 500)
    refund(conn, q, "tu_acme_1", charged=10_500, refunded=2_100)  # credit 20.00 + fee 1.00
    wallets.adjust(
        conn, q, "acme", Decimal("-1.234567891234"), reason="goodwill correction", actor="tests"
    )
    wallets.adjust(conn, q, "globex", Decimal("25"), reason="trial", actor="tests")

    def ev(i: int, account: str, at: datetime, **kw: Any) -> UsageEvent:
        kw.setdefault("model", MODEL)
        kw.setdefault("provider", PROVIDER)
        e = make_event(f"{account}-{i}", account, occurred_at=at, **kw)
        return msgspec.structs.replace(e, latency_ms=900 + 37 * i, ttft_ms=120 + 11 * i)

    events = [
        ev(1, "acme", t1, input_tokens=123_457, output_tokens=54_321, cached_input_tokens=999),
        ev(2, "acme", t1, input_tokens=1_000_001, output_tokens=3),
        ev(3, "acme", t2, input_tokens=765_431, output_tokens=7_777, cached_input_tokens=5),
        ev(4, "acme", t2, input_tokens=1, output_tokens=1, image_count=3),
        ev(
            5,
            "acme",
            t2,
            model="anthropic/claude-sonnet-4-5",
            provider="anthropic",
            input_tokens=4_321,
            output_tokens=1_234,
            web_search_count=2,
        ),
        ev(6, "acme", t2, byok=True, input_tokens=50_000, output_tokens=9_999),
        ev(7, "acme", month_start - timedelta(hours=5), input_tokens=11_111),  # late
        ev(8, "globex", t2, input_tokens=333_333, output_tokens=22_222),
        ev(9, "globex", t2, byok=True, model="perplexity/sonar", provider="perplexity"),
    ]
    debited = record(conn, q, settings, events)

    snap = catalog.snapshot(conn, q)
    usage: dict[str, Decimal] = {"acme": Decimal(0), "globex": Decimal(0)}
    byok: dict[str, Decimal] = {"acme": Decimal(0), "globex": Decimal(0)}
    for e in events:
        version = snap.in_force(e.model, e.provider, e.occurred_at)
        assert version is not None
        target = byok if e.byok else usage
        target[e.account_id] = EXACT.add(target[e.account_id], price(e.usage, version).total)
    assert debited == sum_exact(usage.values())
    return Scenario(
        Period.of(now),
        usage,
        byok,
        {"acme": Decimal("7.77"), "globex": Decimal(0)},
        old,
        new,
        zone,
    )


@pytest.fixture
def scenario(conn: psycopg.Connection[Any], q: Queries, settings: Settings) -> Scenario:
    return build_scenario(conn, q, settings)


def ledger_balance(conn: psycopg.Connection[Any], account: str) -> Decimal:
    row = conn.execute("SELECT balance FROM wallets WHERE account_id = %s", (account,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_statement_reconciles_exactly_with_the_ledger(
    conn: psycopg.Connection[Any], q: Queries, scenario: Scenario
) -> None:
    st = statement_for(conn, q, "acme", scenario.period)
    assert st.opening == scenario.opening["acme"] == Decimal("7.77")
    assert st.closing == ledger_balance(conn, "acme")
    assert st.usage_total == scenario.usage["acme"]
    assert st.byok_notional == scenario.byok["acme"]
    assert st.credits == Decimal("150")  # adjustment 50 + top-up credit 100
    assert st.debits == EXACT.add(Decimal("21.234567891234"), scenario.usage["acme"])
    assert EXACT.subtract(EXACT.add(st.opening, st.credits), st.debits) == st.closing
    expected_closing = EXACT.subtract(
        Decimal("7.77") + 50 + 100 - 20 - Decimal("1.234567891234"), scenario.usage["acme"]
    )
    assert st.closing == expected_closing
    assert (st.late_events, st.usage_events, st.byok_events) == (1, 6, 1)

    # movements with their fee and amount charged
    kinds = [(m.kind, m.amount, m.fee, m.charged) for m in st.movements]
    assert ("topup", Decimal("100"), Decimal("5"), Decimal("105")) in kinds
    assert ("topup_refund", Decimal("-20"), Decimal("-1"), Decimal("-21")) in kinds
    memos = {m.memo for m in st.movements if m.kind == "adjustment"}
    assert memos == {"welcome credit", "goodwill correction"}

    # a line per price version, each with that version's unit price; quantity x price = amount
    o4_input = [u for u in st.usage if u.model == MODEL and u.billable_class == "input_tokens"]
    assert {(u.price_effective_from, u.unit_price) for u in o4_input} == {
        (scenario.old.effective_from, scenario.old.prices[BillableClass.INPUT].unit_price),
        (scenario.new.effective_from, Decimal("0.77")),
    }
    for u in (*st.usage, *st.byok):
        assert u.unit_price is not None and u.per is not None
        assert EXACT.divide(EXACT.multiply(u.unit_price, u.quantity), u.per) == u.amount, u

    # printed cents: every line carried, the closing is the sum of the lines above it
    printed = st.printed()
    body = [p for p in printed if p.section not in (Section.CLOSING, Section.BYOK)]
    assert sum(p.cents for p in body) == st.section_cents(Section.CLOSING) == to_cents(st.closing)
    byok = [p for p in printed if p.section is Section.BYOK]
    assert sum(p.cents for p in byok) == to_cents(st.byok_notional)


def test_account_time_zone_cuts_the_period_and_is_validated(
    conn: psycopg.Connection[Any], q: Queries, scenario: Scenario
) -> None:
    st = statement_for(conn, q, "globex", scenario.period)
    assert st.time_zone == scenario.zone
    assert st.period_start.utcoffset() is not None
    assert st.period_start == datetime(
        scenario.period.year,
        scenario.period.month,
        1,
        tzinfo=ZoneInfo(scenario.zone),
    )
    assert st.closing == ledger_balance(conn, "globex")
    assert st.usage_total == scenario.usage["globex"]
    assert {u.model for u in st.byok} == {"perplexity/sonar"}
    with pytest.raises(BillingError, match="unknown time zone"):
        set_time_zone(conn, q, "globex", "Mars/Olympus_Mons")
    with pytest.raises(psycopg.errors.CheckViolation):  # the database refuses it too
        conn.execute("UPDATE accounts SET time_zone = 'Nowhere/Else' WHERE account_id = 'acme'")
    # Listed in pg_timezone_names, but read by PostgreSQL as a fixed UTC+01:00 abbreviation: a
    # July would start at 01:00 of CEST, its first hour on June's statement.
    with pytest.raises(BillingError, match="fixed-offset abbreviation"):
        set_time_zone(conn, q, "globex", "CET")
    with pytest.raises(psycopg.errors.CheckViolation, match="Europe/Paris"):
        conn.execute("UPDATE accounts SET time_zone = 'WET' WHERE account_id = 'acme'")
    with pytest.raises(UnknownAccount):
        statement_for(conn, q, "nobody", scenario.period)


def _independent(conn: psycopg.Connection[Any], account: str, period: Period) -> dict[str, Any]:
    """Opening and closing straight from ledger_entries, usage straight from usage_events."""
    start = conn.execute(
        "SELECT make_timestamptz(%s, %s, 1, 0, 0, 0, coalesce(time_zone, 'UTC')) "
        "FROM accounts WHERE account_id = %s",
        (period.year, period.month, account),
    ).fetchone()
    assert start is not None
    row = conn.execute(
        "SELECT coalesce(sum(e.amount) FILTER (WHERE e.created_at < %(s)s), 0), "
        "coalesce(sum(e.amount), 0) FROM ledger_entries e "
        "JOIN wallets w USING (ledger_account_id) WHERE w.account_id = %(a)s",
        {"s": start[0], "a": account},
    ).fetchone()
    assert row is not None
    return {"opening": row[0], "closing": row[1]}


def test_every_format_gives_the_same_numbers_to_the_cent(
    conn: psycopg.Connection[Any],
    q: Queries,
    settings: Settings,
    scenario: Scenario,
    tmp_path: Path,
) -> None:
    period = scenario.period
    truth = {a: _independent(conn, a, period) for a in ("acme", "globex")}
    statements = {a: statement_for(conn, q, a, period) for a in truth}
    for account, values in truth.items():
        assert statements[account].opening == values["opening"]
        assert statements[account].closing == values["closing"]

    seen: list[tuple[int, int]] = []
    results = {}
    for fmt in ("csv", "xlsx", "parquet", "html"):
        results[fmt] = export_period(
            settings, period, fmt, tmp_path / fmt, progress=lambda d, t: seen.append((d, t))
        )
        assert results[fmt].accounts == 2
    assert seen[-1] == (2, 2)

    def check(account: str, summary: dict[str, Decimal], lines: list[dict[str, Any]]) -> None:
        st = statements[account]
        assert summary["closing_exact"] == truth[account]["closing"]
        assert summary["opening_exact"] == truth[account]["opening"]
        assert summary["usage_exact"] == scenario.usage[account]
        assert summary["byok_notional_exact"] == scenario.byok[account]
        assert summary["closing"] * 100 == to_cents(truth[account]["closing"])
        parts = ("opening", "topups", "grants", "refunds_disputes", "adjustments", "other", "usage")
        assert sum(summary[p] for p in parts) == summary["closing"]
        mine = [r for r in lines if r["account_id"] == account]
        body = [r for r in mine if r["section"] not in ("closing", "byok")]
        assert sum(r["amount"] for r in body) == summary["closing"]
        assert sum_exact(r["amount_exact"] for r in body) == truth[account]["closing"]
        assert len(mine) == len(st.printed())

    # CSV: text read back as Decimal
    csv_summary = pd.read_csv(results["csv"].files[0], dtype=str, keep_default_na=False)
    csv_lines = pd.read_csv(results["csv"].files[1], dtype=str, keep_default_na=False)

    def dec(value: str) -> Decimal:
        return Decimal(value) if value else Decimal(0)

    for row in csv_summary.to_dict("records"):
        summary = {k: dec(v) for k, v in row.items() if k.endswith("_exact") or k in _CENT_COLS}
        lines = [
            {**r, "amount": dec(r["amount"]), "amount_exact": dec(r["amount_exact"])}
            for r in csv_lines.to_dict("records")
        ]
        check(row["account_id"], summary, lines)

    # Parquet: decimal128 columns read back as exact Decimals
    pq_summary = pq.read_table(results["parquet"].files[0]).to_pylist()
    pq_lines = pq.read_table(results["parquet"].files[1]).to_pylist()
    assert str(pq.read_schema(results["parquet"].files[0]).field("closing_exact").type) == (
        "decimal128(38, 12)"
    )
    for row in pq_summary:
        lines = [
            {**r, "amount": r["amount"] or Decimal(0), "amount_exact": r["amount_exact"]}
            for r in pq_lines
        ]
        check(row["account_id"], row, lines)

    # XLSX: printed amounts are typed numeric cells; exact amounts are text
    book = openpyxl.load_workbook(results["xlsx"].files[0], read_only=True)
    sheet_rows = list(book["Summary"].iter_rows(values_only=True))
    head = list(sheet_rows[0])
    line_rows = list(book["Lines"].iter_rows(values_only=True))
    line_head = list(line_rows[0])
    xl_lines = []
    for values in line_rows[1:]:
        r = dict(zip(line_head, [*values, *[None] * (len(line_head) - len(values))], strict=True))
        assert isinstance(r["amount"], int | float)
        xl_lines.append(
            {
                **r,
                "amount": Decimal(str(r["amount"])).quantize(Decimal("0.01")),
                "amount_exact": Decimal(r["amount_exact"]),
            }
        )
    for values in sheet_rows[1:]:
        r = dict(zip(head, [*values, *[None] * (len(head) - len(values))], strict=True))
        assert isinstance(r["closing"], int | float)
        summary = {
            k: (Decimal(v) if isinstance(v, str) else Decimal(str(v)).quantize(Decimal("0.01")))
            for k, v in r.items()
            if k.endswith("_exact") or k in _CENT_COLS
        }
        check(str(r["account_id"]), summary, xl_lines)

    # HTML: one page per account, printing the closing balance to the cent
    for account in truth:
        [page] = [p for p in results["html"].files if account in p.name]
        text = page.read_text()
        cents = to_cents(truth[account]["closing"])
        assert f"${format_cents(abs(cents))}" in text.replace(",", "")
        assert "@page" in text and "Bring your own key" in text

    # one account only
    one = export_period(settings, period, "parquet", tmp_path / "one", account="globex")
    assert one.accounts == 1
    assert [r["account_id"] for r in pq.read_table(one.files[0]).to_pylist()] == ["globex"]
    with pytest.raises(UnknownAccount):
        export_period(settings, period, "csv", tmp_path / "none", account="nobody")
    assert run_audit(conn, q).ok


_CENT_COLS = {
    "opening",
    "topups",
    "grants",
    "refunds_disputes",
    "adjustments",
    "other",
    "usage",
    "closing",
    "fees",
    "byok_notional",
}


def test_issued_invoices_are_immutable_and_reexport_identical_bytes(
    conn: psycopg.Connection[Any], q: Queries, scenario: Scenario
) -> None:
    with pytest.raises(BillingError, match="can be invoiced"):
        inv.issue_statement(conn, q, "acme", scenario.period, now=datetime.now(UTC))
    st = statement_for(conn, q, "acme", scenario.period)
    closed = st.period_end + inv.CLOSE_GRACE
    issued = {
        fmt: inv.issue_statement(conn, q, account, scenario.period, now=closed, fmt=fmt)
        for fmt, account in (("html", "acme"), ("xlsx", "globex"))
    }
    receipt = inv.issue_receipt(conn, q, "tu_acme_1")
    assert [i.number for i in (*issued.values(), receipt)] == [1, 2, 3]
    assert receipt.total == Decimal("105") and b"$5.00" in receipt.content
    assert b"$105.00" in receipt.content

    for invoice in (*issued.values(), receipt):
        assert invoice.intact
        assert inv.render_again(conn, q, invoice) == invoice.content
        again = (
            inv.issue_receipt(conn, q, "tu_acme_1")
            if invoice.topup_id
            else inv.issue_statement(
                conn, q, invoice.account_id, scenario.period, now=closed, fmt="csv"
            )
        )
        assert (again.invoice_id, again.content) == (invoice.invoice_id, invoice.content)
    # the XLSX is byte-identical when rebuilt later (no "now" inside)
    xlsx = issued["xlsx"]
    rebuilt = statement_bytes(
        statement_for(conn, q, "globex", scenario.period), "xlsx", xlsx.header
    )
    assert rebuilt == xlsx.content
    assert issued["html"].total == scenario.usage["acme"]
    assert f"{issued['html'].label}".encode() in issued["html"].content

    with pytest.raises(psycopg.errors.RestrictViolation):
        conn.execute("UPDATE invoices SET total = 0")
    with pytest.raises(psycopg.errors.RestrictViolation):
        conn.execute("DELETE FROM invoices")
    assert run_audit(conn, q).ok


def test_invoice_numbers_have_no_gaps_under_concurrent_issuing(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    assert inv.add_issuer(conn, q, "eu", "Gateway Billing EU", "EU-", "1 Rue Example, Paris")
    assert not inv.add_issuer(conn, q, "eu", "again", "EU-")
    accounts = [f"acct-{i:02d}" for i in range(12)]
    for account in accounts:
        open_account(conn, q, account, "1")
    previous = Period.of(datetime.now(UTC) - timedelta(days=40))  # closed long ago
    now = datetime.now(UTC)
    failures: list[BaseException] = []
    numbers: list[int] = []
    lock = threading.Lock()

    def worker(subjects: list[str]) -> None:
        with db.connect(settings) as c:
            for account in subjects:
                try:
                    invoice = inv.issue_statement(c, q, account, previous, now=now, issuer="eu")
                    with lock:
                        numbers.append(invoice.number)
                except UnknownAccount as exc:  # rolls back: must not burn a number
                    with lock:
                        failures.append(exc)

    # every account issued by two threads (same subject twice), plus unknown accounts failing
    plan = [[*accounts[i::3], "ghost"] for i in range(3)]
    plan += [list(reversed(p)) for p in plan]
    threads = [threading.Thread(target=worker, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == len(plan)
    assert sorted(set(numbers)) == list(range(1, len(accounts) + 1))
    rows = inv.list_invoices(conn, q, issuer="eu")
    assert [r["number"] for r in rows] == list(range(1, len(accounts) + 1))
    assert sorted(r["account_id"] for r in rows) == accounts
    assert all(r["prefix"] == "EU-" for r in rows)
    assert run_audit(conn, q).ok


def test_usage_report_tables_and_charts(
    settings: Settings, scenario: Scenario, tmp_path: Path
) -> None:
    fleet = build_report(settings, scenario.period)
    assert fleet.spend == sum_exact(scenario.usage.values())
    share = fleet.share.set_index("traffic")
    assert share.loc["byok", "charged"] == 0
    assert share.loc["byok", "priced"] == sum_exact(scenario.byok.values())
    assert fleet.top_models.iloc[0]["model"] == MODEL
    lat = fleet.latency.set_index(["model", "provider"]).loc[(MODEL, PROVIDER)]
    assert lat["events"] == 7 and lat["ttft_p50_ms"] > 0 and lat["throughput_p50_tps"] > 0
    files = write_report(fleet, tmp_path)
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 5 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)
    assert (tmp_path / "report.html").exists()
    one = build_report(settings, scenario.period, "globex")
    assert one.spend == scenario.usage["globex"]
    assert format_usd(one.spend) in (write_report(one, tmp_path / "globex")[-1].read_text())


def test_a_later_batch_lands_in_the_period_it_is_debited_in(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    """An event that occurred last month but is recorded now is on this month's statement."""
    open_account(conn, q, "late", "5")
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    this, last = Period.of(now), Period.of(month_start - timedelta(days=1))
    record(
        conn,
        q,
        settings,
        [replace_occurred(make_event("late-1", "late"), month_start - timedelta(hours=1))],
    )
    assert statement_for(conn, q, "late", last).usage == ()
    st = statement_for(conn, q, "late", this)
    assert st.late_events == 1 and st.usage_total == st.late_amount > 0


def replace_occurred(event: UsageEvent, at: datetime) -> UsageEvent:
    return msgspec.structs.replace(event, occurred_at=at)


def test_cli_export_invoices_and_report(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from billing.cli import main

    from .conftest import worker_env

    open_account(conn, q, "acme", "12.345")
    cli = CliRunner(env=worker_env(settings))

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())  # rich wraps long lines

    period = str(Period.of(datetime.now(UTC)))
    out = run("export", "--period", period, "--format", "csv", "--out", str(tmp_path / "e"))
    assert "1 accounts" in out and "closing balances 12.345 USD" in out
    summary = pd.read_csv(tmp_path / "e" / f"statements-{period}-summary.csv", dtype=str)
    assert summary["closing"].tolist() == ["12.34"]  # half-even
    assert "YYYY-MM" in run("export", "--period", "2026-13", "--out", "x", code=2)
    assert "no account" in run(
        "export", "--period", period, "--out", str(tmp_path), "--account", "ghost", code=2
    )
    last = str(Period.of(datetime.now(UTC) - timedelta(days=40)))  # ended >= 9 days ago
    assert "INV-000001" in run("invoices", "issue", "--account", "acme", "--period", last)
    assert "INV-000001" in run("invoices", "issue", "--account", "acme", "--period", last)
    assert "can be invoiced" in run(
        "invoices", "issue", "--account", "acme", "--period", period, code=2
    )
    assert "acme" in run("invoices", "list")
    shown = run("invoices", "show", "1", "--verify", "--out", str(tmp_path / "inv.html"))
    assert "identical bytes" in shown and "hash ok: True" in shown
    assert (tmp_path / "inv.html").read_bytes().startswith(b"<!DOCTYPE html>")
    assert "statements were issued in UTC" in run(
        "invoices", "time-zone", "acme", "Europe/Paris", code=2
    )
    wallets.create_account(conn, q, "fresh")
    assert "Europe/Paris" in run("invoices", "time-zone", "fresh", "Europe/Paris")
    assert "unknown time zone" in run("invoices", "time-zone", "fresh", "Nowhere/X", code=2)
    assert "report.html" in run("report", "--period", period, "--out", str(tmp_path / "r"))
