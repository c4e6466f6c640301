"""Sub-accounts on real PostgreSQL: the organisation pays, limits per member, statements."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from billing import db, holds, members, wallets
from billing.catalog import snapshot
from billing.db import Queries
from billing.errors import BillingError
from billing.events import UsageEvent
from billing.exports.statements import Period, statement_for
from billing.holds import AuthorizationRequest, Authorizer, Decision
from billing.limits import Period as LimitPeriod
from billing.settings import Settings
from billing.usage import price_events, record_isolating

from .helpers import assert_audit_clean, make_event, open_account

D = Decimal
WORST = D("0.0055")  # o4-mini, 1000 input + 1000 max_tokens
NOW = datetime.now(UTC)


def record(conn: psycopg.Connection[Any], q: Queries, event_id: str, account: str,
           hold_id: str | None = None, byok: bool = False,
           occurred_at: datetime | None = None) -> None:  # fmt: skip
    base = make_event(event_id, account, byok=byok, occurred_at=occurred_at)  # 1000/500: 0.0033
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    event = UsageEvent(**{**fields, "hold_id": hold_id})
    priced, rejected = price_events([event], snapshot(conn, q))
    assert not rejected
    record_isolating(conn, q, priced, [])


def req(account: str, hold_id: str) -> AuthorizationRequest:
    return AuthorizationRequest(account_id=account, api_key_id=f"k-{account}",
                                model="openai/o4-mini", provider="openai", input_tokens=1000,
                                max_tokens=1000, hold_id=hold_id)  # fmt: skip


def balance(conn: psycopg.Connection[Any], account: str) -> D:
    row = conn.execute("SELECT balance FROM wallets WHERE account_id = %s", (account,)).fetchone()
    assert row is not None
    return D(row[0])


def test_the_organisation_pays_and_the_statement_attributes_to_the_member(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "org", "1")
    open_account(conn, q, "alice", "0.5")  # her own credit is untouched while a member
    open_account(conn, q, "bob", "0")
    members.add_member(conn, q, org="org", member="alice", actor="tests")
    members.add_member(conn, q, org="org", member="bob", actor="tests")
    record(conn, q, "o1", "org")
    record(conn, q, "a1", "alice")
    record(conn, q, "a2", "alice")
    record(conn, q, "b1", "bob")
    record(conn, q, "b2", "bob", byok=True)
    assert balance(conn, "org") == D(1) - 4 * D("0.0033")
    assert (balance(conn, "alice"), balance(conn, "bob")) == (D("0.5"), D(0))
    period = Period.of(datetime.now(UTC))
    st = statement_for(conn, q, "org", period)
    by_member: dict[str | None, D] = {}
    for line in st.usage:
        by_member[line.member] = by_member.get(line.member, D(0)) + line.amount
    assert by_member == {None: D("0.0033"), "alice": D("0.0066"), "bob": D("0.0033")}
    assert any(p.description.startswith("alice: openai/o4-mini") for p in st.printed())
    alice = statement_for(conn, q, "alice", period)
    assert alice.usage == () and alice.closing == D("0.5")
    bob = statement_for(conn, q, "bob", period)
    assert bob.usage == () and len(bob.byok) > 0  # BYOK (no money) stays on the member's own
    # after leaving, alice pays for herself again; the past stays attributed
    members.remove_member(conn, q, org="org", member="alice")
    record(conn, q, "a3", "alice")
    assert balance(conn, "alice") == D("0.5") - D("0.0033")
    assert statement_for(conn, q, "org", period).usage_total == 4 * D("0.0033")
    assert_audit_clean(conn, q)


def test_members_share_the_organisation_wallet_through_holds(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "org", WORST * 10)
    for m in ("m1", "m2", "m3"):
        open_account(conn, q, m, "100")  # their own money does not count
        members.add_member(conn, q, org="org", member=m, actor="tests")
    authorizer = Authorizer(q, settings.hold_ttl)
    authorizer.catalog(conn)
    start = threading.Barrier(30)
    allowed: list[str] = []

    def one(i: int) -> None:
        with db.connect(settings) as c:
            start.wait()
            a = authorizer.authorize(c, req(f"m{i % 3 + 1}", f"h{i}"), NOW)
            if a.allowed:
                allowed.append(f"h{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 10
    assert holds.availability(conn, q, "org", NOW).available == 0
    hold = allowed[0]
    member = f"m{int(hold[1:]) % 3 + 1}"
    record(conn, q, "ev-1", member, hold_id=hold)
    row = conn.execute("SELECT status, account_id, member_account_id FROM holds "
                       "WHERE hold_id = %s", (hold,)).fetchone()  # fmt: skip
    assert row == ("settled", "org", member)
    assert holds.availability(conn, q, "org", NOW).available == WORST - D("0.0033")
    assert_audit_clean(conn, q)


def test_a_member_limit_resets_each_period(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    open_account(conn, q, "org", "100")
    open_account(conn, q, "m1", "0")
    members.add_member(conn, q, org="org", member="m1", actor="tests", limit=WORST * 2,
                       period=LimitPeriod.DAY)  # fmt: skip
    authorizer = Authorizer(q, settings.hold_ttl)
    day = datetime(2026, 5, 4, 12, tzinfo=UTC)
    a1 = authorizer.authorize(conn, req("m1", "d1"), day)
    assert a1.allowed
    record(conn, q, "m1-e1", "m1", hold_id="d1", occurred_at=day)  # 0.0033 in the member's day
    assert authorizer.authorize(conn, req("m1", "d2"), day).allowed
    denied = authorizer.authorize(conn, req("m1", "d3"), day)
    assert (denied.allowed, denied.reason) == (False, Decision.MEMBER_LIMIT_EXCEEDED)
    listed = members.list_members(conn, q, day, "org")
    assert [(m["member_account_id"], m["used"]) for m in listed] == [("m1", D("0.0033") + WORST)]
    assert authorizer.authorize(conn, req("m1", "d4"), day + timedelta(hours=12)).allowed
    assert_audit_clean(conn, q)


def test_a_member_limit_set_mid_period_counts_what_the_member_spent(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    open_account(conn, q, "org", "100")
    open_account(conn, q, "m1", "1")
    day = datetime(2026, 5, 4, 12, tzinfo=UTC)
    record(conn, q, "own", "m1", occurred_at=day)  # paid by m1 itself: not the org's to limit
    members.add_member(conn, q, org="org", member="m1", actor="tests")
    record(conn, q, "paid-1", "m1", occurred_at=day)  # 0.0033 each, paid by the org
    record(conn, q, "paid-2", "m1", occurred_at=day)
    record(conn, q, "byok", "m1", byok=True, occurred_at=day)  # no money: never counts
    members.add_member(conn, q, org="org", member="m1", actor="tests", limit=D("0.01"),
                       period=LimitPeriod.DAY, now=day)  # fmt: skip
    listed = members.list_members(conn, q, day, "org")
    assert [(m["member_account_id"], m["used"]) for m in listed] == [("m1", D("0.0066"))]
    denied = Authorizer(q, settings.hold_ttl).authorize(conn, req("m1", "h1"), day)
    assert (denied.allowed, denied.reason) == (False, Decision.MEMBER_LIMIT_EXCEEDED)
    assert_audit_clean(conn, q)


def test_membership_rules(conn: psycopg.Connection[Any], q: Queries) -> None:
    for a in ("org", "org2", "m1"):
        open_account(conn, q, a, "0")
    members.add_member(conn, q, org="org", member="m1", actor="tests")
    with pytest.raises(BillingError, match="cannot join"):
        members.add_member(conn, q, org="org2", member="m1", actor="tests")
    with pytest.raises(BillingError, match="cannot join"):
        members.add_member(conn, q, org="m1", member="org2", actor="tests")
    with pytest.raises(BillingError, match="cannot join"):
        members.add_member(conn, q, org="org2", member="org", actor="tests")
    with pytest.raises(BillingError, match="own member"):
        members.add_member(conn, q, org="org", member="org", actor="tests")
    with pytest.raises(BillingError, match="no account"):
        members.add_member(conn, q, org="org", member="ghost", actor="tests")
    wallets.adjust(conn, q, "m1", D(1), reason="x", actor="tests")


def test_cli_members(settings: Settings, conn: psycopg.Connection[Any], q: Queries) -> None:
    import json

    from click.testing import CliRunner

    from billing.cli import main

    from .conftest import worker_env

    open_account(conn, q, "org", "1")
    open_account(conn, q, "m1", "0")
    cli = CliRunner(env=worker_env(settings))

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    run("members", "add", "org", "m1", "--limit", "2", "--period", "month")
    assert "cannot join" in run("members", "add", "m1", "org", code=2)
    assert "both an amount and a period" in run("members", "add", "org", "m1", "--limit", "2",
                                                code=2)  # fmt: skip
    listed = json.loads(run("members", "list", "--org", "org", "--json"))
    assert [(m["member_account_id"], m["limit_amount"], m["used"]) for m in listed] == [
        ("m1", "2.00", "0.00")
    ]
    run("members", "remove", "org", "m1")
    assert "not a member" in run("members", "remove", "org", "m1", code=2)


def test_the_usage_report_puts_a_members_paid_usage_where_the_statement_does(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """The report grouped usage by the event's account: the organisation's report showed no
    spend for what its wallet paid, and the member's showed spend its own wallet never paid."""
    from billing.exports.report import build_report

    open_account(conn, q, "org", "1")
    open_account(conn, q, "alice", "0.5")
    members.add_member(conn, q, org="org", member="alice", actor="tests")
    record(conn, q, "o1", "org")
    record(conn, q, "a1", "alice")
    record(conn, q, "a2", "alice", byok=True)
    period = Period.of(datetime.now(UTC))
    # org: o1 and alice's a1 (paid by org); alice: her BYOK event only (no money, her own)
    for account, events in (("org", 2), ("alice", 1)):
        report = build_report(settings, period, account)
        assert report.spend == statement_for(conn, q, account, period).usage_total
        assert report.daily["events"].sum() == report.latency["events"].sum() == events
    assert build_report(settings, period, "org").spend == 2 * D("0.0033")
    assert build_report(settings, period, "alice").spend == 0
    assert build_report(settings, period).spend == 2 * D("0.0033")  # fleet-wide: each once


def test_two_concurrent_adds_cannot_make_a_cycle(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """`members add b a` (uncommitted) and `members add a b` at once: without a lock neither saw
    the other's row, and a paid for b while b paid for a."""
    open_account(conn, q, "a", "10")
    open_account(conn, q, "b", "10")
    errors: list[BaseException] = []

    def second_operator() -> None:
        with db.connect(settings) as other:
            try:
                members.add_member(other, q, org="a", member="b", actor="op2")
            except BillingError as exc:
                errors.append(exc)

    with db.connect(settings) as first, first.transaction():
        members.add_member(first, q, org="b", member="a", actor="op1")
        thread = threading.Thread(target=second_operator)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the second add must wait for the first"
    thread.join(timeout=30)
    assert [str(e) for e in errors] == [
        "'b' cannot join 'a': it is an organisation or another's member, or 'a' is itself a member"
    ]
    assert conn.execute(
        "SELECT member_account_id, org_account_id FROM account_members"
    ).fetchall() == [("a", "b")]
