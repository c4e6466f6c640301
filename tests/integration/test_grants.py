"""Credit grants on real PostgreSQL: consumption order, expiry exactly once, refunds, schedules."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from billing import db, grants, holds, wallets
from billing.catalog import snapshot
from billing.db import Queries
from billing.holds import AuthorizationRequest, Authorizer, Decision
from billing.settings import Settings
from billing.usage import price_events, record_isolating

from .helpers import assert_audit_clean, make_event, open_account

D = Decimal
NOW = datetime.now(UTC)
# o4-mini, 1000 input tokens and at most 1000 output: a worst case of 0.0055
WORST_0055 = AuthorizationRequest(
    account_id="acme",
    api_key_id="k",
    model="openai/o4-mini",
    provider="openai",
    input_tokens=1000,
    max_tokens=1000,
)


def spend(conn: psycopg.Connection[Any], q: Queries, event_id: str, account: str = "acme") -> D:
    """Record one usage event of 1000 input / 500 output on o4-mini: $0.0033."""
    priced, rejected = price_events([make_event(event_id, account)], snapshot(conn, q))
    assert not rejected
    record_isolating(conn, q, priced, [])
    return priced[0].charge.total


def grant(conn: psycopg.Connection[Any], q: Queries, amount: str, days: float, gid: str) -> str:
    return grants.grant_credit(conn, q, account_id="acme", amount=D(amount),
                               expires_at=NOW + timedelta(days=days), reason="promo",
                               actor="tests", now=NOW, grant_id=gid)  # fmt: skip


def rows(conn: psycopg.Connection[Any], q: Queries) -> dict[str, dict[str, Any]]:
    return {r["grant_id"]: r for r in grants.list_grants(conn, q, "acme")}


def test_usage_consumes_the_credit_expiring_first(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "1")  # paid credit
    grant(conn, q, "0.005", 30, "late")
    grant(conn, q, "0.002", 5, "early")
    assert grant(conn, q, "0.002", 5, "early") == "early"  # a repeat is a no-op
    c = grants.credit_of(conn, q, "acme")
    assert (c.balance, c.granted, c.paid) == (D("1.007"), D("0.007"), D(1))
    spend(conn, q, "e1")  # 0.0033: all of "early" (0.002), then 0.0013 of "late"
    g = rows(conn, q)
    assert (g["early"]["remaining"], g["late"]["remaining"]) == (0, D("0.0037"))
    spend(conn, q, "e2")  # 0.0033 more from "late"
    spend(conn, q, "e3")  # 0.0004 left in "late", then 0.0029 of paid credit
    c = grants.credit_of(conn, q, "acme")
    assert (c.granted, c.paid) == (0, D(1) - D("0.0029"))
    assert_audit_clean(conn, q)


def test_a_grant_expires_exactly_once_with_two_schedulers(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    for i in range(20):
        open_account(conn, q, f"a{i:02d}", "0")
        for k in range(3):
            grants.grant_credit(conn, q, account_id=f"a{i:02d}", amount=D("1.25"),
                                expires_at=NOW + timedelta(hours=1 + k), reason="promo",
                                actor="tests", now=NOW)  # fmt: skip
    spend(conn, q, "e-a00", "a00")
    later = NOW + timedelta(hours=2, minutes=30)  # two of each account's three grants lapsed
    totals: list[D] = []
    start = threading.Barrier(2)

    def scheduler() -> None:
        with db.connect(settings) as c:
            start.wait()
            totals.append(grants.expire_grants(c, q, later))

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(totals) == 20 * D("2.5") - D("0.0033")
    assert grants.expire_grants(conn, q, later) == 0  # nothing twice
    posted = conn.execute(
        "SELECT count(*), sum(e.amount) FROM postings p JOIN ledger_entries e USING (posting_id)"
        " JOIN ledger_accounts a USING (ledger_account_id)"
        " WHERE p.kind = 'grant_expiry' AND a.code = 'equity:grants'"
    ).fetchone()
    assert posted == (20, 20 * D("2.5") - D("0.0033"))
    for i in range(20):
        c = grants.credit_of(conn, q, f"a{i:02d}")
        assert (c.balance, c.granted) == (D("1.25"), D("1.25"))
    assert_audit_clean(conn, q)


def test_refunds_and_admin_debits_never_touch_granted_credit(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    grant(conn, q, "5", 30, "g")
    # a refund's clawback is a wallet debit outside usage: the same path as this adjustment
    wallets.adjust(conn, q, "acme", D("-10"), reason="refund clawback", actor="tests")
    c = grants.credit_of(conn, q, "acme")
    assert (c.balance, c.granted, c.paid) == (D(5), D(5), D(0))
    assert rows(conn, q)["g"]["consumed"] == 0
    assert_audit_clean(conn, q)


def test_a_lapsed_grant_is_not_consumed_and_its_rest_expires(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "1")
    grants.grant_credit(conn, q, account_id="acme", amount=D("0.01"),
                        expires_at=datetime.now(UTC) + timedelta(seconds=1), reason="promo",
                        actor="tests", now=datetime.now(UTC) - timedelta(seconds=1),
                        grant_id="short")  # fmt: skip
    spend(conn, q, "e1")
    assert rows(conn, q)["short"]["consumed"] == D("0.0033")
    import time

    time.sleep(1.1)  # the grant lapses in real time: usage must not consume it any more
    spend(conn, q, "e2")
    assert rows(conn, q)["short"]["consumed"] == D("0.0033")
    assert grants.expire_grants(conn, q, datetime.now(UTC)) == D("0.0067")
    c = grants.credit_of(conn, q, "acme")
    assert (c.balance, c.granted) == (D("1.01") - D("0.0066") - D("0.0067"), 0)
    assert_audit_clean(conn, q)


def test_scheduled_grants_are_issued_once_per_period(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "0")
    start = NOW - timedelta(days=61)
    grants.set_schedule(conn, q, schedule_id="monthly-5", account_id="acme", amount=D(5),
                        every=timedelta(days=30), valid_for=timedelta(days=30), reason="free tier",
                        first_at=start, actor="tests")  # fmt: skip
    # three periods began (day 0, 30, 60); the first two lapsed before they could be issued:
    # skipped (never credited and expired at once), the third issued once
    assert grants.issue_due_grants(conn, q, NOW) == 1
    assert grants.issue_due_grants(conn, q, NOW) == 0
    assert grants.expire_grants(conn, q, NOW) == 0
    g = rows(conn, q)
    assert sorted(g) == ["monthly-5:3"]
    assert g["monthly-5:3"]["remaining"] == 5
    assert grants.credit_of(conn, q, "acme").granted == 5
    assert_audit_clean(conn, q)


def test_the_statement_shows_granted_credit_apart_from_paid(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    from billing.exports.formats import summary_record
    from billing.exports.statements import Period, Section, statement_for

    open_account(conn, q, "acme", "10")
    now = datetime.now(UTC)
    grants.grant_credit(conn, q, account_id="acme", amount=D("5"), reason="welcome",
                        expires_at=now + timedelta(seconds=1), actor="tests", now=now,
                        grant_id="welcome")  # fmt: skip
    spend(conn, q, "e1")
    import time

    time.sleep(1.1)
    grants.expire_grants(conn, q, datetime.now(UTC))
    st = statement_for(conn, q, "acme", Period.of(datetime.now(UTC)))
    granted = [(p.description, p.amount) for p in st.printed() if p.section is Section.GRANTS]
    assert granted == [
        ("Credit grant: welcome", D(5)),
        ("Granted credit expired: expired: welcome", D("-4.9967")),
    ]
    summary = summary_record(st)
    assert (summary["topups"], summary["adjustments"], summary["grants"]) == (0, 1000, 0)
    # the usage was paid from the grant (expiring first): the paid credit is whole
    assert summary["usage_exact"] == D("0.0033")
    assert summary["closing_exact"] == D(10)
    assert grants.credit_of(conn, q, "acme").paid == D(10)
    assert (summary["paid_closing_exact"], summary["granted_closing_exact"]) == (D(10), 0)
    assert summary["usage_from_grants_exact"] == D("0.0033")


def test_the_statement_splits_the_closing_balance_into_paid_and_granted(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    from billing.exports.formats import statement_html, summary_record
    from billing.exports.statements import Period, statement_for

    open_account(conn, q, "acme", "1")
    grant(conn, q, "0.005", 30, "g1")
    spend(conn, q, "e1")  # 0.0033 from the grant
    spend(conn, q, "e2")  # 0.0017 from the grant, 0.0016 paid
    wallets.adjust(conn, q, "acme", D("-0.5"), reason="refund clawback", actor="tests")
    grant(conn, q, "2", 30, "g2")
    st = statement_for(conn, q, "acme", Period.of(datetime.now(UTC)))
    summary = summary_record(st)
    assert summary["granted_closing_exact"] == D(2)
    assert summary["paid_closing_exact"] == D("0.5") - D("0.0016")
    assert summary["usage_from_grants_exact"] == D("0.005")
    assert st.closing == D(1) + D("0.005") + D(2) - D("0.0066") - D("0.5")
    html = statement_html(st).decode()
    assert 'of which granted credit</td><td class="num">$2.00' in html
    assert "Granted credit (promotional)" in html


def test_cli_grants(settings: Settings, conn: psycopg.Connection[Any], q: Queries) -> None:
    import json

    from click.testing import CliRunner

    from billing.cli import main

    from .conftest import worker_env

    open_account(conn, q, "acme", "2")
    cli = CliRunner(env=worker_env(settings))

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    run("grants", "add", "acme", "5", "--days", "30", "--reason", "welcome", "--id", "w1")
    run("grants", "add", "acme", "5", "--days", "30", "--reason", "welcome", "--id", "w1")
    assert "needs a reason" in run("grants", "add", "acme", "1", "--days", "1", "--reason", " ",
                                   code=2)  # fmt: skip
    assert "exactly one" in run("grants", "add", "acme", "1", "--reason", "x", code=2)
    listed = json.loads(run("grants", "list", "--account", "acme", "--json"))
    assert [(g["grant_id"], g["amount"], g["remaining"]) for g in listed] == [
        ("w1", "5.00", "5.00")
    ]
    assert json.loads(run("grants", "credit", "acme", "--json")) == {
        "account_id": "acme", "balance": "7.00", "paid": "2.00", "granted": "5.00"}  # fmt: skip
    run("grants", "schedule", "free", "acme", "1", "--reason", "free tier")
    assert "1 scheduled grants issued" in run("grants", "expire")
    assert "0 scheduled grants issued; 0.00 USD" in run("grants", "expire")
    assert "granted 6.00" in run("grants", "credit", "acme")


def test_lapsed_granted_credit_is_not_available_before_the_expiry_task(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "0.001")
    grants.grant_credit(conn, q, account_id="acme", amount=D("0.01"), reason="promo",
                        expires_at=NOW + timedelta(hours=1), actor="tests", now=NOW)  # fmt: skip
    authorizer = Authorizer(q, settings.hold_ttl)
    request = WORST_0055
    assert authorizer.authorize(conn, request, NOW).allowed  # 0.0055 of 0.011
    later = NOW + timedelta(hours=1)  # the grant lapsed, the task has not run
    a = holds.availability(conn, q, "acme", later)
    assert (a.balance, a.lapsed, a.available) == (D("0.011"), D("0.01"), D("0.001"))
    denied = authorizer.authorize(conn, request, later)
    assert (denied.allowed, denied.reason) == (False, Decision.INSUFFICIENT_CREDITS)
    assert_audit_clean(conn, q)


def test_granted_credit_backs_a_hold_only_if_it_outlives_the_hold(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """A grant lapsing before the hold ends would leave the hold's usage debited from nothing:
    the expiry task takes the credit out while the hold still stands."""

    open_account(conn, q, "acme", "0")
    grants.grant_credit(conn, q, account_id="acme", amount=D("0.0055"), reason="promo",
                        expires_at=NOW + settings.hold_ttl - timedelta(seconds=1),
                        actor="tests", now=NOW)  # fmt: skip
    authorizer = Authorizer(q, settings.hold_ttl)
    request = WORST_0055
    denied = authorizer.authorize(conn, request, NOW)
    assert (denied.allowed, denied.reason) == (False, Decision.INSUFFICIENT_CREDITS)
    grants.grant_credit(conn, q, account_id="acme", amount=D("0.0055"), reason="promo",
                        expires_at=NOW + settings.hold_ttl + timedelta(seconds=1),
                        actor="tests", now=NOW, grant_id="outlives")  # fmt: skip
    assert authorizer.authorize(conn, request, NOW).allowed
    assert_audit_clean(conn, q)
