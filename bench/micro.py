"""Micro-measurements behind docs/performance.md's "what each choice bought", in one run.

Each line compares the chosen way with the way it replaced, on the same data, same process:

* msgspec decoding of a usage.v1 event with regex ``pattern`` constraints vs. plain ones;
* COPY text built by psycopg's ``write_row`` (37 adapted values) vs. one f-string per row;
* inserting 5,000 events into ``usage_events`` with vs. without the foreign keys we dropped.
* recording 5,000 new events by COPY into staging + one ``INSERT .. SELECT`` claiming keys
  and inserting rows vs. claiming the keys from an array + COPY straight into ``usage_events``.

    .venv/bin/python -m bench.micro
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
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
            try:
                with conn.transaction():
                    conn.execute(ddl)  # type: ignore[arg-type]
                    conn.execute(q["create_usage_staging"])
                    with conn.cursor() as cur, cur.copy(q["copy_usage_staging"]) as copy:
                        copy.write(data)
                    start = time.perf_counter()
                    conn.execute(q["insert_new_events"]).fetchall()
                    conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
                    seconds = time.perf_counter() - start
                    print(f"  {label:<44} {1e6 * seconds / 5_000:7.2f} us each")
                    raise _Rollback
            except _Rollback:
                pass

        print("recording 5,000 new events, table already holding 15,000 (wall time):")
        try:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO postings (posting_id, kind) VALUES (999999999999, 'usage')"
                )
                older = "".join(copy_line(p, SCRATCH_POSTING) for p in priced[5_000:])
                with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                    copy.write(older.encode())
                ids = [p.event.event_id for p in priced[:5_000]]
                for _ in range(3):  # alternate, so that neither way always runs on a cold cache
                    for label, record in (
                        ("COPY to staging + INSERT .. ON CONFLICT (before)", _via_staging),
                        ("key claim from an array + COPY into the table (now)", _direct),
                    ):
                        try:
                            with conn.transaction():
                                start = time.perf_counter()
                                record(conn, q, data, ids)
                                seconds = time.perf_counter() - start
                                print(f"  {label:<52} {1e6 * seconds / 5_000:7.2f} us each")
                                raise _Rollback
                        except _Rollback:
                            pass
                raise _Rollback  # leave the scratch rows out of the database
        except _Rollback:
            pass


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


class _Rollback(Exception):
    """Leave the scratch database as it was."""


if __name__ == "__main__":
    main()
