"""The operator CLI against real services: output, exit codes, exact amounts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from billing import broker, catalog
from billing.cli import main
from billing.db import Queries
from billing.events import encode_event
from billing.settings import Settings
from billing.usage import process_batch

from .conftest import worker_env
from .helpers import drain, make_event, open_account


@pytest.fixture
def cli(settings: Settings) -> CliRunner:
    return CliRunner(env=worker_env(settings))


def run(cli: CliRunner, *args: str, code: int = 0) -> Result:
    result = cli.invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_operator_flow(cli: CliRunner, settings: Settings, tmp_path: Path) -> None:
    assert "up to date" in run(cli, "migrate").output
    assert "0 versions added" in run(cli, "prices", "load").output
    listed = json.loads(run(cli, "prices", "list", "--model", "openai/o4-mini", "--json").output)
    assert {(r["provider"], r["class"], r["usd"]) for r in listed} >= {
        ("openai", "input_tokens", "1.10"),
        ("azure", "image_count", "0.842"),
    }

    o3_at = {
        when: {
            r["class"]: r["usd"]
            for r in json.loads(
                run(cli, "prices", "list", "--model", "openai/o3", "--at", when, "--json").output
            )
        }
        for when in ("2025-05-01T00:00:00Z", "2025-07-01T00:00:00Z")
    }
    # the o3 price cut of 2025-06-10: each time sees only the version in force then
    assert o3_at["2025-05-01T00:00:00Z"]["input_tokens"] == "10.00"
    assert o3_at["2025-07-01T00:00:00Z"]["input_tokens"] == "2.00"

    run(cli, "accounts", "create", "acme")
    assert "already exists" in run(cli, "accounts", "create", "acme", code=2).output
    run(cli, "wallet", "adjust", "acme", "20", "--reason", "welcome", "--reference", "w-1")
    run(cli, "wallet", "adjust", "acme", "20", "--reason", "welcome", "--reference", "w-1")
    run(cli, "wallet", "adjust", "acme", "-0.5", "--reason", "goodwill reversal")
    assert (
        "needs a reason"
        in run(cli, "wallet", "adjust", "acme", "1", "--reason", " ", code=2).output
    )
    assert (
        "no account" in run(cli, "wallet", "adjust", "ghost", "1", "--reason", "x", code=2).output
    )

    run(
        cli,
        "usage",
        "emit",
        "--account",
        "acme",
        "--model",
        "openai/o4-mini",
        "--provider",
        "openai",
        "--input",
        "1000000",
        "--output",
        "1000",
        "--event-id",
        "cli-1",
        "--repeat",
        "3",
    )
    assert (
        "reasoning_tokens"
        in run(
            cli,
            "usage",
            "emit",
            "--account",
            "acme",
            "--model",
            "openai/o4-mini",
            "--provider",
            "openai",
            "--output",
            "1",
            "--reasoning",
            "2",
            code=2,
        ).output
    )
    lines = tmp_path / "raw.jsonl"
    lines.write_text('{"not": "an event"}\n')
    run(cli, "usage", "emit", "--file", str(lines))
    drain(settings)

    wallet = json.loads(run(cli, "wallet", "show", "acme", "--json").output)
    # 20 - 0.5 - (1M * 1.10/1M + 1000 * 4.40/1M), the adjustment counted once, the event once
    assert wallet["balance"] == wallet["ledger_sum"] == "18.3956"
    assert wallet["usage_events"] == 1 and wallet["state"] == "active"

    parked = json.loads(run(cli, "dead-letters", "list", "--json").output)
    assert [(p["reason_code"], p["field"]) for p in parked] == [("invalid_event", "$.not")]
    assert "0 debited" in run(cli, "dead-letters", "replay").output
    run(cli, "dead-letters", "discard", str(parked[0]["dead_letter_id"]), "--reason", "test")

    audit = json.loads(run(cli, "audit", "--json").output)
    assert audit["ok"] and audit["states"]["debited"] == 1


def test_audit_exits_non_zero_and_names_the_offending_row(cli: CliRunner, conn: object) -> None:
    run(cli, "accounts", "create", "acme")
    run(cli, "wallet", "adjust", "acme", "5", "--reason", "credit")
    conn.execute("UPDATE wallets SET balance = 6 WHERE account_id = 'acme'")  # type: ignore[attr-defined]
    result = run(cli, "audit", code=1)
    assert "FAIL wallet balance equals its ledger sum" in result.output
    assert "acme" in result.output


def test_broker_assign_splits_partitions_by_recorded_traffic(
    settings: Settings, conn: Any, q: Queries
) -> None:
    hot, *others = [f"acct-{i:02d}" for i in range(12)]
    for account in (hot, *others):
        open_account(conn, q, account, "10")
    events = [make_event(f"hot-{i}", hot) for i in range(30)]
    events += [make_event(f"ev-{i}", others[i % 11]) for i in range(33)]
    bodies = [encode_event(e) for e in events]
    process_batch(conn, q, catalog.snapshot(conn, q), bodies, settings, datetime.now(UTC))

    partitioned = CliRunner(env=worker_env(settings, BILLING_USAGE_PARTITIONS="4"))
    out = json.loads(run(partitioned, "broker", "assign", "--workers", "2", "--json").output)
    groups = [w["BILLING_USAGE_CONSUME_PARTITIONS"].split(",") for w in out["workers"]]
    assert sorted(int(j) for g in groups for j in g) == [0, 1, 2, 3]
    assert sum(w["events"] for w in out["workers"]) == 63
    hot_partition = str(broker.partition_of(hot, 4))
    [hot_group] = [w for w, g in zip(out["workers"], groups, strict=True) if hot_partition in g]
    assert hot_group["events"] >= 30  # the hot account's worker, with what could not be moved
    text = run(partitioned, "broker", "assign", "--workers", "2").output
    assert "worker 0: BILLING_USAGE_CONSUME_PARTITIONS=" in text and "events, " in text

    one_queue = CliRunner(env=worker_env(settings))
    assert "not partitioned" in run(one_queue, "broker", "assign", "--workers", "2", code=2).output
