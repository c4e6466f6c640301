"""Fleet export benchmark: a month of N usage events for M accounts, exported; time and peak RSS.

    .venv/bin/python bench/export_bench.py                       # small: 200k events, 500 accounts
    .venv/bin/python bench/export_bench.py --events 10000000 --accounts 10000   # the full run

The data is generated inside PostgreSQL (``INSERT .. SELECT generate_series``) in a database of
its own (created from ``--admin-url``, dropped afterwards unless ``--keep``): accounts and wallets,
an opening credit posted the day before the period, N usage events spread over the month on
``--models`` priced (model, provider) versions from the shipped catalog (5% BYOK), one usage
posting per account and day whose time is the events' ``recorded_at`` (as the batch writer
does), and balanced ledger entries. The export then runs in a child process so its peak RSS
(``ru_maxrss``) is measured alone, and the result is checked: the exported usage total equals
the sum of ``debited`` in the database.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing import catalog, db  # noqa: E402
from billing.exports.statements import Period  # noqa: E402
from billing.settings import Settings  # noqa: E402

GENERATE_ACCOUNTS = """
INSERT INTO accounts (account_id, name)
SELECT 'acct-' || lpad(i::text, 6, '0'), 'Bench ' || i FROM generate_series(1, %(accounts)s) i;
INSERT INTO ledger_accounts (code, kind)
SELECT 'wallet:' || account_id, 'wallet' FROM accounts ORDER BY account_id;
INSERT INTO wallets (account_id, ledger_account_id)
SELECT a.account_id, la.ledger_account_id
FROM accounts a JOIN ledger_accounts la ON la.code = 'wallet:' || a.account_id;
"""

# Versions in force at the period start that price both input and output tokens.
GENERATE_EVENTS = """
CREATE TEMP TABLE bench_versions AS
WITH latest AS (
    SELECT model, provider, max(effective_from) AS effective_from
    FROM prices WHERE effective_from <= %(start)s GROUP BY model, provider
)
SELECT row_number() OVER (ORDER BY l.model, l.provider) - 1 AS n, l.model, l.provider,
       l.effective_from, i.unit_price / i.per AS input_unit, o.unit_price / o.per AS output_unit
FROM latest l
JOIN prices i ON (i.model, i.provider, i.effective_from, i.billable_class)
              = (l.model, l.provider, l.effective_from, 'input_tokens')
JOIN prices o ON (o.model, o.provider, o.effective_from, o.billable_class)
              = (l.model, l.provider, l.effective_from, 'output_tokens')
WHERE i.unit_price > 0 AND o.unit_price > 0 AND NOT EXISTS (
    SELECT 1 FROM prices r WHERE (r.model, r.provider, r.effective_from, r.billable_class)
                               = (l.model, l.provider, l.effective_from, 'request'))
ORDER BY l.model, l.provider
LIMIT %(models)s;

-- usage_events is partitioned by month (0006): the period's partitions must exist.
SELECT billing_ensure_usage_partitions(%(start)s, 3);

INSERT INTO usage_events (
    event_id, occurred_at, recorded_at, account_id, api_key_id, model, provider, byok,
    price_effective_from, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
    reasoning_tokens, image_count, web_search_count, input_amount, cached_input_amount,
    cache_write_amount, output_amount, image_amount, web_search_amount, request_amount, amount,
    debited, posting_id, latency_ms, ttft_ms)
SELECT 'ev-' || e.i, e.recorded_at - interval '2 seconds', e.recorded_at, e.account_id, 'key-1',
       v.model, v.provider, e.byok, v.effective_from,
       e.input_tokens, 0, 0, e.output_tokens, 0, 0, 0,
       e.input_tokens * v.input_unit, 0, 0, e.output_tokens * v.output_unit, 0, 0, 0,
       e.input_tokens * v.input_unit + e.output_tokens * v.output_unit,
       CASE WHEN e.byok THEN 0 ELSE e.input_tokens * v.input_unit
                                    + e.output_tokens * v.output_unit END,
       CASE WHEN e.byok THEN NULL ELSE %(base)s + e.day * %(accounts)s + e.a END,
       300 + (e.i * 7919) %% 5000, 80 + (e.i * 104729) %% 900
FROM (
    SELECT i, a, day, byok, input_tokens, output_tokens,
           'acct-' || lpad((a + 1)::text, 6, '0') AS account_id,
           %(start)s::timestamptz + day * interval '1 day' + a * interval '1 second'
               AS recorded_at
    FROM (
        SELECT i, (i %% %(accounts)s) AS a, ((i / %(accounts)s) %% %(days)s) AS day,
               (i %% 20 = 0) AS byok,
               100 + (i * 7919) %% 5000 AS input_tokens, 10 + (i * 104729) %% 2000 AS output_tokens
        FROM generate_series(0::bigint, %(events)s - 1) i
    ) raw
) e
JOIN bench_versions v ON v.n = (e.i / 7) %% (SELECT count(*) FROM bench_versions);
"""

GENERATE_LEDGER = """
-- One usage posting per account and day that has debits, at the events' recorded_at.
CREATE TEMP TABLE bench_postings AS
SELECT posting_id, account_id, min(recorded_at) AS created_at, sum(debited) AS debited
FROM usage_events WHERE posting_id IS NOT NULL GROUP BY posting_id, account_id;
INSERT INTO postings (posting_id, kind, reference, created_at)
SELECT posting_id, 'usage', 'bench:' || posting_id, created_at FROM bench_postings;
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount, created_at)
SELECT p.posting_id, x.ledger_account_id, x.amount, p.created_at
FROM bench_postings p
JOIN wallets w USING (account_id)
CROSS JOIN LATERAL (VALUES
    (w.ledger_account_id, -p.debited),
    ((SELECT ledger_account_id FROM ledger_accounts WHERE code = 'revenue:usage'), p.debited)
) AS x(ledger_account_id, amount);

-- An opening credit the day before the period, one posting per account.
CREATE TEMP TABLE bench_credits AS
SELECT %(base)s - row_number() OVER (ORDER BY account_id) AS posting_id, account_id,
       ledger_account_id
FROM wallets;
INSERT INTO postings (posting_id, kind, memo, actor, created_at)
SELECT posting_id, 'adjustment', 'bench opening credit', 'bench',
       %(start)s::timestamptz - interval '1 day'
FROM bench_credits;
INSERT INTO ledger_entries (posting_id, ledger_account_id, amount, created_at)
SELECT c.posting_id, x.ledger_account_id, x.amount, %(start)s::timestamptz - interval '1 day'
FROM bench_credits c
CROSS JOIN LATERAL (VALUES
    (c.ledger_account_id, 100::numeric),
    ((SELECT ledger_account_id FROM ledger_accounts WHERE code = 'equity:adjustments'),
     -100::numeric)
) AS x(ledger_account_id, amount);

UPDATE wallets w SET balance = s.total,
       state = CASE WHEN s.total > 0 THEN 'active' ELSE 'exhausted' END
FROM (SELECT ledger_account_id, sum(amount) AS total FROM ledger_entries
      GROUP BY ledger_account_id) s
WHERE s.ledger_account_id = w.ledger_account_id;
SELECT setval('posting_ids', (SELECT max(posting_id) FROM postings));
ANALYZE;
"""


def _url(admin_url: str, database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)


def generate(url: str, period: Period, events: int, accounts: int, models: int) -> dict[str, Any]:
    settings = replace(Settings.from_env({}), database_url=url)
    start = datetime(period.year, period.month, 1, tzinfo=UTC)
    end_p = period.next()
    days = (datetime(end_p.year, end_p.month, 1, tzinfo=UTC) - start).days
    params = {
        "accounts": accounts,
        "events": events,
        "start": start,
        "days": days,
        "models": models,
        "base": 10_000_000,  # usage postings from here up; opening credits just below
    }
    timings: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        t = time.monotonic()
        db.migrate(conn, settings.sql_dir)
        catalog.load_versions(
            conn,
            db.queries(settings),
            catalog.read_catalog_file(catalog.DEFAULT_CATALOG),
            now=datetime.now(UTC),
            loaded_by="bench",
        )
        with conn.transaction():
            for script in (GENERATE_ACCOUNTS, GENERATE_EVENTS, GENERATE_LEDGER):
                for statement in script.split(";\n"):
                    code = "\n".join(
                        line for line in statement.splitlines() if not line.startswith("--")
                    )
                    if code.strip():
                        conn.execute(code, params)
        timings["generate_s"] = round(time.monotonic() - t, 1)
        row = conn.execute(
            "SELECT count(*), coalesce(sum(debited), 0), pg_database_size(current_database()) "
            "FROM usage_events"
        ).fetchone()
        assert row is not None
        timings.update(events=row[0], debited=str(row[1]), db_bytes=row[2])
    return timings


def run_export(url: str, period: str, fmt: str, out: Path) -> None:
    """The child process: export and print the result as JSON (its RSS is measured alone)."""
    from billing.exports.fleet import export_period

    settings = replace(Settings.from_env({}), database_url=url)
    result = export_period(settings, period, fmt, out)
    usage = result.usage
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "accounts_exported": result.accounts,
                "files": len(result.files),
                "bytes": sum(p.stat().st_size for p in result.files),
                "usage": str(usage),
                "export_s": round(result.seconds, 2),
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--models", type=int, default=12, help="(model, provider) versions used")
    parser.add_argument("--period", default="2026-10")
    parser.add_argument("--format", dest="fmt", default="parquet")
    parser.add_argument("--out", type=Path, default=Path("/tmp/billing-export-bench"))
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", default="billing_export_bench")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="export an existing bench database")
    parser.add_argument("--audit", action="store_true", help="run billing audit on the data")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = _url(args.admin_url, args.database)
    if args.child:
        run_export(url, args.period, args.fmt, args.out)
        return

    name = sql.Identifier(args.database)
    report: dict[str, Any] = {
        "events_requested": args.events,
        "accounts": args.accounts,
        "format": args.fmt,
    }
    if not args.reuse:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
        report.update(
            generate(url, Period.parse(args.period), args.events, args.accounts, args.models)
        )
    try:
        if args.audit:
            from billing.audit import run_audit

            settings = replace(Settings.from_env({}), database_url=url)
            with psycopg.connect(url, autocommit=True) as conn:
                audit = run_audit(conn, db.queries(settings))
            report["audit"] = "clean" if audit.ok else [c.name for c in audit.checks if not c.ok]
        t = time.monotonic()
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--admin-url",
                args.admin_url,
                "--database",
                args.database,
                "--period",
                args.period,
                "--format",
                args.fmt,
                "--out",
                str(args.out),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        report["wall_s"] = round(time.monotonic() - t, 2)
        report.update(json.loads(child.stdout.strip().splitlines()[-1]))
        if "debited" in report:
            assert report["usage"] == report["debited"], "export total != database total"
    finally:
        if not args.keep:
            with psycopg.connect(args.admin_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
