"""Usage events through real RabbitMQ and PostgreSQL: priced exactly, debited exactly once."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
from kombu import Queue

from billing import broker, catalog, db, deadletters, wallets
from billing.audit import run_audit
from billing.db import Queries
from billing.events import Reason, Usage, decode_event, encode_event
from billing.settings import Settings
from billing.usage import decode_and_price, record_batch, record_isolating

from .helpers import assert_audit_clean, balances, drain, expected_debits, make_event, open_account


def publish(settings: Settings, *items: Any, envelope: int = 1) -> None:
    with broker.UsagePublisher(settings) as publisher:
        events = [i for i in items if not isinstance(i, bytes)]
        publisher.publish_many(events, envelope_size=envelope)
        for raw in (i for i in items if isinstance(i, bytes)):
            publisher.publish_raw(raw)


def event_row(conn: psycopg.Connection[Any], event_id: str) -> dict[str, Any]:
    return db.fetch_dicts(
        conn,
        "SELECT * FROM usage_events WHERE event_id = %s",  # type: ignore[arg-type]
        (event_id,),
    )[0]


def test_o4_mini_request_is_priced_to_the_exact_decimal(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    publish(
        settings,
        make_event(
            "req-o4",
            input_tokens=12_345,
            cached_input_tokens=4_096,
            output_tokens=2_048,
            reasoning_tokens=1_536,
            image_count=1,
        ),
    )
    drain(settings)
    row = event_row(conn, "req-o4")
    assert row["input_amount"] == Decimal("0.0135795")
    assert row["cached_input_amount"] == Decimal("0.0011264")
    assert row["output_amount"] == Decimal("0.0090112")
    assert row["image_amount"] == Decimal("0.000842")
    assert row["amount"] == row["debited"] == Decimal("0.0245591")
    assert balances(conn)["acme"] == Decimal("9.9754409")
    assert_audit_clean(conn, q)


def test_each_billable_class_on_each_provider(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    cases = [
        # (model, provider, usage, class column, expected amount)
        ("openai/o4-mini", "azure", {"input_tokens": 1_000_000}, "input_amount", "1.10"),
        (
            "openai/o4-mini",
            "azure",
            {"cached_input_tokens": 1_000_000},
            "cached_input_amount",
            "0.275",
        ),
        (
            "openai/o4-mini",
            "openai",
            {"output_tokens": 1_000_000, "reasoning_tokens": 999_999},
            "output_amount",
            "4.40",
        ),
        ("openai/o4-mini", "openai", {"image_count": 1_000}, "image_amount", "0.842"),
        (
            "anthropic/claude-sonnet-4-5",
            "anthropic",
            {"cache_write_tokens": 1_000_000},
            "cache_write_amount",
            "3.75",
        ),
        (
            "anthropic/claude-sonnet-4-5",
            "anthropic",
            {"web_search_count": 1_000},
            "web_search_amount",
            "10",
        ),
        ("perplexity/sonar", "perplexity", {"input_tokens": 1}, "request_amount", "0.005"),
    ]
    events = [
        make_event(f"cls-{i}", model=m, provider=p, **u) for i, (m, p, u, _, _) in enumerate(cases)
    ]
    publish(settings, *events)
    drain(settings)
    for i, (_, _, _, column, amount) in enumerate(cases):
        assert event_row(conn, f"cls-{i}")[column] == Decimal(amount), cases[i]
    assert_audit_clean(conn, q)


def test_same_event_published_three_times_debits_once(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    event = make_event("req-dup", input_tokens=1000, output_tokens=1000)
    publish(settings, event, event, event)
    drain(settings)
    publish(settings, event)  # and once more, in a later batch
    consumer = drain(settings)
    assert consumer.totals.duplicates == 1
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (1,)
    assert balances(conn)["acme"] == Decimal("10") - Decimal("0.0055")
    assert conn.execute(
        "SELECT count(*) FROM ledger_entries e JOIN wallets w USING (ledger_account_id) "
        "WHERE w.account_id = 'acme' AND e.amount < 0"
    ).fetchone() == (1,)
    assert_audit_clean(conn, q)


def test_a_resend_with_different_billed_content_is_parked_not_dropped(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    original = make_event("req-reused", input_tokens=1000, output_tokens=1000)  # $0.0055
    changed = msgspec.structs.replace(original, usage=Usage(input_tokens=1000, output_tokens=3000))
    other_key = msgspec.structs.replace(original, api_key_id="key-2")
    reported_only = msgspec.structs.replace(original, latency_ms=950, ttft_ms=80)
    publish(settings, original)
    drain(settings)
    # A later batch: two conflicting copies (one of them twice: one dead letter), and a copy that
    # differs only in reporting fields (the same event: a duplicate).
    publish(settings, changed, reported_only, other_key, changed)
    consumer = drain(settings)
    assert (consumer.totals.duplicates, consumer.totals.parked) == (1, 3)
    publish(settings, changed)  # redelivered later: the same dead letter
    assert drain(settings).totals.parked == 1
    letters = deadletters.list_dead_letters(conn, q, reason_code="conflicting_duplicate")
    assert sorted((r["field"], r["attempts"]) for r in letters) == [
        ("$.api_key_id", 1),
        ("$.usage.output_tokens", 2),
    ]
    assert all(r["event_id"] == "req-reused" and r["account_id"] == "acme" for r in letters)
    reason = next(r["reason"] for r in letters if r["field"] == "$.usage.output_tokens")
    assert "$.usage.output_tokens = 1000; this copy has 3000" in reason
    # The recorded copy stands, billed once.
    assert conn.execute("SELECT output_tokens FROM usage_events").fetchall() == [(1000,)]
    assert balances(conn)["acme"] == Decimal("10") - Decimal("0.0055")
    assert_audit_clean(conn, q)  # two letters for one recorded id: each a different content

    # Replay cannot make a conflict billable: it is parked again, nothing is debited.
    cache = catalog.CatalogCache(q)
    again = deadletters.replay(conn, q, cache, settings, datetime.now(UTC))
    assert (again.debited, again.duplicates, again.parked) == (0, 0, 2)
    assert len(deadletters.list_dead_letters(conn, q, reason_code="conflicting_duplicate")) == 2
    ids = [r["dead_letter_id"] for r in letters]
    assert deadletters.discard(conn, q, ids, reason="gateway bug #12", actor="ops") == ids
    assert deadletters.list_dead_letters(conn, q) == []
    assert balances(conn)["acme"] == Decimal("10") - Decimal("0.0055")
    assert_audit_clean(conn, q)


def test_a_resend_refused_on_its_own_under_a_recorded_id_is_a_conflicting_copy(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """A copy that fails a check its recorded copy passed (an account that does not exist, a model
    without a price) cannot be that event sent again: parked, not counted as a duplicate."""
    open_account(conn, q, "acme", "10")
    publish(settings, make_event("e-1"), make_event("e-2"))
    drain(settings)
    publish(
        settings, make_event("e-1", "acme-typo"), make_event("e-2", model="acme/not-in-catalog")
    )
    consumer = drain(settings)
    assert (consumer.totals.duplicates, consumer.totals.parked) == (0, 2)
    letters = deadletters.list_dead_letters(conn, q)
    assert sorted((r["event_id"], r["reason_code"], r["field"]) for r in letters) == [
        ("e-1", "conflicting_duplicate", "$.account_id"),
        ("e-2", "conflicting_duplicate", "$.model"),
    ]
    assert all("is already recorded" in r["reason"] for r in letters)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (2,)
    assert_audit_clean(conn, q)


def test_within_one_batch_the_first_copy_is_recorded_and_a_conflicting_one_parked(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    first = make_event("req-twice", input_tokens=1000, output_tokens=1000)
    byok = msgspec.structs.replace(first, byok=True)
    snap = catalog.snapshot(conn, q)
    bodies = [encode_event(e) for e in (first, first, byok)]
    priced, rejected = decode_and_price(bodies, snap, settings, datetime.now(UTC))
    with conn.transaction():
        result = record_batch(conn, q, priced, rejected)
    assert (result.debited, result.duplicates, result.parked) == (1, 1, 1)
    assert result.parked_reasons == {"conflicting_duplicate": 1}
    (letter,) = deadletters.list_dead_letters(conn, q)
    assert (letter["field"], letter["event_id"]) == ("$.byok", "req-twice")
    assert "$.byok = false; this copy has true" in letter["reason"]
    assert conn.execute("SELECT byok FROM usage_events").fetchall() == [(False,)]
    assert_audit_clean(conn, q)


def test_price_change_mid_stream_prices_late_events_at_the_old_version(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    now = datetime.now(UTC)
    change_at = (now + timedelta(seconds=60)).replace(microsecond=0)
    # (on Azure: the shipped catalog already has a later, 2026-12-01 version of o4-mini on OpenAI)
    new_price = f"""
[[version]]
model = "openai/o4-mini"
provider = "azure"
effective_from = {change_at.isoformat().replace("+00:00", "Z")}
source = "test: price cut"
[version.prices]
input_tokens = {{ usd = 0.55, per = 1_000_000 }}
output_tokens = {{ usd = 2.20, per = 1_000_000 }}
"""
    before = make_event(
        "before", provider="azure", occurred_at=now - timedelta(seconds=1), input_tokens=1_000_000
    )
    publish(settings, before)
    drain(settings)
    catalog.load_versions(conn, q, catalog.parse_catalog(new_price), now=now, loaded_by="tests")
    after = make_event(
        "after",
        provider="azure",
        occurred_at=change_at + timedelta(seconds=1),
        input_tokens=1_000_000,
    )
    late = make_event(
        "late",
        provider="azure",
        occurred_at=change_at - timedelta(seconds=1),
        input_tokens=1_000_000,
    )
    publish(settings, after, late)  # the late event arrives after the new price is loaded
    drain(settings)
    assert event_row(conn, "before")["input_amount"] == Decimal("1.10")
    assert event_row(conn, "late")["input_amount"] == Decimal("1.10")
    assert event_row(conn, "late")["price_effective_from"] < change_at
    assert event_row(conn, "after")["input_amount"] == Decimal("0.55")
    assert event_row(conn, "after")["price_effective_from"] == change_at


def test_history_is_never_rewritten(conn: psycopg.Connection[Any], q: Queries) -> None:
    from billing.errors import CatalogError

    versions = catalog.read_catalog_file(catalog.DEFAULT_CATALOG)
    o4 = next(v for v in versions if v.model == "openai/o4-mini")
    changed = catalog.PriceVersion(
        o4.model,
        o4.provider,
        o4.effective_from,
        {**o4.prices, catalog.BillableClass.INPUT: catalog.PriceComponent(Decimal("9"), 1_000_000)},
        "x",
    )
    with pytest.raises(CatalogError, match="never rewritten"):
        catalog.load_versions(conn, q, [changed], now=datetime.now(UTC), loaded_by="t")
    backdated = catalog.PriceVersion(
        o4.model, o4.provider, datetime(2026, 1, 1, tzinfo=UTC), o4.prices, "x"
    )
    with pytest.raises(CatalogError, match="in the past"):
        catalog.load_versions(conn, q, [backdated], now=datetime.now(UTC), loaded_by="t")
    # events are accepted up to 5 minutes ahead: one at now + 4 min may already be priced at
    # the version before, so a version starting at now + 2 min would rewrite its price
    now, skew = datetime.now(UTC), timedelta(minutes=5)
    soon, later = (catalog.PriceVersion(o4.model, o4.provider, now + timedelta(minutes=m),
                                        o4.prices, "x") for m in (2, 6))  # fmt: skip
    with pytest.raises(CatalogError, match="in the past"):
        catalog.load_versions(conn, q, [soon], now=now, loaded_by="t", max_clock_skew=skew)
    added = catalog.load_versions(conn, q, [later], now=now, loaded_by="t", max_clock_skew=skew)
    assert added.added == [later]


def test_byok_is_priced_and_recorded_but_debits_nothing(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    publish(settings, make_event("byok-1", byok=True, input_tokens=1_000_000))
    drain(settings)
    row = event_row(conn, "byok-1")
    assert row["amount"] == Decimal("1.10") and row["debited"] == 0 and row["posting_id"] is None
    assert balances(conn)["acme"] == Decimal("10")
    view = wallets.show(conn, q, "acme")
    assert view.byok_notional == Decimal("1.10") and view.debited == 0
    assert_audit_clean(conn, q)


def test_envelope_with_a_bad_event_bills_the_others(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    good = [make_event(f"env-{i}") for i in range(5)]
    body = json.dumps(
        {
            "schema": "usage.batch.v1",
            "events": [
                json.loads(encode_event(good[0])),
                json.loads(encode_event(good[1])),
                {**json.loads(encode_event(make_event("env-bad"))), "usage": {"output_tokens": -1}},
                *[json.loads(encode_event(e)) for e in good[2:]],
            ],
        }
    ).encode()
    publish(settings, body)
    drain(settings)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (5,)
    [parked] = deadletters.list_dead_letters(conn, q)
    assert (parked["event_id"], parked["field"]) == ("env-bad", "$.events[2].usage.output_tokens")


BAD = {
    "malformed": (b'{"schema": "usage.v1", "event_id": "x", ', Reason.MALFORMED_JSON, "$"),
    "negative": ({"usage": {"input_tokens": -3}}, Reason.INVALID_EVENT, "$.usage.input_tokens"),
    "reasoning": (
        {"usage": {"output_tokens": 1, "reasoning_tokens": 2}},
        Reason.INVALID_EVENT,
        "$.usage.reasoning_tokens",
    ),
    "schema": ({"schema": "usage.v7"}, Reason.UNKNOWN_SCHEMA, "$.schema"),
    "future": ({"occurred_at": "2099-01-01T00:00:00Z"}, Reason.FUTURE_TIMESTAMP, "$.occurred_at"),
    "content": (
        {"messages": [{"role": "user", "content": "hi"}]},
        Reason.INVALID_EVENT,
        "$.messages",
    ),
    "account": ({"account_id": "ghost"}, Reason.UNKNOWN_ACCOUNT, "$.account_id"),
    "model": ({"model": "acme/new-model"}, Reason.UNPRICED, "$.model"),
    "provider": ({"provider": "bedrock"}, Reason.UNPRICED, "$.model"),
    "class": ({"usage": {"web_search_count": 1}}, Reason.UNPRICED, "$.usage.web_search_count"),
}


def test_each_bad_input_is_parked_with_its_reason_then_replayed_after_a_fix(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    messages: list[Any] = []
    for name, (change, _, _) in BAD.items():
        if isinstance(change, bytes):
            messages.append(change)
        else:
            base = json.loads(encode_event(make_event(f"bad-{name}")))
            messages.append(json.dumps({**base, **change}).encode())
    publish(settings, make_event("good"), *messages)
    consumer = drain(settings)
    assert consumer.totals.debited == 1 and consumer.totals.parked == len(BAD)
    parked = {r["event_id"] or "bad-malformed": r for r in deadletters.list_dead_letters(conn, q)}
    for name, (_, code, field) in BAD.items():
        row = parked[f"bad-{name}"] if name != "malformed" else parked["bad-malformed"]
        assert (row["reason_code"], row["field"]) == (code.value, field), name
    stored = conn.execute("SELECT payload FROM dead_letters WHERE event_id = 'bad-content'")
    assert b"hi" not in bytes(stored.fetchone()[0])  # type: ignore[index]

    # Redelivery of a parked message does not pile up rows.
    publish(settings, messages[list(BAD).index("account")])
    drain(settings)
    assert conn.execute(
        "SELECT attempts FROM dead_letters WHERE event_id = 'bad-account'"
    ).fetchone() == (2,)

    # Fix: create the account, load the missing prices; replay.
    open_account(conn, q, "ghost", "5")
    catalog.load_versions(
        conn,
        q,
        catalog.parse_catalog("""
[[version]]
model = "acme/new-model"
provider = "openai"
effective_from = 2020-01-01T00:00:00Z
source = "test"
[version.prices]
input_tokens = { usd = 1, per = 1_000_000 }
output_tokens = { usd = 2, per = 1_000_000 }
"""),
        now=datetime.now(UTC),
        loaded_by="tests",
    )
    cache = catalog.CatalogCache(q)
    result = deadletters.replay(conn, q, cache, settings, datetime.now(UTC))
    assert result.debited == 2  # unknown account and unknown model are now billable
    remaining = {r["event_id"] for r in deadletters.list_dead_letters(conn, q)}
    assert remaining == {
        None,
        "bad-negative",
        "bad-reasoning",
        "bad-schema",
        "bad-future",
        "bad-content",
        "bad-provider",
        "bad-class",
    }
    # Replaying again is exactly-once: nothing more is debited.
    again = deadletters.replay(conn, q, cache, settings, datetime.now(UTC))
    assert again.debited == 0
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (3,)
    # The same event redelivered from the queue later is a duplicate too.
    publish(settings, messages[list(BAD).index("account")])
    assert drain(settings).totals.duplicates == 1
    resolved = deadletters.list_dead_letters(conn, q, status="resolved")
    assert {r["event_id"] for r in resolved} == {"bad-account", "bad-model"}
    # What cannot be fixed is discarded with a reason.
    ids = [r["dead_letter_id"] for r in deadletters.list_dead_letters(conn, q)]
    assert len(deadletters.discard(conn, q, ids, reason="sender fixed", actor="tests")) == len(ids)
    assert deadletters.list_dead_letters(conn, q) == []
    assert_audit_clean(conn, q)


def _wallet_events(settings: Settings) -> tuple[Any, Queue]:
    conn = broker.connect(settings)
    queue = Queue(
        f"{settings.wallet_events_exchange}.probe",
        exchange=broker.wallet_events_exchange(settings),
        routing_key="wallet.#",
        auto_delete=False,
        durable=False,
    )
    queue(conn.channel()).declare()
    return conn, queue


def _received(conn: Any, queue: Queue) -> list[dict[str, Any]]:
    out = []
    bound = queue(conn.channel())
    while (message := bound.get(no_ack=True)) is not None:
        out.append(json.loads(message.body))
    return out


def test_wallet_exhausted_is_published_once_per_crossing(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    bconn, probe = _wallet_events(settings)
    try:
        open_account(conn, q, "acme", "0.01")  # replenished (0 -> 0.01)
        wallets.relay_outbox(conn, q, broker.WalletEventPublisher(settings, bconn))
        # each event costs 0.0055: the second crosses zero, the rest stay below
        for i in range(6):
            publish(settings, make_event(f"x-{i}", input_tokens=1000, output_tokens=1000))
            drain(settings, idle=0.3)
        wallets.adjust(conn, q, "acme", Decimal("1"), reason="top-up", actor="tests")
        wallets.relay_outbox(conn, q, broker.WalletEventPublisher(settings, bconn))
        publish(
            settings,
            *[make_event(f"y-{i}", input_tokens=100_000, output_tokens=200_000) for i in range(3)],
        )
        drain(settings)
        received = _received(bconn, probe)
    finally:
        probe(bconn.channel()).delete()
        bconn.release()
    assert [(m["type"], m["account_id"]) for m in received] == [
        ("wallet.replenished", "acme"),
        ("wallet.exhausted", "acme"),
        ("wallet.replenished", "acme"),
        ("wallet.exhausted", "acme"),
    ]
    assert Decimal(received[1]["balance"]) < 0
    assert len({m["outbox_id"] for m in received}) == 4
    assert conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone() == (0,)


def test_concurrent_relays_publish_a_wallets_crossings_in_order(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Relay A holds the wallet.exhausted row while its publish waits for the broker; a top-up
    commits wallet.replenished meanwhile, and relay B (a worker's, beside the beat's) must not
    publish it first: the gateway keeps the last state it heard."""
    open_account(conn, q, "acme", "10")
    wallets.relay_outbox(conn, q, lambda *a: None)
    wallets.adjust(conn, q, "acme", Decimal("-20"), reason="usage", actor="t")  # exhausted
    published: list[dict[str, Any]] = []
    a_claimed, release_a = threading.Event(), threading.Event()

    def slow_publish(routing_key: str, body: bytes, message_id: str) -> None:
        a_claimed.set()
        release_a.wait(10)
        published.append(json.loads(body))

    def relay_a() -> None:
        with db.connect(settings) as c:
            wallets.relay_outbox(c, q, slow_publish)

    thread = threading.Thread(target=relay_a)
    thread.start()
    assert a_claimed.wait(10)
    wallets.adjust(conn, q, "acme", Decimal("30"), reason="top-up", actor="t")  # replenished

    def relay_b() -> None:
        with db.connect(settings) as c:
            wallets.relay_outbox(c, q, lambda rk, body, mid: published.append(json.loads(body)))

    other = threading.Thread(target=relay_b)
    other.start()
    other.join(0.5)
    assert other.is_alive(), "relay B must wait for the row relay A holds"
    release_a.set()
    thread.join(10)
    other.join(10)
    assert [p["type"] for p in published] == ["wallet.exhausted", "wallet.replenished"]
    assert published[-1]["state"] == "active"


def test_a_row_the_database_refuses_is_parked_and_the_rest_of_the_batch_goes_on(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    conn.execute("""
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.event_id = 'poison' THEN RAISE EXCEPTION 'poison' USING ERRCODE = '22000';
              END IF; RETURN NEW; END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON usage_events
            FOR EACH ROW EXECUTE FUNCTION refuse_poison();""")
    events = [make_event(f"ok-{i}") for i in range(7)]
    events.insert(3, make_event("poison"))
    bodies = [encode_event(e) for e in events]
    priced, rejected = decode_and_price(
        bodies, catalog.snapshot(conn, q), settings, datetime.now(UTC)
    )
    result = record_isolating(conn, q, priced, rejected)
    assert (result.debited, result.parked) == (7, 1)
    [row] = deadletters.list_dead_letters(conn, q)
    assert (row["event_id"], row["reason_code"]) == ("poison", "database_rejected")
    assert_audit_clean(conn, q)


def test_parallel_batches_with_overlapping_events_never_deadlock_or_double_debit(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    accounts = [f"acct-{i}" for i in range(8)]
    for a in accounts:
        open_account(conn, q, a, "100")
    events = [make_event(f"ov-{i}", accounts[i % 8]) for i in range(400)]
    snap = catalog.snapshot(conn, q)
    now = datetime.now(UTC)
    errors: list[BaseException] = []

    def worker(order: list[Any]) -> None:
        try:
            with db.connect(settings) as c:
                for start in range(0, len(order), 50):
                    chunk = [encode_event(e) for e in order[start : start + 50]]
                    priced, rejected = decode_and_price(chunk, snap, settings, now)
                    record_isolating(c, q, priced, rejected)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(list(events),)),
        threading.Thread(target=worker, args=(list(reversed(events)),)),
        threading.Thread(target=worker, args=(events[::2] + events[1::2],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (400,)
    expected = expected_debits(conn, q, events)
    assert {a: Decimal(100) - b for a, b in balances(conn).items()} == expected
    assert_audit_clean(conn, q)


def test_an_event_committed_by_another_worker_during_the_copy_is_not_debited_twice(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Guards the key claim as the exactly-once step between two workers holding one event.

    Worker A records ``race`` and holds its transaction open; worker B's claim of the same key
    waits on A's uncommitted key, A commits, B's claim skips it and B records only ``other``.
    """
    open_account(conn, q, "acme", "10")
    snap = catalog.snapshot(conn, q)
    now = datetime.now(UTC)
    race = make_event("race", input_tokens=1_000_000)  # $1.10 at o4-mini's input rate
    first, _ = decode_and_price([encode_event(race)], snap, settings, now)
    second, _ = decode_and_price(
        [encode_event(race), encode_event(make_event("other", input_tokens=1_000_000))],
        snap,
        settings,
        now,
    )
    results: list[Any] = []
    with db.connect(settings) as a, db.connect(settings) as b:
        b_pid = b.info.backend_pid
        with a.transaction():
            record_batch(a, q, first, [])
            thread = threading.Thread(
                target=lambda: results.append(record_isolating(b, q, second, []))
            )
            thread.start()
            for _ in range(200):  # until B waits on A's key
                row = conn.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (b_pid,)
                ).fetchone()
                if row == ("Lock",):
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("worker B never waited on worker A's row")
        thread.join(timeout=10)
    [result] = results
    assert (result.debited, result.duplicates) == (1, 1)
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (2,)
    assert balances(conn)["acme"] == Decimal("7.80")  # 10 - 2 x 1.10: each event once
    assert_audit_clean(conn, q)


def test_audit_catches_a_tampered_balance(conn: psycopg.Connection[Any], q: Queries) -> None:
    open_account(conn, q, "acme", "10")
    conn.execute("UPDATE wallets SET balance = 11 WHERE account_id = 'acme'")
    report = run_audit(conn, q)
    assert not report.ok
    [failed] = [c for c in report.checks if not c.ok]
    assert failed.name == "wallet balance equals its ledger sum"
    assert failed.violations[0]["account_id"] == "acme"


def test_identifiers_with_backslashes_survive_the_copy(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme\\eu", "10")
    publish(settings, make_event("req\\1", "acme\\eu", input_tokens=1_000_000))
    drain(settings)
    assert event_row(conn, "req\\1")["account_id"] == "acme\\eu"
    assert balances(conn)["acme\\eu"] == Decimal("8.90")
    assert_audit_clean(conn, q)


def test_decoded_event_round_trips(settings: Settings) -> None:
    event = make_event("rt", input_tokens=5, output_tokens=3, reasoning_tokens=2)
    assert decode_event(encode_event(event), datetime.now(UTC), timedelta(minutes=5)) == event


def test_poison_messages_are_parked_and_the_events_beside_them_are_billed(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Two messages that stopped billing: one nested past the decoder's recursion limit (its
    RecursionError, and orjson's TypeError storing one 300 deep, killed the consumer thread on
    every redelivery) and an envelope item whose account_id holds a NUL (PostgreSQL's text
    refused the dead letter, so the whole batch was requeued forever, good events with it)."""
    open_account(conn, q, "acme", "10")
    good = [make_event(f"good-{i}") for i in range(4)]
    prefix = json.dumps(json.loads(encode_event(make_event("deep"))))[:-1]
    deep = f'{prefix},"provider_usage_format":"openai.chat","provider_usage":{{"x":'
    nested = [deep + '{"a":' * n + "1" + "}" * n + "}}" for n in (300, 5_000)]
    nul = {**json.loads(encode_event(make_event("nul"))), "account_id": "ac\u0000me"}
    envelope = {"schema": "usage.batch.v1", "events": [json.loads(encode_event(good[3])), nul]}
    publish(
        settings, good[0], nested[0].encode(), good[1], nested[1].encode(), good[2],
        json.dumps(envelope).encode(),
    )  # fmt: skip
    drain(settings)
    recorded = {r[0] for r in conn.execute("SELECT event_id FROM usage_events")}
    assert recorded == {e.event_id for e in good}
    parked = {
        (r["event_id"], r["account_id"], r["reason_code"])
        for r in deadletters.list_dead_letters(conn, q)
    }
    assert parked == {
        ("deep", "acme", "invalid_event"),  # 300 levels: decoded, refused by the schema
        (None, None, "malformed_json"),  # 5,000 levels: refused like malformed JSON
        ("nul", "ac\\u0000me", "invalid_event"),
    }
    assert balances(conn)["acme"] == Decimal(10) - expected_debits(conn, q, good)["acme"]
    assert_audit_clean(conn, q)


def test_replaying_a_redacted_event_without_an_id_keeps_its_one_dead_letter(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """The stored payload is redacted; replay redacted it again, which named the list of
    dropped fields as a dropped field and, the bytes being new, parked a second row."""
    open_account(conn, q, "acme", "10")
    body = {**json.loads(encode_event(make_event("x"))), "prompt": "a secret"}
    del body["event_id"]
    publish(settings, json.dumps(body).encode())
    drain(settings)
    [before] = deadletters.list_dead_letters(conn, q)
    for _ in range(2):
        deadletters.replay(conn, q, catalog.CatalogCache(q), settings, datetime.now(UTC))
    [after] = deadletters.list_dead_letters(conn, q)
    assert after["dead_letter_id"] == before["dead_letter_id"]
    [(payload,)] = conn.execute("SELECT payload FROM dead_letters").fetchall()
    stored = json.loads(bytes(payload))
    assert stored["_redacted_fields"] == ["prompt"] and "secret" not in json.dumps(stored)


def test_a_dead_letter_the_database_refuses_is_parked_bare_and_the_batch_goes_on(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Were a dead letter itself refused (a NUL was one such case), the batch was retried and
    refused for ever, its good events with it. It is parked bare instead: reason code, payload."""
    open_account(conn, q, "acme", "10")
    conn.execute("""
        CREATE FUNCTION refuse_letter() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.event_id = 'refused' THEN RAISE EXCEPTION 'no' USING ERRCODE = '22000';
              END IF; RETURN NEW; END $$;
        CREATE TRIGGER refuse_letter BEFORE INSERT ON dead_letters
            FOR EACH ROW EXECUTE FUNCTION refuse_letter();""")
    good = [make_event(f"ok-{i}") for i in range(3)]
    bad = {**json.loads(encode_event(make_event("refused"))), "usage": {"input_tokens": -1}}
    other = {**json.loads(encode_event(make_event("other"))), "usage": {"input_tokens": -2}}
    bodies = [
        *(encode_event(e) for e in good),
        json.dumps(bad).encode(),
        json.dumps(other).encode(),
    ]
    priced, rejected = decode_and_price(
        bodies, catalog.snapshot(conn, q), settings, datetime.now(UTC)
    )
    result = record_isolating(conn, q, priced, rejected)
    assert (result.debited, result.parked) == (3, 2)
    rows = {r["event_id"]: r for r in deadletters.list_dead_letters(conn, q)}
    assert rows.keys() == {None, "other"}  # only the refused one is bare; the other keeps its id
    row = rows[None]
    assert (row["event_id"], row["reason_code"], row["field"]) == (None, "invalid_event", "$")
    assert row["reason"].startswith("stored bare (the database refused this dead letter")
    [(payload,)] = conn.execute(
        "SELECT payload FROM dead_letters WHERE event_id IS NULL"
    ).fetchall()
    assert json.loads(bytes(payload))["event_id"] == "refused"  # what an operator needs
    assert_audit_clean(conn, q)
