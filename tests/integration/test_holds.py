"""Holds on real PostgreSQL: concurrent authorizations, settlement, expiry, key limits."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from billing import db, holds, limits
from billing.audit import run_audit
from billing.db import Queries
from billing.holds import AuthorizationRequest, Authorizer, Decision, HoldStatus
from billing.settings import Settings
from billing.usage import price_events, record_isolating

from .helpers import assert_audit_clean, make_event, open_account

# openai/o4-mini on openai: $1.10 / 1M input, $4.40 / 1M output
WORST = Decimal("0.0055")  # 1000 input + 1000 max_tokens
NOW = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)


def request(account: str = "acme", key: str = "key-1", **kw: Any) -> AuthorizationRequest:
    fields: dict[str, Any] = {
        "account_id": account,
        "api_key_id": key,
        "model": "openai/o4-mini",
        "provider": "openai",
        "input_tokens": 1000,
        "max_tokens": 1000,
    }
    fields.update(kw)
    return AuthorizationRequest(**fields)


def record(
    conn: psycopg.Connection[Any],
    q: Queries,
    event_id: str,
    hold_id: str | None,
    account: str = "acme",
    key: str = "key-1",
    occurred_at: datetime | None = None,
    byok: bool = False,
    **usage: int,
) -> None:
    event = make_event(event_id, account, occurred_at=occurred_at, byok=byok, **usage)
    event = type(event)(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                           "hold_id": hold_id, "api_key_id": key})  # fmt: skip
    from billing.catalog import snapshot

    priced, rejected = price_events([event], snapshot(conn, q))
    assert not rejected
    record_isolating(conn, q, priced, [])


def hold_row(conn: psycopg.Connection[Any], q: Queries, hold_id: str) -> dict[str, Any]:
    rows = db.fetch_dicts(conn, q["hold_by_id"], {"hold_id": hold_id})
    assert rows
    return rows[0]


@pytest.fixture
def authorizer(q: Queries, settings: Settings) -> Authorizer:
    return Authorizer(q, settings.hold_ttl)


def test_worst_case_is_input_plus_max_tokens_at_catalog_prices(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", "1")
    a = authorizer.authorize(conn, request(), NOW)
    assert (a.allowed, a.reason, a.amount) == (True, Decision.HELD, WORST)
    assert a.available == Decimal(1) - WORST
    assert a.expires_at == NOW + timedelta(minutes=15)


def test_200_concurrent_authorizations_against_a_wallet_affording_50_allow_exactly_50(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", WORST * 50 + WORST / 2)
    pool = db.make_pool(settings, min_size=32, max_size=32)
    authorizer = Authorizer(q, settings.hold_ttl)
    with pool.connection() as c:
        authorizer.catalog(c)  # loaded once, before the burst
    start = threading.Barrier(200)
    results: list[bool] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            start.wait()
            with pool.connection() as c:
                a = authorizer.authorize(c, request(hold_id=f"h-{i}"), NOW)
            results.append(a.allowed)
            if not a.allowed:
                assert a.reason is Decision.INSUFFICIENT_CREDITS
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert not errors, errors[:3]
    assert len(results) == 200
    assert results.count(True) == 50
    avail = holds.availability(conn, q, "acme", NOW)
    assert avail.held == WORST * 50
    assert avail.available == WORST / 2
    assert_audit_clean(conn, q)


def test_settle_smaller_and_larger_actual_cost(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", "1")
    small = authorizer.authorize(conn, request(hold_id="small"), NOW)
    large = authorizer.authorize(conn, request(hold_id="large"), NOW)
    assert holds.availability(conn, q, "acme", NOW).held == 2 * WORST
    # smaller: 1000 in, 200 out = 0.0011 + 0.00088
    record(conn, q, "e-small", "small", input_tokens=1000, output_tokens=200)
    # larger (the gateway overran max_tokens): the real cost is debited anyway
    record(conn, q, "e-large", "large", input_tokens=1000, output_tokens=3000)
    s, big = hold_row(conn, q, "small"), hold_row(conn, q, "large")
    assert (s["status"], s["settled_amount"], s["settled_event_id"]) == (
        "settled", Decimal("0.00198"), "e-small")  # fmt: skip
    assert (big["status"], big["settled_amount"]) == ("settled", Decimal("0.0143"))
    avail = holds.availability(conn, q, "acme", NOW)
    assert avail.held == 0
    assert avail.balance == Decimal(1) - Decimal("0.00198") - Decimal("0.0143")
    assert small.hold_id == "small" and large.hold_id == "large"
    # a redelivered event settles nothing twice and debits nothing twice
    record(conn, q, "e-small", "small", input_tokens=1000, output_tokens=200)
    assert holds.availability(conn, q, "acme", NOW).balance == avail.balance
    assert_audit_clean(conn, q)


def test_expired_holds_release(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", WORST * 2)
    assert authorizer.authorize(conn, request(hold_id="a"), NOW).allowed
    assert authorizer.authorize(conn, request(hold_id="b"), NOW).allowed
    assert not authorizer.authorize(conn, request(hold_id="c"), NOW).allowed
    later = NOW + timedelta(minutes=15)
    # at expires_at the reservation stops counting, before any task runs
    assert holds.availability(conn, q, "acme", later).available == WORST * 2
    assert holds.expire_holds(conn, q, NOW + timedelta(minutes=14)) == 0
    assert holds.expire_holds(conn, q, later) == 2
    assert holds.expire_holds(conn, q, later) == 0
    assert hold_row(conn, q, "a")["status"] == HoldStatus.EXPIRED
    assert authorizer.authorize(conn, request(hold_id="c"), later).allowed
    # usage arriving after its hold expired is still billed, and settles it
    record(conn, q, "late", "a")
    assert hold_row(conn, q, "a")["status"] == HoldStatus.SETTLED
    assert_audit_clean(conn, q)


def test_release_and_retry_and_byok_and_frozen(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", WORST)
    first = authorizer.authorize(conn, request(hold_id="r1"), NOW)
    again = authorizer.authorize(conn, request(hold_id="r1"), NOW)  # a retried call
    assert (again.allowed, again.reason, again.amount) == (True, Decision.EXISTING, first.amount)
    assert not authorizer.authorize(conn, request(hold_id="r2"), NOW).allowed
    assert holds.release(conn, q, "r1", NOW, "not dispatched") == WORST
    with pytest.raises(Exception, match="released, not active"):
        holds.release(conn, q, "r1", NOW, "again")
    assert authorizer.authorize(conn, request(hold_id="r2"), NOW).allowed
    # r1 is released and r2 holds the whole balance: r1 again reserves nothing, so it is refused
    closed = authorizer.authorize(conn, request(hold_id="r1"), NOW)
    assert (closed.allowed, closed.reason) == (False, Decision.HOLD_CLOSED)
    expired = authorizer.authorize(conn, request(hold_id="r2"), NOW + timedelta(hours=1))
    assert (expired.allowed, expired.reason) == (False, Decision.HOLD_CLOSED)
    byok = authorizer.authorize(conn, request(hold_id="r3", byok=True), NOW)
    assert (byok.allowed, byok.reason, byok.hold_id) == (True, Decision.BYOK, None)
    conn.execute("UPDATE wallets SET frozen = true WHERE account_id = 'acme'")
    assert authorizer.authorize(conn, request(hold_id="r4", max_tokens=1), NOW).reason is (
        Decision.WALLET_FROZEN
    )
    assert authorizer.authorize(conn, request("nobody"), NOW).reason is Decision.UNKNOWN_ACCOUNT
    # BYOK takes no hold, but not for an account that does not exist or a frozen wallet
    assert authorizer.authorize(conn, request(byok=True), NOW).reason is Decision.WALLET_FROZEN
    nobody = authorizer.authorize(conn, request("nobody", byok=True), NOW)
    assert nobody.reason is Decision.UNKNOWN_ACCOUNT


def test_concurrent_first_calls_with_one_hold_id_make_one_hold(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Guards the hold_id re-read under the wallet lock (billing_authorize)."""
    open_account(conn, q, "acme", WORST * 10)
    pool = db.make_pool(settings, min_size=8, max_size=8)
    authorizer = Authorizer(q, settings.hold_ttl)
    start = threading.Barrier(8)
    results: list[Any] = []

    def one() -> None:
        start.wait()
        try:
            with pool.connection() as c:
                results.append(authorizer.authorize(c, request(hold_id="same"), NOW).reason)
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert sorted(map(str, results)) == sorted(["held"] + ["existing"] * 7), results
    assert holds.availability(conn, q, "acme", NOW).held == WORST
    assert_audit_clean(conn, q)


def test_no_max_tokens_uses_the_model_ceiling(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", "1")
    a = authorizer.authorize(conn, request(max_tokens=None), NOW)
    assert (a.allowed, a.reason) == (False, Decision.NO_CEILING)
    holds.set_ceiling(conn, q, "openai/o4-mini", Decimal("0.25"), "tests")
    a = authorizer.authorize(conn, request(max_tokens=None), NOW)
    assert (a.allowed, a.amount) == (True, Decimal("0.0011") + Decimal("0.25"))


def test_balance_never_below_zero_through_holds(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Many threads authorize, record usage within the hold and authorize again, racing the
    debits of the batches: the balance never goes below zero and every hold ends settled."""
    open_account(conn, q, "acme", "0.1")
    pool = db.make_pool(settings, min_size=8, max_size=8)
    authorizer = Authorizer(q, settings.hold_ttl)
    lowest: list[Decimal] = []
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(15):
                with pool.connection() as c:
                    a = authorizer.authorize(c, request(hold_id=f"w{w}-{i}"), NOW)
                    if not a.allowed:
                        continue
                    record(c, q, f"ev-{w}-{i}", a.hold_id, input_tokens=1000,
                           output_tokens=(w * 97 + i * 31) % 1001)  # fmt: skip
                    lowest.append(holds.availability(c, q, "acme", NOW).balance)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert not errors, errors[:3]
    assert lowest and min(lowest) >= 0
    assert holds.availability(conn, q, "acme", NOW).held == 0
    n_active = conn.execute("SELECT count(*) FROM holds WHERE status <> 'settled'").fetchone()
    assert n_active == (0,)
    assert_audit_clean(conn, q)


def test_key_limit_resets_at_the_period_boundary(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", "100")
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=WORST * 2,
                     period=limits.Period.DAY, time_zone="Europe/Paris", actor="tests")  # fmt: skip
    # NOW is 2026-03-31 23:00 UTC = 2026-04-01 01:00 in Paris: the Paris day began at 22:00 UTC
    day_start = datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    a1 = authorizer.authorize(conn, request(hold_id="k1"), NOW)
    record(conn, q, "k-e1", "k1", occurred_at=NOW)  # 1000 in / 500 out = 0.0033
    assert authorizer.authorize(conn, request(hold_id="k2"), NOW).allowed
    a3 = authorizer.authorize(conn, request(hold_id="k3"), NOW)
    assert a1.allowed and (a3.allowed, a3.reason) == (False, Decision.KEY_LIMIT_EXCEEDED)
    # other keys of the account are not limited
    assert authorizer.authorize(conn, request(key="key-2", hold_id="o1"), NOW).allowed
    shown = limits.show_limits(conn, q, NOW, api_key_id="key-1")[0]
    assert shown.period_start == day_start
    assert shown.period_end == day_start + timedelta(days=1)
    assert shown.used == Decimal("0.0033") + WORST
    record(conn, q, "k-e2", "k2", occurred_at=NOW)
    assert limits.show_limits(conn, q, NOW, api_key_id="key-1")[0].used == Decimal("0.0066")
    # one microsecond before midnight in Paris: still the same day
    just_before = day_start + timedelta(days=1) - timedelta(microseconds=1)
    assert not authorizer.authorize(conn, request(hold_id="k4"), just_before).allowed
    # midnight in Paris: a new day, the limit is whole again
    boundary = day_start + timedelta(days=1)
    a5 = authorizer.authorize(conn, request(hold_id="k5"), boundary)
    assert (a5.allowed, a5.key_remaining) == (True, WORST)
    assert_audit_clean(conn, q)


def test_usage_without_a_hold_counts_toward_the_key_limit_and_the_audit_checks_it(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    """Guards the key spend of every recorded event (not only of settled holds)."""
    open_account(conn, q, "acme", "100")
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=WORST * 2,
                     period=limits.Period.DAY, time_zone="UTC", actor="tests")  # fmt: skip
    conn.execute("UPDATE key_limits SET updated_at = '2000-01-01'")  # set long ago: audit it all
    now = datetime.now(UTC)
    record(conn, q, "nh-1", None, occurred_at=now)  # no hold: 1000 in / 500 out = 0.0033
    record(conn, q, "nh-2", None, occurred_at=now)
    record(conn, q, "nh-3", None, key="key-2", occurred_at=now)  # another key: not limited
    assert limits.show_limits(conn, q, now, api_key_id="key-1")[0].used == Decimal("0.0066")
    denied = authorizer.authorize(conn, request(hold_id="after"), now)
    assert (denied.allowed, denied.reason) == (False, Decision.KEY_LIMIT_EXCEEDED)
    assert_audit_clean(conn, q)
    conn.execute("UPDATE key_spend SET spent = spent - 0.0033")  # an undercount
    failed = [c.name for c in run_audit(conn, q).checks if not c.ok]
    assert failed == ["each limited key's period spend equals the cost of its events"]


def test_a_limit_set_mid_period_or_moved_to_another_zone_counts_what_the_key_spent(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    """The key's spend was only added to while a limit existed, and kept per period start of the
    limit's zone: a limit set mid-month started from 0, and one moved to another zone too."""
    open_account(conn, q, "acme", "100")
    at = datetime(2026, 3, 15, 12, tzinfo=UTC)
    for i in range(3):
        record(conn, q, f"before-{i}", None, occurred_at=at)  # 3 x 0.0033 = 0.0099, no limit yet
    record(conn, q, "other-key", None, key="key-2", occurred_at=at)
    record(conn, q, "february", None, occurred_at=datetime(2026, 2, 27, tzinfo=UTC))
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=Decimal("0.01"),
                     period=limits.Period.MONTH, actor="tests", now=at)  # fmt: skip
    assert limits.show_limits(conn, q, at, api_key_id="key-1")[0].used == Decimal("0.0099")
    denied = authorizer.authorize(conn, request(hold_id="h1"), at)
    assert (denied.allowed, denied.reason) == (False, Decision.KEY_LIMIT_EXCEEDED)
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=Decimal("0.01"),
                     period=limits.Period.MONTH, time_zone="Europe/Paris", actor="tests",
                     now=at)  # fmt: skip
    assert limits.show_limits(conn, q, at, api_key_id="key-1")[0].used == Decimal("0.0099")
    denied = authorizer.authorize(conn, request(hold_id="h2"), at)
    assert (denied.allowed, denied.reason) == (False, Decision.KEY_LIMIT_EXCEEDED)
    record(conn, q, "after", None, occurred_at=at)  # counted on top by the batch, as before
    assert limits.show_limits(conn, q, at, api_key_id="key-1")[0].used == Decimal("0.0132")


def test_changing_only_a_limits_amount_keeps_its_period_zone_and_byok_rule(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """`billing limits set ACCOUNT KEY 20` used to reset the period to month, the zone to UTC and
    BYOK counting to off, silently, whenever an operator changed only the amount."""
    open_account(conn, q, "acme", "100")
    new = limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=Decimal("5"),
                           actor="tests")  # fmt: skip
    assert new == limits.KeyLimitRule(limits.Period.MONTH, "UTC", False)
    set_ = limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=Decimal("5"),
                            period=limits.Period.DAY, time_zone="Europe/Paris", count_byok=True,
                            actor="tests")  # fmt: skip
    assert set_ == limits.KeyLimitRule(limits.Period.DAY, "Europe/Paris", True)
    kept = limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=Decimal("20"),
                            actor="tests")  # fmt: skip
    assert kept == set_
    shown = limits.show_limits(conn, q, datetime.now(UTC), api_key_id="key-1")[0]
    assert (shown.amount, shown.period, shown.time_zone) == (
        Decimal("20"),
        limits.Period.DAY,
        "Europe/Paris",
    )


def test_key_limit_counts_byok_only_when_asked(
    conn: psycopg.Connection[Any], q: Queries, authorizer: Authorizer
) -> None:
    open_account(conn, q, "acme", "0")  # an empty wallet: BYOK still runs
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=WORST,
                     period=limits.Period.MONTH, actor="tests")  # fmt: skip
    for i in range(3):
        a = authorizer.authorize(conn, request(hold_id=f"b{i}", byok=True), NOW)
        assert (a.allowed, a.reason) == (True, Decision.BYOK)
    limits.set_limit(conn, q, account_id="acme", api_key_id="key-1", amount=WORST,
                     period=limits.Period.MONTH, count_byok=True, actor="tests")  # fmt: skip
    a = authorizer.authorize(conn, request(hold_id="c1", byok=True), NOW)
    assert (a.allowed, a.reason) == (True, Decision.HELD)
    record(conn, q, "byok-1", "c1", byok=True, occurred_at=NOW)
    assert hold_row(conn, q, "c1")["settled_amount"] == Decimal("0.0033")
    a = authorizer.authorize(conn, request(hold_id="c2", byok=True), NOW)
    assert (a.allowed, a.reason) == (False, Decision.KEY_LIMIT_EXCEEDED)
    assert holds.availability(conn, q, "acme", NOW).balance == 0
    assert_audit_clean(conn, q)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_http_authorize_and_release(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    from dataclasses import replace

    from starlette.testclient import TestClient

    from billing.webhooks import create_app

    open_account(conn, q, "acme", WORST)
    s = replace(settings, authorize_token="t0ken")
    pool = db.make_pool(s, min_size=1, max_size=2)
    auth = {"Authorization": "Bearer t0ken"}
    body = {"account_id": "acme", "api_key_id": "k", "model": "openai/o4-mini",
            "provider": "openai", "input_tokens": 1000, "max_tokens": 1000}  # fmt: skip
    try:
        with TestClient(create_app(s, pool, lambda _id: None)) as client:
            assert client.post("/v1/authorize", json=body).status_code == 401
            ok = client.post("/v1/authorize", json=body, headers=auth)
            assert ok.status_code == 200, ok.text
            held = ok.json()
            assert (held["allowed"], held["reason"], held["amount"]) == (True, "held", "0.0055")
            denied = client.post("/v1/authorize", json=body, headers=auth)
            assert denied.status_code == 402
            assert denied.json()["reason"] == "insufficient_credits"
            bad = client.post("/v1/authorize", json={**body, "max_tokens": -1}, headers=auth)
            assert bad.status_code == 400 and bad.json()["field"] == "$.max_tokens"
            extra = client.post("/v1/authorize", json={**body, "prompt": "hi"}, headers=auth)
            assert extra.status_code == 400 and "prompt" in extra.json()["error"]
            unpriced = client.post("/v1/authorize", json={**body, "model": "x/y"}, headers=auth)
            assert unpriced.status_code == 400 and unpriced.json()["field"] == "$.model"
            # ids with a NUL or a control character: a 400 naming the field, never a 500
            for field, value in (("account_id", "a\u0000b"), ("hold_id", "h\n\x1b[31m")):
                weird = client.post("/v1/authorize", json={**body, field: value}, headers=auth)
                assert (weird.status_code, weird.json()["field"]) == (400, f"$.{field}")
            nul = client.post("/v1/holds/a%00b/release", headers=auth)
            assert (nul.status_code, nul.json()["field"]) == (400, "hold_id")
            rel = client.post(f"/v1/holds/{held['hold_id']}/release", headers=auth)
            assert rel.json() == {"released": held["hold_id"], "amount": "0.0055"}
            assert (
                client.post(f"/v1/holds/{held['hold_id']}/release", headers=auth).status_code == 409
            )
            again = client.post("/v1/authorize", json={**body, "hold_id": held["hold_id"]},
                                headers=auth)  # fmt: skip
            assert (again.status_code, again.json()["reason"]) == (409, "hold_closed")
            assert client.post("/v1/authorize", json=body, headers=auth).status_code == 200
    finally:
        pool.close()


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_without_a_token_only_loopback_callers_are_answered(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Guards authorize_http.permitted: a deployed service without a token refuses everyone."""
    from starlette.testclient import TestClient

    from billing.webhooks import create_app

    open_account(conn, q, "acme", WORST)
    assert settings.authorize_token == ""
    pool = db.make_pool(settings, min_size=1, max_size=2)
    body = {"account_id": "acme", "api_key_id": "k", "model": "openai/o4-mini",
            "provider": "openai", "input_tokens": 1000, "max_tokens": 1000}  # fmt: skip
    app = create_app(settings, pool, lambda _id: None)
    try:
        with TestClient(app, client=("203.0.113.9", 40000)) as remote:
            assert remote.post("/v1/authorize", json=body).status_code == 401
            assert remote.post("/v1/holds/h-1/release").status_code == 401
        with TestClient(app, client=("127.0.0.1", 40000)) as local:
            assert local.post("/v1/authorize", json=body).status_code == 200
            too_big = local.post("/v1/authorize", content=b"x" * 20_000)
            assert too_big.status_code == 413
    finally:
        pool.close()


def test_cli_holds_and_limits(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    from click.testing import CliRunner

    from billing.cli import main

    from .conftest import worker_env

    open_account(conn, q, "acme", "1")
    cli = CliRunner(env=worker_env(settings))

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    now = datetime.now(UTC)
    a = Authorizer(q, settings.hold_ttl).authorize(conn, request(hold_id="cli-1"), now)
    assert a.allowed
    listed = json.loads(run("holds", "list", "--account", "acme", "--json"))
    assert [(h["hold_id"], h["amount"], h["status"]) for h in listed] == [
        ("cli-1", "0.0055", "active")
    ]
    assert "held 0.0055  available 0.9945" in run("holds", "available", "acme")
    assert "released cli-1: 0.0055 USD" in run("holds", "release", "cli-1")
    assert "not active" in run("holds", "release", "cli-1", code=2)
    assert "0 holds expired" in run("holds", "expire")
    run("holds", "ceiling", "openai/o4-mini", "0.5")
    run("limits", "set", "acme", "key-1", "2.50", "--period", "week", "--time-zone", "Asia/Tokyo")
    assert "unknown time zone" in run(
        "limits", "set", "acme", "k", "1", "--time-zone", "Mars/X", code=2
    )
    shown = json.loads(
        run("limits", "show", "--key", "key-1", "--at", "2026-04-01T12:00:00Z", "--json")
    )
    assert shown == [
        {
            "api_key_id": "key-1",
            "account_id": "acme",
            "limit": "2.50",
            "period": "week",
            "time_zone": "Asia/Tokyo",
            "count_byok": False,
            "period_start": "2026-03-29T15:00:00+00:00",  # Monday 00:00 in Tokyo
            "period_end": "2026-04-05T15:00:00+00:00",
            "used": "0.00",
            "remaining": "2.50",
        }
    ]
    run("limits", "remove", "key-1")
    assert run("limits", "show", "--json").strip() == "[]"


@pytest.mark.slow
def test_quick_holds_benchmark_is_correct() -> None:
    """bench.holds --quick: timings mean nothing here; exactness and clean books are asserted."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import ADMIN_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_BENCH_DATABASE_URL": ADMIN_URL,
            "BILLING_BENCH_DB_PREFIX": f"billing_benchh_{os.getpid()}",
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "bench.holds", "--quick"],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "exactness: 10 of 40 allowed, wallet affords 10: ok" in run.stdout
    assert "audit: clean" in run.stdout


def test_the_usage_event_on_the_queue_settles_its_hold(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Wire to ledger: a usage.v1 message naming its hold, consumed by the real usage consumer
    from RabbitMQ, debits the wallet and settles the hold; the redelivery settles nothing."""
    from billing import broker

    from .helpers import drain

    open_account(conn, q, "acme", "1")
    a = Authorizer(q, settings.hold_ttl).authorize(conn, request(hold_id="wire-1"), NOW)
    assert a.allowed
    body = (
        b'{"schema": "usage.v1", "event_id": "req-wire-1", "occurred_at": "'
        + datetime.now(UTC).isoformat().encode()
        + b'", "account_id": "acme", "api_key_id": "key-1", "model": "openai/o4-mini",'
        b' "provider": "openai", "byok": false, "hold_id": "wire-1",'
        b' "usage": {"input_tokens": 1000, "output_tokens": 100}}'
    )
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_raw(body)
        publisher.publish_raw(body)
    drain(settings, idle=0.5)
    h = hold_row(conn, q, "wire-1")
    assert (h["status"], h["settled_event_id"], h["settled_amount"]) == (
        "settled", "req-wire-1", Decimal("0.00154"))  # fmt: skip
    assert holds.availability(conn, q, "acme", NOW).balance == Decimal(1) - Decimal("0.00154")
    assert_audit_clean(conn, q)
