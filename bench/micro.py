"""Micro-measurements behind docs/performance.md's "what each choice bought", in one run.

Each line compares the chosen way with the way it replaced, on the same data, same process:

* msgspec decoding of a usage.v1 event with regex ``pattern`` constraints vs. plain ones;
* COPY text built by psycopg's ``write_row`` (37 adapted values) vs. one f-string per row;
* inserting 5,000 events into ``usage_events`` with vs. without the foreign keys we dropped.
* recording 5,000 new events by COPY into staging + one ``INSERT .. SELECT`` claiming keys
  and inserting rows vs. claiming the keys from an array + COPY straight into ``usage_events``;
* the ledger entries of one usage batch (666 wallets) checked by two foreign keys per row vs. by
  the balance trigger once per statement (migration 0008);
* the insert trigger's key probe, planned by a session while the key table was empty (a
  worker's first batch), then run over 30,000 keys: 0006's ``NOT EXISTS`` vs. 0007's per-row
  index look-up.

    .venv/bin/python -m bench.micro
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from bench.throughput import TEMPLATE, _recreate, _url, prepare_template
from billing import db
from billing.events import Usage, UsageEvent, encode_event
from billing.settings import Settings
from billing.synthetic import TrafficShape, generate
from billing.usage import copy_line, price_events, staging_row

Patterned = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]


class PatternedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: Literal["usage.v1"]
    event_id: Patterned
    occurred_at: datetime
    account_id: Patterned
    api_key_id: Patterned
    model: Patterned
    provider: Patterned
    byok: bool
    usage: Usage
    latency_ms: int | None = None
    ttft_ms: int | None = None


def rate(label: str, fn: object, items: list[object]) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {1e6 * seconds / len(items):7.2f} us each")
    return seconds


def main() -> None:
    accounts = [f"acct-{i:05d}" for i in range(1_000)]
    snap = prepare_template(accounts)
    events = list(
        generate(
            snap,
            TrafficShape(accounts=accounts, duplicate_share=0),
            20_000,
            seed=9,
            now=datetime.now(UTC),
            prefix="micro",
        )
    )
    bodies: list[object] = [encode_event(e) for e in events]

    print("decoding a usage.v1 event (msgspec):")
    rate(
        "with regex pattern constraints (before)",
        msgspec.json.Decoder(PatternedEvent).decode,
        bodies,
    )
    rate("plain length constraints (now)", msgspec.json.Decoder(UsageEvent).decode, bodies)

    priced, _ = price_events(events, snap)
    _recreate("billing_bench_micro", TEMPLATE)
    settings = replace(Settings.from_env({}), database_url=_url("billing_bench_micro"))
    q = db.queries(settings)
    with db.connect(settings) as conn:
        print("building COPY data for one event:")
        with conn.transaction():
            conn.execute(q["create_usage_staging"])
            with conn.cursor() as cur, cur.copy(q["copy_usage_staging"]) as copy:
                rate(
                    "psycopg write_row of 37 values (before)",
                    lambda p: copy.write_row(staging_row(p, 1)),
                    priced,
                )  # type: ignore[arg-type]
            rate("one f-string line (now)", lambda p: copy_line(p, 1), priced)  # type: ignore[arg-type]
            conn.execute("TRUNCATE usage_staging")

        print("inserting 5,000 events from staging (server time, EXPLAIN ANALYZE):")
        data = "".join(copy_line(p, SCRATCH_POSTING) for p in priced[:5_000]).encode()
        for label, ddl in (
            (
                "with account and posting foreign keys (before)",
                "ALTER TABLE usage_events ADD FOREIGN KEY (account_id) REFERENCES accounts; "
                "ALTER TABLE usage_events ADD FOREIGN KEY (posting_id) REFERENCES postings "
                "DEFERRABLE INITIALLY DEFERRED; INSERT INTO postings (posting_id, kind) "
                "VALUES (999999999999, 'usage')",
            ),
            (
                "without them (now)",
                "INSERT INTO postings (posting_id, kind) VALUES (999999999999, 'usage')",
            ),
        ):
            with rolled_back(conn):
                conn.execute(ddl)  # type: ignore[arg-type]
                conn.execute(q["create_usage_staging"])
                with conn.cursor() as cur, cur.copy(q["copy_usage_staging"]) as copy:
                    copy.write(data)
                start = time.perf_counter()
                conn.execute(q["insert_new_events"]).fetchall()
                conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
                seconds = time.perf_counter() - start
                print(f"  {label:<44} {1e6 * seconds / 5_000:7.2f} us each")

        print("recording 5,000 new events, table already holding 15,000 (wall time):")
        with rolled_back(conn):  # leave the scratch rows out of the database
            conn.execute("INSERT INTO postings (posting_id, kind) VALUES (999999999999, 'usage')")
            older = "".join(copy_line(p, SCRATCH_POSTING) for p in priced[5_000:])
            with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                copy.write(older.encode())
            ids = [p.event.event_id for p in priced[:5_000]]
            for _ in range(3):  # alternate, so that neither way always runs on a cold cache
                for label, record in (
                    ("COPY to staging + INSERT .. ON CONFLICT (before)", _via_staging),
                    ("key claim from an array + COPY into the table (now)", _direct),
                ):
                    with rolled_back(conn):
                        start = time.perf_counter()
                        record(conn, q, data, ids)
                        seconds = time.perf_counter() - start
                        print(f"  {label:<52} {1e6 * seconds / 5_000:7.2f} us each")

        _ledger_entry_checks(conn, q)
        _key_probe_on_a_plan_made_when_empty(conn, q, priced[:2_000])


def function_as_in(migration: str, name: str) -> str:
    """``name``'s definition as migration ``migration`` created it, to re-create the "before"."""
    text = next(MIGRATIONS.glob(f"{migration}_*.sql")).read_text()
    match = re.search(rf"CREATE FUNCTION {name}\(\).*?END \$\$;", text, re.DOTALL)
    assert match, f"{name} not found in migration {migration}"
    return match.group(0).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


@contextlib.contextmanager
def rolled_back(conn: Any) -> Iterator[None]:
    """A transaction that is always rolled back: the scratch database stays as it was."""
    try:
        with conn.transaction():
            yield
            raise _Rollback
    except _Rollback:
        pass


def _ledger_entry_checks(conn: Any, q: Any) -> None:
    """The wallet step's entry insert: 666 wallet entries + the revenue entry, one statement."""
    print("ledger entries of one usage batch (666 wallets + revenue), wall time:")
    wallets = conn.execute(
        "SELECT ledger_account_id FROM wallets ORDER BY account_id LIMIT 666"
    ).fetchall()
    revenue = conn.execute(q["ledger_account_id"], {"code": "revenue:usage"}).fetchone()[0]
    accounts = [w[0] for w in wallets] + [revenue]
    amounts = [-1] * len(wallets) + [len(wallets)]
    for _ in range(3):  # alternate, so that neither way always runs on a cold cache
        for label, ddl in (
            (
                "two foreign keys per row (before 0008)",
                function_as_in("0001", "billing_check_balanced")
                + "ALTER TABLE ledger_entries ADD FOREIGN KEY (posting_id) REFERENCES postings, "
                "ADD FOREIGN KEY (ledger_account_id) REFERENCES ledger_accounts",
            ),
            ("one check per statement in the trigger (now)", None),
        ):
            with rolled_back(conn):
                if ddl:
                    conn.execute(ddl)
                conn.execute(
                    "INSERT INTO postings (posting_id, kind) VALUES (999999999999, 'usage')"
                )
                start = time.perf_counter()
                conn.execute(
                    q["insert_entries"],
                    {
                        "posting_id": SCRATCH_POSTING,
                        "ledger_accounts": accounts,
                        "amounts": amounts,
                    },
                )
                seconds = time.perf_counter() - start
                print(f"  {label:<52} {1e3 * seconds:7.2f} ms")


def _key_probe_on_a_plan_made_when_empty(conn: Any, q: Any, priced: list[Any]) -> None:
    print(f"COPY of {len(priced):,} events, key table of 30,000 keys, probe planned when empty:")
    data = "".join(copy_line(p, SCRATCH_POSTING) for p in priced).encode()
    first = copy_line(priced[0], SCRATCH_POSTING).replace(priced[0].event.event_id, "first", 1)
    for label, ddl in (
        ("NOT EXISTS (0006)", function_as_in("0006", "billing_claim_event_keys")),
        ("index look-up per row, seq scans off (0007, now)", None),
    ):
        with rolled_back(conn):
            if ddl:
                conn.execute(ddl)
            conn.execute("INSERT INTO postings (posting_id, kind) VALUES (999999999999, 'usage')")
            conn.execute("ANALYZE usage_event_keys")  # statistics: empty
            with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                copy.write(first.encode())  # this session plans the probe now
            conn.execute(
                "INSERT INTO usage_event_keys (event_id, recorded_at) "
                "SELECT 'old-' || g, now() - interval '1 day' FROM generate_series(1, 30000) g"
            )
            start = time.perf_counter()
            with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                copy.write(data)
            seconds = time.perf_counter() - start
            print(f"  {label:<52} {1e6 * seconds / len(priced):7.2f} us each")


def _via_staging(conn: Any, q: Any, data: bytes, ids: list[str]) -> None:
    conn.execute(q["create_usage_staging"])
    with conn.cursor() as cur, cur.copy(q["copy_usage_staging"]) as copy:
        copy.write(data)
    conn.execute(q["insert_new_events"]).fetchall()


def _direct(conn: Any, q: Any, data: bytes, ids: list[str]) -> None:
    conn.execute(q["claim_event_keys"], {"event_ids": sorted(ids)}).fetchall()
    with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
        copy.write(data)


SCRATCH_POSTING = 999_999_999_999
MIGRATIONS = Path(__file__).resolve().parent.parent / "sql" / "migrations"


class _Rollback(Exception):
    """Leave the scratch database as it was."""


if __name__ == "__main__":
    main()
