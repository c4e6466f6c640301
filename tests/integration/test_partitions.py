"""usage_events in monthly partitions: exactly once across partitions, migration, upkeep."""

from __future__ import annotations

import shutil
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from billing import db, deadletters, partitions
from billing.audit import run_audit
from billing.catalog import snapshot
from billing.cli import main
from billing.db import Queries
from billing.errors import Transient
from billing.events import encode_event
from billing.settings import Settings
from billing.usage import decode_and_price, record_isolating

from .conftest import _admin, _url_for, worker_env
from .helpers import balances, make_event, open_account

COLUMNS_0001 = (
    "event_id, occurred_at, recorded_at, account_id, api_key_id, model, provider, byok, "
    "price_effective_from, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, "
    "reasoning_tokens, image_count, web_search_count, input_amount, cached_input_amount, "
    "cache_write_amount, output_amount, image_amount, web_search_amount, request_amount, amount, "
    "debited, posting_id, latency_ms, ttft_ms"
)


def insert_historical_byok(
    conn: psycopg.Connection[Any], event_id: str, account_id: str, recorded_at: datetime
) -> None:
    """A BYOK event recorded in an earlier month (no money moved), claiming its key."""
    conn.execute(
        f"""WITH k AS (INSERT INTO usage_event_keys VALUES (%(id)s, %(at)s) RETURNING event_id)
            INSERT INTO usage_events ({COLUMNS_0001})
            SELECT %(id)s, %(at)s - interval '1 second', %(at)s, %(acct)s, 'key-1',
                   'openai/o4-mini', 'openai', true, '2020-01-01', 1000, 0, 0, 500, 0, 0, 0,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, NULL FROM k""",  # type: ignore[arg-type]
        {"id": event_id, "at": recorded_at, "acct": account_id},
    )


def partition_of(conn: psycopg.Connection[Any], event_id: str) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            "SELECT tableoid::regclass::text FROM usage_events WHERE event_id = %s", (event_id,)
        )
    ]


def record(conn: psycopg.Connection[Any], q: Queries, settings: Settings, *events: Any) -> Any:
    priced, rejected = decode_and_price(
        [e if isinstance(e, bytes) else encode_event(e) for e in events],
        snapshot(conn, q),
        settings,
        datetime.now(UTC),
    )
    return record_isolating(conn, q, priced, rejected)


def test_a_duplicate_of_an_event_recorded_in_an_earlier_month_debits_nothing(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    open_account(conn, q, "acme", "10")
    last_month = datetime.now(UTC).replace(day=1, hour=12) - timedelta(days=5)
    created = partitions.ensure_partitions(conn, q, last_month, 3)
    assert partitions.list_partitions(conn, q)[0].name in created
    insert_historical_byok(conn, "ev-old", "acme", last_month)
    before = balances(conn)

    # The same event again, found in last month's partition: a duplicate. The same event_id now
    # as a paid event (this month's partition) is not billed either: its content conflicts with
    # the recorded copy, so it is parked, never dropped in silence.
    old_byok = make_event("ev-old", occurred_at=last_month - timedelta(seconds=1), byok=True)
    paid = make_event("ev-old")
    new = make_event("ev-new")
    result = record(conn, q, settings, old_byok, paid, new)
    assert (result.debited, result.duplicates, result.parked) == (1, 1, 1)
    assert result.parked_reasons == {"conflicting_duplicate": 1}
    assert partition_of(conn, "ev-old") == [f"usage_events_y{last_month:%Y}m{last_month:%m}"]
    now = datetime.now(UTC)
    assert partition_of(conn, "ev-new") == [f"usage_events_y{now:%Y}m{now:%m}"]
    assert balances(conn)["acme"] < before["acme"]  # only ev-new was debited
    again = record(conn, q, settings, paid, new)
    assert (again.debited, again.duplicates, again.parked) == (0, 1, 1)
    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert report.states["debited"] == 1 and report.states["byok"] == 1


COPY_ROW = (
    "{id}\t2026-01-01T00:00:00+00:00\tacme\tkey-1\topenai/o4-mini\topenai\tt\t"
    "2020-01-01T00:00:00+00:00\t1\t0\t0\t1\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0"
    "\t\\N\t\\N\t\\N\n"
)
COPY_SQL = f"COPY usage_events ({COLUMNS_0001.replace('recorded_at, ', '')}) FROM STDIN"


def copy_events(conn: psycopg.Connection[Any], *event_ids: str) -> None:
    """Insert BYOK events the way a COPY path does: no key claimed by the caller."""
    with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:  # type: ignore[arg-type]
        copy.write("".join(COPY_ROW.format(id=e) for e in event_ids))


def test_every_insert_path_records_an_event_at_most_once(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    open_account(conn, q, "acme", "10")
    record(conn, q, settings, make_event("ev-1"))
    # A second copy at another recorded_at (another partition's range) by a plain INSERT: the
    # primary key (event_id, recorded_at) alone would allow it; the key the trigger claims refuses.
    with pytest.raises(psycopg.errors.UniqueViolation, match="usage_event_keys_pkey"):
        conn.execute(
            f"""INSERT INTO usage_events ({COLUMNS_0001})
                SELECT event_id, occurred_at, recorded_at + interval '1 month', account_id,
                       api_key_id, model, provider, byok, price_effective_from, input_tokens,
                       cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
                       image_count, web_search_count, input_amount, cached_input_amount,
                       cache_write_amount, output_amount, image_amount, web_search_amount,
                       request_amount, amount, debited, posting_id, latency_ms, ttft_ms
                FROM usage_events WHERE event_id = 'ev-1'"""  # type: ignore[arg-type]
        )
    # A COPY (no key claimed by the caller) gets its keys from the trigger, and a duplicate of a
    # recorded event in a COPY is refused.
    copy_events(conn, "ev-2", "ev-3")
    keys = conn.execute("SELECT event_id FROM usage_event_keys ORDER BY 1").fetchall()
    assert keys == [("ev-1",), ("ev-2",), ("ev-3",)]
    with pytest.raises(psycopg.errors.UniqueViolation, match="usage_event_keys_pkey"):
        copy_events(conn, "ev-4", "ev-2")
    # Even with the key pre-claimed at the same recorded_at (the trigger then skips it), a second
    # row in the same partition is refused by the partition's primary key.
    with conn.transaction():
        copy_events(conn, "ev-5")
        with pytest.raises(psycopg.errors.UniqueViolation, match="pkey"), conn.transaction():
            copy_events(conn, "ev-5")
    with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
        conn.execute("DELETE FROM usage_event_keys")
    with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
        conn.execute("UPDATE usage_events SET debited = 0")
    rows = conn.execute("SELECT event_id FROM usage_events ORDER BY 1").fetchall()
    assert rows == [("ev-1",), ("ev-2",), ("ev-3",), ("ev-5",)]
    assert run_audit(conn, q).ok


def test_the_insert_trigger_probes_each_key_by_index_whatever_the_table_size(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    """Migration 0007: one index look-up per inserted row, never a scan of every key.

    0006's NOT EXISTS became a hash anti join over a sequential scan of ``usage_event_keys`` when
    the statement was large or the table's statistics stale, so the cost per event grew with the
    table (docs/performance.md). A plan made while the table was empty (a worker's first batch)
    is kept by the session, so the probe must be an index look-up whatever the statistics say.
    """
    open_account(conn, q, "acme", "10")
    conn.execute("ANALYZE usage_event_keys")  # statistics say: empty
    copy_events(conn, "first")  # the session plans the probe while the key table is empty
    conn.execute(
        "INSERT INTO usage_event_keys (event_id, recorded_at) "
        "SELECT 'old-' || g, now() - interval '1 day' FROM generate_series(1, 100000) g"
    )
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
        conn.execute(f"SET auto_explain.{setting}")  # type: ignore[arg-type]
    copy_events(conn, *(f"new-{i:05d}" for i in range(20_000)))
    conn.execute("RESET auto_explain.log_min_duration")
    probe = [p for p in plans if "INSERT INTO usage_event_keys" in p]
    assert probe, plans
    assert "Index Scan using usage_event_keys_pkey" in probe[0], probe[0]
    assert "Seq Scan on usage_event_keys" not in probe[0], probe[0]
    assert conn.execute("SELECT count(*) FROM usage_event_keys").fetchone() == (120_001,)


def test_two_writers_of_one_event_across_partitions_record_it_once(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    """Writer A holds the event uncommitted; writer B (another transaction, so another
    recorded_at) inserts the same event by COPY: B waits on A's key, then is refused."""
    outcome: list[object] = []
    with db.connect(settings) as other:
        with conn.transaction():
            copy_events(conn, "ev-x")

            def writer_b() -> None:
                try:
                    with other.transaction():
                        copy_events(other, "ev-x")
                    outcome.append("recorded")
                except psycopg.errors.UniqueViolation as exc:
                    outcome.append(exc.diag.constraint_name)

            thread = threading.Thread(target=writer_b)
            thread.start()
            thread.join(timeout=1.0)
            assert thread.is_alive(), "B must wait for A's uncommitted key"
        thread.join(timeout=30)
    assert outcome == ["usage_event_keys_pkey"]
    assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (1,)
    # The batch path (keys claimed with ON CONFLICT DO NOTHING) skips instead of failing.
    open_account(conn, q, "acme", "10")
    copied = make_event(  # what COPY_ROW recorded
        "ev-x",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        byok=True,
        input_tokens=1,
        output_tokens=1,
    )
    result = record(conn, q, settings, copied, make_event("ev-y"))
    assert (result.debited, result.duplicates, result.parked) == (1, 1, 0)


def test_the_audit_finds_an_event_without_its_key(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    open_account(conn, q, "acme", "10")
    record(conn, q, settings, make_event("ev-1"))
    conn.execute("ALTER TABLE usage_events DISABLE TRIGGER usage_events_claim_keys")
    conn.execute(
        f"""INSERT INTO usage_events ({COLUMNS_0001})
            SELECT 'ev-forged', occurred_at, recorded_at, account_id, api_key_id, model,
                   provider, true, price_effective_from, input_tokens, cached_input_tokens,
                   cache_write_tokens, output_tokens, reasoning_tokens, image_count,
                   web_search_count, input_amount, cached_input_amount, cache_write_amount,
                   output_amount, image_amount, web_search_amount, request_amount, amount, 0,
                   NULL, latency_ms, ttft_ms
            FROM usage_events WHERE event_id = 'ev-1'"""  # type: ignore[arg-type]
    )
    failed = {c.name: c.violations for c in run_audit(conn, q).checks if not c.ok}
    assert list(failed) == ["every event holds its idempotency key, each key its event"]
    assert failed[next(iter(failed))][0]["event_id"] == "ev-forged"


def test_migration_0006_keeps_every_row_column_index_and_trigger(tmp_path: Path) -> None:
    """Upgrade a database holding events (and a column, index and trigger another migration
    added) to the partitioned table."""
    repo_sql = Settings().sql_dir
    old_sql = tmp_path / "sql"
    shutil.copytree(repo_sql, old_sql)
    for path in (old_sql / "migrations").glob("*.sql"):
        if int(path.name[:4]) >= 6:
            path.unlink()
    name = f"billing_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(_url_for(name), autocommit=True) as conn:
            db.migrate(conn, old_sql)
            conn.execute(
                "ALTER TABLE usage_events ADD COLUMN audio_seconds bigint NOT NULL DEFAULT 0"
            )
            conn.execute("CREATE INDEX usage_events_model ON usage_events (model, recorded_at)")
            conn.execute(
                "CREATE TRIGGER usage_events_extra BEFORE INSERT ON usage_events "
                "FOR EACH ROW EXECUTE FUNCTION billing_forbid_change()"
            )
            conn.execute("ALTER TABLE usage_events DISABLE TRIGGER usage_events_extra")
            columns_before = conn.execute(
                "SELECT column_name, data_type, column_default, is_nullable "
                "FROM information_schema.columns WHERE table_name = 'usage_events' "
                "ORDER BY ordinal_position"
            ).fetchall()
            for i, at in enumerate(("2025-01-15T10:00:00Z", "2025-03-31T23:59:59Z")):
                conn.execute(
                    f"""INSERT INTO usage_events ({COLUMNS_0001}, audio_seconds)
                        VALUES (%s, %s, %s, 'acme', 'k', 'm', 'p', true, '2020-01-01',
                                1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL,
                                NULL, 7)""",  # type: ignore[arg-type]
                    (f"ev-{i}", at, at),
                )

            applied = db.migrate(conn, repo_sql)
            assert any(a.startswith("0006_") for a in applied)

            assert conn.execute(
                "SELECT relkind FROM pg_class WHERE relname = 'usage_events'"
            ).fetchone() == ("p",)
            columns_after = conn.execute(
                "SELECT column_name, data_type, column_default, is_nullable "
                "FROM information_schema.columns WHERE table_name = 'usage_events' "
                "ORDER BY ordinal_position"
            ).fetchall()
            assert columns_after == columns_before
            rows = conn.execute(
                "SELECT event_id, tableoid::regclass::text, audio_seconds FROM usage_events "
                "ORDER BY event_id"
            ).fetchall()
            assert rows == [
                ("ev-0", "usage_events_y2025m01", 7),
                ("ev-1", "usage_events_y2025m03", 7),
            ]
            keys = conn.execute("SELECT count(*) FROM usage_event_keys").fetchone()
            assert keys == (2,)
            indexes = {
                r[0]
                for r in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_events'"
                )
            }
            assert {
                "usage_events_pkey",
                "usage_events_account_recorded",
                "usage_events_model",
            } <= indexes
            triggers = {
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT tgname, tgenabled FROM pg_trigger "
                    "WHERE tgrelid = 'usage_events'::regclass AND NOT tgisinternal"
                )
            }
            assert {
                ("usage_events_append_only", "O"),
                ("usage_events_no_truncate", "O"),
                ("usage_events_claim_keys", "O"),
                ("usage_events_extra", "D"),
            } <= triggers
            with pytest.raises(psycopg.errors.RestrictViolation):
                conn.execute("DELETE FROM usage_events_y2025m01")
            # every month from the oldest event to 3 months ahead has its partition
            now = datetime.now(UTC)
            months = (now.year - 2025) * 12 + now.month - 1 + 3
            assert len(partitions.list_partitions(conn, db.Queries(repo_sql))) == months + 1
    finally:
        with _admin() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_partition_upkeep_and_its_audit(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    now = datetime.now(UTC)
    assert partitions.ensure_partitions(conn, q, now, 3) == []  # the migration made them
    ahead = partitions.ensure_partitions(conn, q, now, 5)
    assert len(ahead) == 2
    assert partitions.ensure_partitions(conn, q, now, 5) == []
    assert run_audit(conn, q).ok
    this_month = f"usage_events_y{now:%Y}m{now:%m}"
    conn.execute(f"ALTER TABLE usage_events DETACH PARTITION {this_month}")  # type: ignore[arg-type]
    conn.execute(f"DROP TABLE {this_month}")  # type: ignore[arg-type]
    failed = {c.name: c.violations for c in run_audit(conn, q).checks if not c.ok}
    assert failed == {
        "usage_events has partitions for this month and next": [{"missing_partition": this_month}]
    }
    # Without its partition a batch is held back as transient (the worker backs off and retries;
    # nothing is parked: billing.db.map_error), and recorded after the upkeep.
    open_account(conn, q, "acme", "10")
    with pytest.raises(Transient, match="partitions ensure"):
        record(conn, q, settings, make_event("ev-1", input_tokens=1_000), make_event("ev-2"))
    assert deadletters.list_dead_letters(conn, q) == []
    cli = CliRunner(env=worker_env(settings))
    result = cli.invoke(main, ["partitions", "ensure"], catch_exceptions=False)
    assert result.exit_code == 0 and this_month in result.output
    listed = cli.invoke(main, ["partitions", "list", "--json"], catch_exceptions=False)
    assert this_month in listed.output
    assert record(conn, q, settings, make_event("ev-1", input_tokens=1_000)).debited == 1
    assert run_audit(conn, q).ok


def test_retention_purges_old_payloads_but_never_parked_ones(
    conn: psycopg.Connection[Any], q: Queries, settings: Settings
) -> None:
    record(conn, q, settings, b"{not json", b'{"schema": "usage.v1"}')
    ids = [r[0] for r in conn.execute("SELECT dead_letter_id FROM dead_letters ORDER BY 1")]
    assert len(ids) == 2
    deadletters.discard(conn, q, [ids[0]], reason="test", actor="tests")
    conn.execute(
        "UPDATE dead_letters SET resolved_at = now() - interval '100 days', "
        "last_seen_at = now() - interval '100 days'"
    )
    conn.execute(
        "INSERT INTO stripe_events (event_id, type, payload, event, processed_at) VALUES "
        "('evt_old', 'charge.succeeded', 'raw', '{}', now() - interval '100 days'), "
        "('evt_new', 'charge.succeeded', 'raw', '{}', now()), "
        "('evt_pending', 'charge.succeeded', 'raw', '{}', NULL)"
    )
    result = partitions.purge_payloads(conn, q, datetime.now(UTC), 90)
    assert (result.dead_letters, result.stripe_events) == (1, 1)
    assert conn.execute(
        "SELECT dead_letter_id, payload IS NULL FROM dead_letters ORDER BY 1"
    ).fetchall() == [(ids[0], True), (ids[1], False)]
    assert conn.execute("SELECT event_id FROM stripe_events WHERE payload IS NULL").fetchall() == [
        ("evt_old",)
    ]
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE dead_letters SET payload = NULL WHERE status = 'parked'")
    cli = CliRunner(env=worker_env(settings))
    out = cli.invoke(main, ["retention", "run", "--days", "1"], catch_exceptions=False)
    assert out.exit_code == 0
    assert "0 dead letter(s), 0 Stripe event(s)" in " ".join(out.output.split())
