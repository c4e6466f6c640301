"""`billing audit`: each invariant check sees a corruption of exactly what it guards.

Every test first builds clean books through the real code paths (the audit passes), then corrupts
one thing the way a bug would, bypassing the append-only triggers with
``SET session_replication_role = replica`` where it must (tests only), and expects the named
check to fail, with the offending row, and the CLI to exit 1.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from billing import catalog
from billing.audit import run_audit
from billing.db import Queries
from billing.events import encode_event
from billing.ledger import next_posting_id, post_movement
from billing.settings import Settings
from billing.topups import Ledger
from billing.usage import process_batch

from .conftest import worker_env
from .helpers import make_event, open_account


def record(conn: psycopg.Connection[Any], q: Queries, settings: Settings, *events: Any) -> None:
    bodies = [encode_event(e) for e in events]
    process_batch(conn, q, catalog.snapshot(conn, q), bodies, settings, datetime.now(UTC))


def failed(conn: psycopg.Connection[Any], q: Queries) -> dict[str, list[dict[str, Any]]]:
    return {c.name: c.violations for c in run_audit(conn, q).checks if not c.ok}


@pytest.fixture
def books(settings: Settings, conn: psycopg.Connection[Any], q: Queries) -> None:
    """Clean books: two funded accounts, debited events, a BYOK event and a parked one."""
    open_account(conn, q, "acme", "10")
    open_account(conn, q, "globex", "5")
    record(
        conn,
        q,
        settings,
        make_event("e-1", "acme"),
        make_event("e-2", "acme", input_tokens=5000),
        make_event("e-3", "globex"),
        make_event("e-4", "globex", byok=True),
        make_event("e-5", "nobody"),  # unknown account: parked
    )
    assert failed(conn, q) == {}


def replica(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET session_replication_role = replica")


def test_a_dead_letter_resolved_without_its_event_recorded_is_a_lost_event(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    conn.execute("UPDATE dead_letters SET status = 'resolved', resolution = 'bug' ")
    problems = failed(conn, q)
    [row] = problems["every accepted event is in exactly one state"]
    assert (row["problem"], row["event_id"]) == ("resolved but not recorded", "e-5")


def test_an_event_parked_twice_is_reported(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    conn.execute(
        "INSERT INTO dead_letters (dedup_key, event_id, account_id, reason_code, field, reason,"
        " payload, payload_bytes) SELECT 'other-key', event_id, account_id, reason_code, field,"
        " reason, payload, payload_bytes FROM dead_letters WHERE event_id = 'e-5'"
    )
    [row] = failed(conn, q)["every accepted event is in exactly one state"]
    assert (row["problem"], row["event_id"]) == ("parked more than once", "e-5")


def test_a_recorded_event_may_be_parked_only_as_a_conflicting_copy(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    conn.execute(
        "INSERT INTO dead_letters (dedup_key, event_id, account_id, reason_code, field, reason,"
        " payload, payload_bytes) VALUES ('k', 'e-1', 'acme', 'unpriced', '$', 'test', '', 0)"
    )
    [row] = failed(conn, q)["no event both recorded and parked"]
    assert (row["event_id"], row["reason_code"]) == ("e-1", "unpriced")
    conn.execute(
        "UPDATE dead_letters SET reason_code = 'conflicting_duplicate' WHERE dedup_key = 'k'"
    )
    assert failed(conn, q) == {}  # another content under e-1's id, e-1 recorded: consistent


def test_a_conflicting_copy_of_an_event_never_recorded_is_reported(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    conn.execute(
        "UPDATE dead_letters SET reason_code = 'conflicting_duplicate' WHERE event_id = 'e-5'"
    )
    [row] = failed(conn, q)["no event both recorded and parked"]
    assert (row["event_id"], row["reason_code"]) == ("e-5", "conflicting_duplicate")


def test_an_event_amount_that_never_reached_its_wallet_is_reported_per_wallet(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    replica(conn)
    conn.execute(
        "UPDATE usage_events SET input_amount = input_amount + 1, amount = amount + 1,"
        " debited = debited + 1 WHERE event_id = 'e-2'"
    )
    [row] = failed(conn, q)["per wallet, ledger usage debits equal its events' debits"]
    assert row["account_id"] == "acme"
    assert row["events_total"] - row["ledger_total"] == Decimal(1)


def test_an_unbalanced_movement_breaks_the_trial_balance(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    replica(conn)  # the balance trigger would refuse this single-sided entry
    conn.execute(
        "INSERT INTO ledger_entries (posting_id, ledger_account_id, amount)"
        " SELECT max(posting_id), (SELECT ledger_account_id FROM ledger_accounts"
        " WHERE code = 'revenue:usage'), 0.000000000001 FROM postings"
    )
    problems = failed(conn, q)
    [row] = problems["the trial balance is zero (every movement balances)"]
    assert row["entries_total"] == Decimal("0.000000000001")
    assert "every posting balances" in problems


def _credit_topup(conn: psycopg.Connection[Any], q: Queries, topup_id: str, link: bool) -> int:
    """What a processed payment does: one posting wallet +100, fees +5, Stripe clearing -105."""
    with conn.transaction():
        posting_id = next_posting_id(conn, q)
        post_movement(
            conn,
            q,
            posting_id=posting_id,
            kind="topup",
            wallet_deltas={"acme": Decimal(100)},
            system_deltas={Ledger.FEES: Decimal(5), Ledger.CLEARING: Decimal(-105)},
            reference=topup_id if link else f"{topup_id}:again",
            memo="test",
        )
        conn.execute(
            "INSERT INTO topup_postings (posting_id, topup_id, kind) VALUES (%s, %s, 'topup')",
            (posting_id, topup_id),
        )
    return posting_id


def test_a_stripe_payment_that_moved_money_twice_is_reported(
    books: None, conn: psycopg.Connection[Any], q: Queries
) -> None:
    conn.execute(
        "INSERT INTO topups (topup_id, account_id, credit, fee, charged) "
        "VALUES ('tu-1', 'acme', 100, 5, 105)"
    )
    posting_id = _credit_topup(conn, q, "tu-1", link=True)
    conn.execute(
        "UPDATE topups SET status = 'succeeded', credit_posting_id = %s WHERE topup_id = 'tu-1'",
        (posting_id,),
    )
    assert failed(conn, q) == {}
    _credit_topup(conn, q, "tu-1", link=False)  # a second delivery credited again
    rows = failed(conn, q)["each Stripe payment, refund and dispute moved money at most once"]
    assert {"top-up credited more than once", "credit posting is not the one the top-up names"} <= {
        r["problem"] for r in rows
    }
    assert {r["subject"] for r in rows} == {"tu-1"}


def test_cli_exits_1_and_prints_the_offending_rows(
    books: None, settings: Settings, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("UPDATE dead_letters SET status = 'resolved', resolution = 'bug'")
    run = subprocess.run(
        [sys.executable, "-m", "billing.cli", "audit"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "exactly one state" in run.stdout
    assert "e-5" in run.stdout
