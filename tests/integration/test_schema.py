"""The migrations build the schema the code expects, and the database enforces the ledger rules."""

from __future__ import annotations

import json
import re
import shutil
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from billing import catalog, db
from billing.db import Queries
from billing.errors import BillingError
from billing.events import encode_event
from billing.settings import Settings
from billing.usage import decode_and_price, record_isolating

from .helpers import make_event, open_account

NOT_PREPARABLE = {"copy_usage_events", "copy_usage_staging", "create_usage_staging"}


def test_every_named_query_prepares_against_the_migrated_schema(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Each statement in sql/queries is parsed, planned and type-checked by PostgreSQL."""
    conn.execute(q["create_usage_staging"])  # the staging table the insert reads from
    for name in q.names():
        if name in NOT_PREPARABLE:
            continue
        numbered: dict[str, str] = {}

        def number(match: re.Match[str], numbered: dict[str, str] = numbered) -> str:
            return numbered.setdefault(match[1], f"${len(numbered) + 1}")

        text = re.sub(r"%\((\w+)\)s", number, q[name])
        pieces = text.split("%s")  # positional parameters: $1, $2, ... in order
        text = pieces[0] + "".join(f"${i}{piece}" for i, piece in enumerate(pieces[1:], 1))
        conn.execute(f"PREPARE check_{name} AS {text}")  # type: ignore[arg-type]
        conn.execute(f"DEALLOCATE check_{name}")  # type: ignore[arg-type]


def test_migrations_are_recorded_and_rerunning_applies_nothing(
    conn: psycopg.Connection[Any], settings: Settings
) -> None:
    assert db.migrate(conn, settings.sql_dir) == []
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in db.load_migrations(settings.sql_dir)]


def test_an_edited_migration_is_refused(
    conn: psycopg.Connection[Any], settings: Settings, tmp_path: Any
) -> None:
    sql_dir = tmp_path / "sql"
    (sql_dir / "migrations").mkdir(parents=True)
    (sql_dir / "queries").mkdir()
    for m in db.load_migrations(settings.sql_dir):
        (sql_dir / "migrations" / f"{m.version:04d}_{m.name}.sql").write_text(m.sql + "\n-- x")
    with pytest.raises(BillingError, match="edited after it was applied"):
        db.migrate(conn, sql_dir)


def test_concurrent_migrations_apply_each_file_once(settings: Settings, tmp_path: Any) -> None:
    with db.connect(settings) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with db.connect(settings) as c:
                db.migrate(c, settings.sql_dir)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.connect(settings) as conn:
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert applied == (len(db.load_migrations(settings.sql_dir)),)


def test_migration_0010_dates_the_booked_refunds_by_stripe_time_not_by_our_updated_at(
    settings: Settings, tmp_path: Any
) -> None:
    """The refund snapshot a top-up carries from before 0010 is as old as the newest charge
    event processed for it (Stripe's created), so a pending charge.refunded that Stripe sent
    later is not taken as older because we processed something else after it."""
    before = tmp_path / "sql"
    (before / "migrations").mkdir(parents=True)
    for path in sorted((settings.sql_dir / "migrations").glob("*.sql")):
        if int(path.name[:4]) < 10:
            shutil.copy(path, before / "migrations" / path.name)
    created = int(datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp())
    with db.connect(settings) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        db.migrate(conn, before)
        conn.execute("INSERT INTO accounts (account_id) VALUES ('acme')")
        conn.execute("INSERT INTO postings (posting_id, kind) VALUES (1, 'topup')")
        conn.execute(
            "INSERT INTO topups (topup_id, account_id, credit, fee, charged, status, "
            "refunded_credit, refunded_fee, stripe_charge_id, credit_posting_id, updated_at) "
            "VALUES ('tu_1', 'acme', 100, 5, 105, 'succeeded', 28.57, 1.43, 'ch_1', 1, "
            "'2026-12-03 09:00+00')"
        )
        for event_id, event_type, charge, at in [
            ("evt_old", "charge.succeeded", "ch_1", created - 600),
            ("evt_new", "charge.refunded", "ch_1", created),
            ("evt_other", "charge.refunded", "ch_2", created + 600),  # another charge's
        ]:
            event = {
                "id": event_id,
                "type": event_type,
                "created": at,
                "data": {"object": {"id": charge, "object": "charge", "amount_refunded": 3000}},
            }
            conn.execute(
                "INSERT INTO stripe_events (event_id, type, payload, event, processed_at) "
                "VALUES (%s, %s, %s, %s, now())",
                (event_id, event_type, json.dumps(event).encode(), json.dumps(event)),
            )
        conn.execute(
            "INSERT INTO stripe_events (event_id, type, payload, event) VALUES (%s, %s, %s, %s)",
            ("evt_pending", "charge.refunded", b"{}", json.dumps({"created": created + 60})),
        )
        conn.commit()
        db.migrate(conn, settings.sql_dir)
        row = conn.execute(
            "SELECT refund_snapshot_at, refund_snapshot_cents FROM topups WHERE topup_id = 'tu_1'"
        ).fetchone()
    assert row == (datetime.fromtimestamp(created, UTC), 3000)


def _before_0010(settings: Settings, tmp_path: Any, conn: psycopg.Connection[Any]) -> None:
    before = tmp_path / "sql"
    (before / "migrations").mkdir(parents=True)
    for path in sorted((settings.sql_dir / "migrations").glob("*.sql")):
        if int(path.name[:4]) < 10:
            shutil.copy(path, before / "migrations" / path.name)
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    db.migrate(conn, before)
    conn.execute("INSERT INTO accounts (account_id) VALUES ('acme')")
    conn.execute("INSERT INTO postings (posting_id, kind) VALUES (1, 'topup')")


def _charge_event(
    conn: psycopg.Connection[Any], event_id: str, event_type: str, at: int, **charge: Any
) -> None:
    event = {
        "id": event_id,
        "type": event_type,
        "created": at,
        "data": {"object": {"object": "charge", **charge}},
    }
    conn.execute(
        "INSERT INTO stripe_events (event_id, type, payload, event, processed_at) "
        "VALUES (%s, %s, %s, %s, now())",
        (event_id, event_type, json.dumps(event).encode(), json.dumps(event)),
    )


def test_migration_0010_finds_a_checkout_topups_charge_events_by_intent_or_metadata(
    settings: Settings, tmp_path: Any
) -> None:
    """A Checkout payment whose first card was declined stored the declined charge's id: the
    refunded charge's events are the top-up's by payment_intent or metadata.topup_id."""
    created = int(datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp())
    with db.connect(settings) as conn:
        _before_0010(settings, tmp_path, conn)
        for topup_id, pi in [("tu_1", "pi_1"), ("tu_2", "pi_2")]:
            conn.execute(
                "INSERT INTO topups (topup_id, account_id, kind, credit, fee, charged, status, "
                "refunded_credit, refunded_fee, stripe_payment_intent_id, stripe_charge_id, "
                "credit_posting_id, updated_at) VALUES (%s, 'acme', 'checkout', 100, 5, 105, "
                "'succeeded', 28.57, 1.43, %s, %s, 1, '2026-12-03 09:00+00')",
                (topup_id, pi, f"ch_declined_{topup_id}"),
            )
        _charge_event(
            conn, "evt_1", "charge.refunded", created, id="ch_a", payment_intent="pi_1",
            amount_refunded=3000,
        )  # fmt: skip
        _charge_event(
            conn, "evt_2", "charge.refunded", created + 60, id="ch_b", payment_intent=None,
            metadata={"topup_id": "tu_2"}, amount_refunded=3000,
        )  # fmt: skip
        db.migrate(conn, settings.sql_dir)
        rows = conn.execute(
            "SELECT topup_id, refund_snapshot_at, refund_snapshot_cents FROM topups ORDER BY 1"
        ).fetchall()
    assert rows == [
        ("tu_1", datetime.fromtimestamp(created, UTC), 3000),
        ("tu_2", datetime.fromtimestamp(created + 60, UTC), 3000),
    ]


def test_migration_0010_takes_the_amount_and_the_time_of_the_same_newest_charge_event(
    settings: Settings, tmp_path: Any
) -> None:
    """A refund that failed before 0010 lowered Stripe's amount_refunded but not our booked
    total: the snapshot is the newest event's total at its time, not the booked one."""
    created = int(datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp())
    with db.connect(settings) as conn:
        _before_0010(settings, tmp_path, conn)
        conn.execute(
            "INSERT INTO topups (topup_id, account_id, credit, fee, charged, status, "
            "refunded_credit, refunded_fee, stripe_charge_id, credit_posting_id, updated_at) "
            "VALUES ('tu_1', 'acme', 100, 5, 105, 'succeeded', 28.57, 1.43, 'ch_1', 1, "
            "'2026-12-03 09:00+00')"
        )
        _charge_event(
            conn, "evt_a", "charge.refunded", created - 600, id="ch_1", amount_refunded=3000
        )
        _charge_event(conn, "evt_b", "charge.refunded", created, id="ch_1", amount_refunded=1000)
        db.migrate(conn, settings.sql_dir)
        row = conn.execute(
            "SELECT refund_snapshot_at, refund_snapshot_cents FROM topups WHERE topup_id = 'tu_1'"
        ).fetchone()
    assert row == (datetime.fromtimestamp(created, UTC), 1000)


def test_migration_0010_backfill_reads_stripe_events_once_not_per_topup(
    conn: psycopg.Connection[Any], settings: Settings
) -> None:
    """It runs while ALTER TABLE holds an exclusive lock on topups: no correlated scan of
    stripe_events per refunded top-up (24 s for 1,000 top-ups x 100k events)."""
    [path] = (settings.sql_dir / "migrations").glob("0010_*.sql")
    code = "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")
    )
    [backfill] = [s for s in code.split(";") if "refund_snapshot_at = coalesce" in s]
    with conn.transaction():
        conn.execute("SET LOCAL enable_hashjoin = on")
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {backfill}"))  # type: ignore[arg-type]
    assert "SubPlan" not in plan, plan
    assert plan.count("on stripe_events") == 1, plan


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount = amount + 1",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries CASCADE",
        "UPDATE postings SET memo = 'x'",
        "DELETE FROM postings",
        "UPDATE prices SET unit_price = 0",
        "DELETE FROM prices",
        "UPDATE usage_events SET amount = 0",
    ],
)
def test_the_ledger_is_append_only(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings, statement: str
) -> None:
    open_account(conn, q, "acme")
    priced, rejected = decode_and_price(
        [encode_event(make_event("e1"))], catalog.snapshot(conn, q), settings, datetime.now(UTC)
    )
    assert record_isolating(conn, q, priced, rejected).debited == 1
    with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
        conn.execute(statement)  # type: ignore[arg-type]


def test_an_unbalanced_posting_is_refused(conn: psycopg.Connection[Any], q: Queries) -> None:
    open_account(conn, q, "acme")
    with (
        pytest.raises(psycopg.errors.CheckViolation, match="does not balance"),
        conn.transaction(),
    ):
        conn.execute("INSERT INTO postings (posting_id, kind) VALUES (999, 'adjustment')")
        conn.execute(
            "INSERT INTO ledger_entries (posting_id, ledger_account_id, amount) "
            "SELECT 999, ledger_account_id, 5 FROM wallets WHERE account_id = 'acme'"
        )


def test_a_ledger_entry_must_name_an_existing_posting_and_ledger_account(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Migration 0008: checked once per statement by the trigger, not by per-row foreign keys."""
    open_account(conn, q, "acme")
    conn.execute("INSERT INTO postings (posting_id, kind) VALUES (999, 'adjustment')")
    acme = "(SELECT ledger_account_id FROM wallets WHERE account_id = 'acme')"
    revenue = "(SELECT ledger_account_id FROM ledger_accounts WHERE code = 'revenue:usage')"
    for posting, first, second in [
        (1000, acme, revenue),  # no such posting
        (999, acme, "-1"),  # no such ledger account
    ]:
        with (
            pytest.raises(psycopg.errors.ForeignKeyViolation, match="names a missing"),
            conn.transaction(),
        ):
            conn.execute(
                "INSERT INTO ledger_entries (posting_id, ledger_account_id, amount) "  # type: ignore[arg-type]
                f"VALUES ({posting}, {first}, 5), ({posting}, {second}, -5)"
            )
    conn.execute(
        "INSERT INTO ledger_entries (posting_id, ledger_account_id, amount) "  # type: ignore[arg-type]
        f"VALUES (999, {acme}, 5), (999, {revenue}, -5)"
    )
    # and neither can disappear afterwards
    with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
        conn.execute("DELETE FROM ledger_accounts WHERE code = 'revenue:usage'")
    with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
        conn.execute("DELETE FROM postings WHERE posting_id = 999")


def test_wallet_state_must_match_its_balance(conn: psycopg.Connection[Any], q: Queries) -> None:
    open_account(conn, q, "acme")
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE wallets SET state = 'exhausted' WHERE account_id = 'acme'")
