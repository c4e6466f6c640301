"""Provider usage objects through real RabbitMQ and PostgreSQL: converted, priced, debited once;
conflicts parked and listed; service tiers priced from their own sheets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from billing import broker, catalog, db, deadletters
from billing.audit import run_audit
from billing.catalog import BillableClass, PriceComponent, PriceVersion
from billing.db import Queries
from billing.errors import CatalogError
from billing.exports.statements import Period, statement_for
from billing.service_tier import ServiceTier
from billing.settings import Settings

from .conftest import worker_env
from .helpers import balances, drain, open_account


def body(
    event_id: str, fmt: str, raw: dict[str, Any], model: str, provider: str, **extra: Any
) -> bytes:
    return json.dumps(
        {
            "schema": "usage.v1",
            "event_id": event_id,
            "occurred_at": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
            "account_id": "acme",
            "api_key_id": "key-1",
            "model": model,
            "provider": provider,
            "byok": False,
            "provider_usage_format": fmt,
            "provider_usage": raw,
            **extra,
        }
    ).encode()


def publish(settings: Settings, *bodies: bytes) -> None:
    with broker.UsagePublisher(settings) as publisher:
        for b in bodies:
            publisher.publish_raw(b)


def row(conn: psycopg.Connection[Any], event_id: str) -> dict[str, Any]:
    [found] = db.fetch_dicts(
        conn,
        "SELECT * FROM usage_events WHERE event_id = %s",
        (event_id,),
    )
    return found


ISSUE_EXAMPLE = {
    "prompt_tokens": 10_000,
    "completion_tokens": 2_000,
    "total_tokens": 12_000,
    "prompt_tokens_details": {"cached_tokens": 8_000},
    "completion_tokens_details": {"reasoning_tokens": 1_500},
}


def test_provider_usage_events_are_debited_and_conflicts_parked_and_listed(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    o4 = ("openai/o4-mini", "openai")
    sonnet = ("anthropic/claude-sonnet-4-5", "anthropic")
    publish(
        settings,
        # 0.0132 (the issue's example)
        body("pu-chat", "openai.chat", ISSUE_EXAMPLE, *o4),
        # 2,095 x 3/M + 12,000 x 0.30/M + 1,024 x 3.75/M + 503 x 15/M + 2 x $0.01 = 0.04127
        body(
            "pu-claude",
            "anthropic.messages",
            {
                "input_tokens": 2095,
                "cache_creation_input_tokens": 1024,
                "cache_read_input_tokens": 12000,
                "output_tokens": 503,
                "server_tool_use": {"web_search_requests": 2},
            },
            *sonnet,
        ),
        # 0.0068926; OpenRouter reported 0.0068926 too (recorded, not billed)
        body(
            "pu-openrouter",
            "openrouter",
            {
                "prompt_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920},
                "completion_tokens": 1350,
                "completion_tokens_details": {"reasoning_tokens": 1024},
                "total_tokens": 3656,
                "cost": 0.0068926,
                "is_byok": False,
            },
            *o4,
        ),
        # cancelled mid-stream on a per-request-fee model: 1,000/M + 120/M + 0.005 = 0.00612
        body(
            "pu-cancelled",
            "openai.chat",
            {"prompt_tokens": 1000, "completion_tokens": 120},
            "perplexity/sonar",
            "perplexity",
            status="cancelled",
        ),
        # conflict: cached tokens larger than the prompt
        body(
            "pu-conflict",
            "openai.chat",
            {
                "prompt_tokens": 100,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 200},
            },
            *o4,
        ),
        # conflict: a per-image fee beside a token count that already has the image
        body(
            "pu-image",
            "gemini",
            {"promptTokenCount": 1290, "candidatesTokenCount": 10},
            "google/gemini-2.5-flash",
            "google",
            usage={"image_count": 1},
        ),
    )
    drain(settings)

    chat = row(conn, "pu-chat")
    assert (chat["input_tokens"], chat["cached_input_tokens"], chat["output_tokens"]) == (
        2000,
        8000,
        2000,
    )
    assert chat["amount"] == chat["debited"] == Decimal("0.0132")
    assert chat["provider_usage_format"] == "openai.chat" and chat["service_tier"] is None

    claude = row(conn, "pu-claude")
    assert claude["cache_write_amount"] == Decimal("0.00384")
    assert claude["web_search_amount"] == Decimal("0.02")
    assert claude["amount"] == Decimal("0.04127")

    router = row(conn, "pu-openrouter")
    assert router["amount"] == Decimal("0.0068926")
    assert router["provider_reported_cost"] == Decimal("0.0068926")

    cancelled = row(conn, "pu-cancelled")
    assert cancelled["status"] == "cancelled" and cancelled["amount"] == Decimal("0.00612")

    total = Decimal("0.0132") + Decimal("0.04127") + Decimal("0.0068926") + Decimal("0.00612")
    assert balances(conn)["acme"] == Decimal("10") - total

    parked = {
        r["event_id"]: r
        for r in deadletters.list_dead_letters(conn, q, reason_code="provider_usage_conflict")
    }
    assert set(parked) == {"pu-conflict", "pu-image"}
    assert parked["pu-conflict"]["field"] == "$.provider_usage.prompt_tokens_details.cached_tokens"
    assert parked["pu-image"]["field"] == "$.usage.image_count"
    [(payload,)] = conn.execute(
        "SELECT payload FROM dead_letters WHERE event_id = 'pu-conflict'"
    ).fetchall()
    stored = json.loads(bytes(payload))
    assert stored["provider_usage"]["prompt_tokens_details"]["cached_tokens"] == 200

    # The operator's listing shows them with their field, and the provider-cost comparison
    # shows OpenRouter's figure next to ours.
    from billing.cli import main

    env = worker_env(settings)
    listed = CliRunner().invoke(
        main, ["dead-letters", "list", "--reason", "provider_usage_conflict", "--json"], env=env
    )
    assert listed.exit_code == 0, listed.output
    assert {r["event_id"] for r in json.loads(listed.output)} == {"pu-conflict", "pu-image"}
    costs = CliRunner().invoke(main, ["usage", "provider-costs", "--json"], env=env)
    assert costs.exit_code == 0, costs.output
    [compared] = json.loads(costs.output)
    assert Decimal(compared["reported_cost"]) == Decimal(compared["our_amount"])

    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]

    # Redelivery of the same provider event debits nothing more.
    publish(settings, body("pu-chat", "openai.chat", ISSUE_EXAMPLE, *o4))
    drain(settings)
    assert balances(conn)["acme"] == Decimal("10") - total


TIERED = PriceVersion(
    model="test/tiered",
    provider="test",
    effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    prices={
        BillableClass.INPUT: PriceComponent(Decimal("2.00"), 1_000_000),
        BillableClass.OUTPUT: PriceComponent(Decimal("8.00"), 1_000_000),
        BillableClass.AUDIO_INPUT: PriceComponent(Decimal("40.00"), 1_000_000),
    },
    source="test",
    tiers={
        ServiceTier.BATCH: {
            BillableClass.INPUT: PriceComponent(Decimal("1.00"), 1_000_000),
            BillableClass.OUTPUT: PriceComponent(Decimal("4.00"), 1_000_000),
        }
    },
)


def test_service_tiers_are_priced_from_their_own_sheet_and_shown_on_statements(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    now = datetime.now(UTC)
    result = catalog.load_versions(conn, q, [TIERED], now=now, loaded_by="tests")
    assert len(result.added) == 1
    # The tier sheets round-trip through the database, and reloading is a no-op.
    [loaded] = catalog.snapshot(conn, q).versions[("test/tiered", "test")]
    assert dict(loaded.tiers) == dict(TIERED.tiers) and dict(loaded.prices) == dict(TIERED.prices)
    again = catalog.load_versions(conn, q, [TIERED], now=now, loaded_by="tests")
    assert len(again.unchanged) == 1
    changed = PriceVersion(
        TIERED.model,
        TIERED.provider,
        TIERED.effective_from,
        TIERED.prices,
        "test",
        tiers={ServiceTier.BATCH: {BillableClass.INPUT: PriceComponent(Decimal("0.5"), 1_000_000)}},
    )
    with pytest.raises(CatalogError):
        catalog.load_versions(conn, q, [changed], now=now, loaded_by="tests")

    open_account(conn, q, "acme", "10")
    chat = {"prompt_tokens": 1_000_000, "completion_tokens": 100_000}
    publish(
        settings,
        # standard: 1M x 2/M + 100k x 8/M = 2.80
        body("t-standard", "openai.chat", chat, "test/tiered", "test"),
        # batch: 1M x 1/M + 100k x 4/M = 1.40
        body("t-batch", "openai.chat", chat, "test/tiered", "test", service_tier="batch"),
        # audio in: 600k text x 2/M + 400k audio x 40/M + 100k x 8/M = 1.20 + 16 + 0.80 = 18.00
        # (more than the wallet: the balance goes negative, as any usage does)
        body(
            "t-audio",
            "openai.chat",
            {**chat, "prompt_tokens_details": {"audio_tokens": 400_000}},
            "test/tiered",
            "test",
        ),
        # flex is not priced for this model: parked, not billed at standard
        body("t-flex", "openai.chat", chat, "test/tiered", "test", service_tier="flex"),
        # audio in the batch tier is not priced either
        body(
            "t-batch-audio",
            "openai.chat",
            {**chat, "prompt_tokens_details": {"audio_tokens": 1}},
            "test/tiered",
            "test",
            service_tier="batch",
        ),
    )
    drain(settings)
    assert row(conn, "t-standard")["amount"] == Decimal("2.8")
    batch = row(conn, "t-batch")
    assert batch["amount"] == Decimal("1.4") and batch["service_tier"] == "batch"
    audio = row(conn, "t-audio")
    assert audio["audio_input_tokens"] == 400_000 and audio["audio_input_amount"] == Decimal("16")
    assert audio["amount"] == Decimal("18")
    parked = {
        r["event_id"]: r for r in deadletters.list_dead_letters(conn, q, reason_code="unpriced")
    }
    assert parked["t-flex"]["field"] == "$.service_tier"
    assert parked["t-batch-audio"]["field"] == "$.usage.audio_input_tokens"
    assert balances(conn)["acme"] == Decimal("10") - Decimal("22.2")

    st = statement_for(conn, q, "acme", Period.of(datetime.now(UTC)))
    lines = {line.billable_class: line for line in st.usage}
    assert lines["input_tokens [batch]"].unit_price == Decimal("1")
    assert lines["input_tokens [batch]"].amount == Decimal("1")
    assert lines["audio_input_tokens"].amount == Decimal("16")
    assert lines["audio_input_tokens"].unit_price == Decimal("40")
    assert lines["input_tokens"].quantity == 1_000_000 + 600_000
    assert all(line.events == 3 for line in st.usage)

    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]


def test_cli_emits_a_provider_usage_object_and_refuses_a_conflicting_one(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    from billing.cli import main

    open_account(conn, q, "acme", "10")
    env = worker_env(settings)
    usage_json = json.dumps(ISSUE_EXAMPLE)
    base = ["usage", "emit", "--account", "acme", "--model", "openai/o4-mini", "--provider"]
    ok = CliRunner().invoke(
        main,
        [
            *base,
            "openai",
            "--event-id",
            "cli-pu",
            "--format",
            "openai.chat",
            "--provider-usage",
            usage_json,
        ],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(
        main,
        [
            *base,
            "openai",
            "--input",
            "10000",
            "--format",
            "openai.chat",
            "--provider-usage",
            usage_json,
        ],
        env=env,
    )
    assert bad.exit_code == 2 and "$.usage.input_tokens" in bad.output
    drain(settings)
    assert row(conn, "cli-pu")["amount"] == Decimal("0.0132")


def test_audit_finds_an_event_priced_in_a_tier_its_version_does_not_have(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    publish(settings, body("a-1", "openai.chat", ISSUE_EXAMPLE, "openai/o4-mini", "openai"))
    drain(settings)
    assert run_audit(conn, q).ok
    # A row no code path can write: a tier without prices, and an amount without its count. Its
    # version is o4-mini's first, which has no tiers (later ones price priority: not whichever
    # version is in force today).
    conn.execute(
        """INSERT INTO usage_events
           SELECT (json_populate_record(u, json_build_object(
               'event_id', 'forged', 'service_tier', 'priority', 'posting_id', NULL,
               'price_effective_from', (SELECT min(p.effective_from) FROM prices p
                                        WHERE p.model = u.model AND p.provider = u.provider),
               'input_amount', 0, 'cached_input_amount', 0, 'output_amount', 0, 'amount', 0,
               'debited', 0, 'audio_input_amount', 0))).*
           FROM usage_events u WHERE event_id = 'a-1'"""
    )
    conn.commit()
    failed = {c.name: c.violations for c in run_audit(conn, q).checks if not c.ok}
    assert [
        v["event_id"]
        for v in failed["events in a service tier were priced from that tier's prices"]
    ] == ["forged"]
    assert [v["event_id"] for v in failed["new classes have amounts exactly with counts"]] == [
        "forged"
    ]


def test_a_parked_provider_event_is_replayed_once_its_price_exists(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    one_hour_writes = {
        "input_tokens": 100,
        "cache_creation_input_tokens": 6000,
        "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 4000},
        "output_tokens": 300,
    }
    # A model of the test's own with no 1-hour write price: the shipped catalog's Anthropic
    # models price them from their 2026-12-01 versions on, so they would not be parked today.
    model = ("test/no-1h-writes", "anthropic")
    prices = {
        BillableClass.INPUT: PriceComponent(Decimal("3"), 1_000_000),
        BillableClass.CACHE_WRITE: PriceComponent(Decimal("3.75"), 1_000_000),
        BillableClass.OUTPUT: PriceComponent(Decimal("15"), 1_000_000),
    }
    day_ago = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    catalog.load_versions(
        conn,
        q,
        [PriceVersion(*model, day_ago, prices, "test: no 1-hour writes")],
        now=datetime.now(UTC),
        loaded_by="tests",
        allow_backdate=True,
    )
    publish(settings, body("pu-1h", "anthropic.messages", one_hour_writes, *model))
    drain(settings)
    [parked] = deadletters.list_dead_letters(conn, q, reason_code="unpriced")
    assert parked["field"] == "$.usage.cache_write_1h_tokens"

    # The operator prices 1-hour writes from an hour ago (a backdated version, knowingly).
    start = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    fixed = PriceVersion(
        *model,
        start,
        {**prices, BillableClass.CACHE_WRITE_1H: PriceComponent(Decimal("6"), 1_000_000)},
        "test: 1-hour writes",
    )
    catalog.load_versions(
        conn, q, [fixed], now=datetime.now(UTC), loaded_by="tests", allow_backdate=True
    )
    result = deadletters.replay(
        conn, q, catalog.CatalogCache(q), settings, datetime.now(UTC), reason_code="unpriced"
    )
    assert result.debited == 1
    # 100 x 3/M + 2,000 x 3.75/M + 4,000 x 6/M + 300 x 15/M = 0.0363
    recorded = row(conn, "pu-1h")
    assert recorded["amount"] == Decimal("0.0363")
    assert recorded["cache_write_1h_tokens"] == 4000 and recorded["cache_write_tokens"] == 2000
    assert balances(conn)["acme"] == Decimal("10") - Decimal("0.0363")
    again = deadletters.replay(
        conn, q, catalog.CatalogCache(q), settings, datetime.now(UTC), reason_code="unpriced"
    )
    assert again.debited == 0
    assert run_audit(conn, q).ok
