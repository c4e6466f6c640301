"""The per-event charge cap (BILLING_MAX_EVENT_CHARGE): an event priced over it is parked as
``charge_over_cap``, the rest of its batch is billed, and a replay under a higher cap (or none)
records it exactly once."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
from click.testing import CliRunner

from billing import broker, catalog, deadletters
from billing.cli import main
from billing.db import Queries
from billing.events import Usage, UsageEvent
from billing.settings import Settings

from .conftest import worker_env
from .helpers import assert_audit_clean, balances, drain, make_event, open_account

# o4-mini: 10**9 input tokens at 1.10/M + 3 * 10**8 output tokens at 4.40/M = 1100 + 1320 USD
HUGE = {"input_tokens": 10**9, "output_tokens": 3 * 10**8}
GOOD = Decimal("0.0033")  # make_event's default usage: 1000 input, 500 output


def publish(settings: Settings, *events: UsageEvent) -> None:
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(list(events), envelope_size=len(events))  # one message: one batch


def replay_cli(settings: Settings, *args: str, **env: str) -> str:
    """``billing dead-letters replay`` in the CLI's own Settings, read from its environment."""
    runner = CliRunner(env=worker_env(settings, **env))
    result = runner.invoke(main, ["dead-letters", "replay", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def recorded(conn: psycopg.Connection[Any], event_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT amount, debited FROM usage_events WHERE event_id = %s", (event_id,)
    ).fetchall()


def test_an_event_over_the_cap_is_parked_and_the_rest_of_its_batch_is_debited(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    assert settings.max_event_charge == Decimal(1000)  # the default
    open_account(conn, q, "acme", "5000")
    publish(settings, make_event("good-1"), make_event("huge", **HUGE), make_event("good-2"))
    totals = drain(settings).totals
    assert (totals.items, totals.debited, totals.parked) == (3, 2, 1)
    assert totals.parked_reasons == {"charge_over_cap": 1}
    assert balances(conn)["acme"] == Decimal(5000) - 2 * GOOD
    assert recorded(conn, "huge") == []
    (letter,) = deadletters.list_dead_letters(conn, q, reason_code="charge_over_cap")
    assert (letter["event_id"], letter["account_id"]) == ("huge", "acme")
    assert letter["field"] == "$.usage.output_tokens"  # the largest class
    reason = letter["reason"]
    assert "priced at 2420" in reason and "cap of 1000 USD" in reason
    assert "BILLING_MAX_EVENT_CHARGE" in reason
    assert "largest class: output_tokens 300000000 = 1320" in reason
    assert_audit_clean(conn, q)

    # Replayed under the same cap: parked again (the same dead letter), nothing debited.
    assert "0 debited" in replay_cli(settings) and "1 still parked" in replay_cli(settings)
    (again,) = deadletters.list_dead_letters(conn, q)
    assert (again["dead_letter_id"], again["attempts"]) == (letter["dead_letter_id"], 3)

    # After review, the operator replays it with the cap off: recorded and debited once.
    out = replay_cli(settings, "--reason", "charge_over_cap", BILLING_MAX_EVENT_CHARGE="0")
    assert "replayed 1: 1 debited" in out
    assert recorded(conn, "huge") == [(Decimal(2420), Decimal(2420))]
    assert balances(conn)["acme"] == Decimal(5000) - 2 * GOOD - 2420
    assert deadletters.list_dead_letters(conn, q) == []
    (resolved,) = deadletters.list_dead_letters(conn, q, status="resolved")
    assert resolved["resolution"] == "replayed"
    # Again: nothing left to replay, still once.
    assert "replayed 0" in replay_cli(settings, BILLING_MAX_EVENT_CHARGE="0")
    assert len(recorded(conn, "huge")) == 1
    assert balances(conn)["acme"] == Decimal(5000) - 2 * GOOD - 2420
    assert_audit_clean(conn, q)


def test_a_resend_of_an_event_recorded_over_the_cap_is_a_duplicate(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Recorded by a replay with the cap off, the same event sent again under the cap is a
    duplicate, not a new dead letter; another content under its id is a conflicting copy."""
    open_account(conn, q, "acme", "5000")
    huge = make_event("huge", **HUGE)
    publish(settings, huge)
    drain(settings)
    uncapped = replace(settings, max_event_charge=None)
    result = deadletters.replay(conn, q, catalog.CatalogCache(q), uncapped, datetime.now(UTC))
    assert (result.debited, result.parked) == (1, 0)

    changed = msgspec.structs.replace(huge, usage=Usage(input_tokens=10**9, output_tokens=10**9))
    publish(settings, huge, changed, make_event("good-1"))
    totals = drain(settings).totals
    assert (totals.debited, totals.duplicates, totals.parked) == (1, 1, 1)
    (letter,) = deadletters.list_dead_letters(conn, q)
    assert (letter["reason_code"], letter["field"]) == (
        "conflicting_duplicate",
        "$.usage.output_tokens",
    )
    assert balances(conn)["acme"] == Decimal(5000) - 2420 - GOOD
    assert_audit_clean(conn, q)


def test_a_byok_event_over_the_cap_is_parked_too(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """BYOK debits nothing, but a price that high says the counts are wrong: parked for review
    like any other, then recorded (at 0 debited) by a replay with the cap off."""
    open_account(conn, q, "acme", "10")
    publish(settings, make_event("byok-huge", byok=True, **HUGE), make_event("good-1"))
    totals = drain(settings).totals
    assert (totals.debited, totals.byok, totals.parked) == (1, 0, 1)
    (letter,) = deadletters.list_dead_letters(conn, q)
    assert (letter["event_id"], letter["reason_code"]) == ("byok-huge", "charge_over_cap")
    assert recorded(conn, "byok-huge") == []
    assert_audit_clean(conn, q)

    out = replay_cli(settings, "--id", str(letter["dead_letter_id"]), BILLING_MAX_EVENT_CHARGE="0")
    assert "0 debited, 1 BYOK" in out
    assert recorded(conn, "byok-huge") == [(Decimal(2420), 0)]
    assert balances(conn)["acme"] == Decimal(10) - GOOD
    assert_audit_clean(conn, q)


def test_a_higher_cap_lets_the_event_through_and_zero_turns_the_cap_off(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "5000")
    publish(replace(settings, max_event_charge=Decimal(3000)), make_event("huge", **HUGE))
    assert drain(replace(settings, max_event_charge=Decimal(3000))).totals.debited == 1
    publish(settings, make_event("huge-2", **HUGE))
    assert drain(replace(settings, max_event_charge=None)).totals.debited == 1
    publish(settings, make_event("at-cap", input_tokens=10**9))  # 1100 USD
    assert drain(replace(settings, max_event_charge=Decimal(1100))).totals.debited == 1
    assert deadletters.list_dead_letters(conn, q) == []
    assert_audit_clean(conn, q)
