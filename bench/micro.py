"""Micro-measurements behind docs/performance.md's "what each choice bought", in one run.

Each line compares the chosen way with the way it replaced, on the same data, same process:

* msgspec decoding of a usage.v1 event with regex ``pattern`` constraints vs. plain ones;
* COPY text built by psycopg's ``write_row`` (37 adapted values) vs. one f-string per row;
* inserting 5,000 events into ``usage_events`` with vs. without the foreign keys we dropped.
* recording 5,000 new events by COPY into staging + one ``INSERT .. SELECT`` claiming keys
  and inserting rows vs. claiming the keys from an array + COPY straight into ``usage_events``;
* the ledger entries of one usage batch (666 wallets) checked by two foreign keys per row vs. by
  the balance trigger once per statement (migration 0008);
* a posting's wallet step over 651 of 1,000 and 1,291 of 10,000 wallets (a batch of 5,000 events
  at 1,000 and 10,000 accounts): migration 0008's three statements, trigger and index vs. 0009's
  entries joined to their wallets and one UPDATE in account order;
* the insert trigger's key probe, planned by a session while the key table was empty (a
  worker's first batch), then run over 30,000 keys: 0006's ``NOT EXISTS`` vs. 0007's per-row
  index look-up;
* an envelope of 100 valid events decoded as the envelope then each event from its bytes vs.
  in one typed pass (best of 7 passes);
* the worker's Python hot path, best of 7 passes over the same 20,000 events: the COPY line with
  ``datetime.isoformat`` and one escape call per name vs. now; the pricing loop
  over every class vs. over the classes used; the claim's 5,000 ids sent as a ``text[]``
  parameter vs. as one newline-separated text (round trip of a statement that only counts them).

    .venv/bin/python -m bench.micro
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from bench.throughput import TEMPLATE, _recreate, _url, prepare_template
from billing import db
from billing.catalog import CLASS_ORDER, BillableClass
from billing.db import text_array
from billing.errors import Unpriced
from billing.events import (
    Usage,
    UsageEvent,
    decode_message,
    encode_envelope,
    encode_event,
    envelope_items,
)
from billing.ledger import WalletChange, WalletState
from billing.money import EXACT, ZERO
from billing.pricing import Charge, price, quantities
from billing.settings import Settings
from billing.spend_controls import BatchControls, SpendPlan, after_debit
from billing.synthetic import TrafficShape, generate
from billing.usage import claim_event_keys, copy_line, extension_text, price_events, staging_row

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
    envelopes: list[object] = [
        encode_envelope(events[i : i + 100]) for i in range(0, len(events), 100)
    ]
    print("decoding an envelope of 100 valid events, per event:")
    now, skew = datetime.now(UTC), timedelta(minutes=5)
    best_of(
        "the envelope, then each event from its bytes (before)",  # its schema probe not timed
        lambda: [envelope_items(b, now, skew) for b in envelopes],  # type: ignore[arg-type]
        len(events),
    )
    best_of(
        "one typed pass over the envelope (now)",
        lambda: [decode_message(b, now, skew, 1 << 20) for b in envelopes],  # type: ignore[arg-type]
        len(events),
    )

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
        _wallet_lock_hold(conn, q, priced[:5_000])
        _wallet_step(conn, q, 651)  # a batch of 5,000 events over 1,000 accounts
        with conn.transaction():  # 10x the accounts: 9,000 more (empty) wallets
            conn.execute(q["empty_wallets_in_bulk"], {"prefix": "wide-", "n": 9_000})
        conn.execute("VACUUM ANALYZE wallets")
        _wallet_step(conn, q, 1_291)  # ... over 10,000 accounts
        _key_probe_on_a_plan_made_when_empty(conn, q, priced[:2_000])
        _python_hot_path(conn, priced)


def function_as_in(migration: str, name: str) -> str:
    """``name``'s definition as migration ``migration`` created it, to re-create the "before"."""
    text = next(MIGRATIONS.glob(f"{migration}_*.sql")).read_text()
    match = re.search(rf"CREATE (?:OR REPLACE )?FUNCTION {name}\(\).*?END \$\$;", text, re.DOTALL)
    assert match, f"{name} not found in migration {migration}"
    return re.sub(r"^CREATE (OR REPLACE )?FUNCTION", "CREATE OR REPLACE FUNCTION", match.group(0))


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
                    q["before_0009_insert_entries"],  # by ledger account, as 0008 measured it
                    {
                        "posting_id": SCRATCH_POSTING,
                        "ledger_accounts": text_array(accounts),
                        "amounts": text_array(amounts),
                    },
                )
                seconds = time.perf_counter() - start
                print(f"  {label:<52} {1e3 * seconds:7.2f} ms")


def _usage_entries(
    conn: Any, q: Any, accounts: list[str], amounts: list[Decimal], revenue: int
) -> None:
    """The scratch posting's entries as a usage batch writes them: the wallets', and revenue's."""
    conn.execute(
        q["insert_entries"],
        {
            "posting_id": SCRATCH_POSTING,
            "accounts": text_array(accounts),
            "amounts": text_array(amounts),
            "system_accounts": str(revenue),
            "system_amounts": str(-sum(amounts)),
        },
    )


def _wallet_lock_hold(conn: Any, q: Any, batch: list[Any]) -> None:
    """How long a usage batch holds its wallets' row locks (from the lock to the end of the
    spend-controls statement; the commit after it is the same either way)."""
    deltas: dict[str, Decimal] = {}
    for p in batch:
        if not p.event.byok:
            deltas[p.event.account_id] = deltas.get(p.event.account_id, ZERO) - p.charge.total
    accounts = sorted(deltas)
    amounts = [deltas[a] for a in accounts]
    controls = BatchControls.read(conn, q, sorted({p.event.account_id for p in batch}))
    revenue = conn.execute(q["ledger_account_id"], {"code": "revenue:usage"}).fetchone()[0]
    print(f"wallet row locks held by one usage batch ({len(accounts)} wallets), wall time:")

    def entries() -> None:
        conn.execute(q["insert_posting"], dict.fromkeys(POSTING_FIELDS) | SCRATCH)
        _usage_entries(conn, q, accounts, amounts, revenue)

    def lock_and_update() -> list[WalletChange]:
        rows = conn.execute(
            q["debit_wallets"], {"accounts": text_array(accounts), "amounts": text_array(amounts)}
        )
        return [WalletChange(a, WalletState(old), WalletState(st), b) for a, b, st, old in rows]

    for _ in range(3):  # alternate, so that neither way always runs on a cold cache
        with rolled_back(conn):  # before: entries and the spend plan inside the locks
            start = time.perf_counter()
            changes = lock_and_update()
            entries()
            after_debit(conn, q, SpendPlan.of(SCRATCH_POSTING, deltas, controls, batch), changes)
            print(f"  {'entries and spend plan after the lock (before)':<52} "
                  f"{1e3 * (time.perf_counter() - start):7.2f} ms")  # fmt: skip
        with rolled_back(conn):  # now: both before it
            entries()
            plan = SpendPlan.of(SCRATCH_POSTING, deltas, controls, batch)
            start = time.perf_counter()
            after_debit(conn, q, plan, lock_and_update())
            print(f"  {'entries and spend plan before the lock (now)':<52} "
                  f"{1e3 * (time.perf_counter() - start):7.2f} ms")  # fmt: skip


POSTING_FIELDS = ("posting_id", "kind", "reference", "memo", "actor")


def _wallet_step(conn: Any, q: Any, wallets: int) -> None:
    """A posting's wallet step over ``wallets`` wallets: as of migration 0008 (ledger accounts
    read first, entries with 0008's trigger and the (ledger_account_id, entry_id) index, the
    wallets locked, then updated) vs. 0009 (entries joined to their wallets, one UPDATE in
    account order). Alternating rounds, each rolled back; wall time of the step."""
    total = conn.execute("SELECT count(*) FROM wallets").fetchone()[0]
    accounts = [
        r[0]
        for r in conn.execute(
            "SELECT account_id FROM wallets ORDER BY md5(account_id) LIMIT %s", (wallets,)
        )
    ]
    accounts.sort()
    amounts = [Decimal("-0.000123456789")] * len(accounts)
    revenue = conn.execute(q["ledger_account_id"], {"code": "revenue:usage"}).fetchone()[0]
    posting = dict.fromkeys(POSTING_FIELDS) | SCRATCH

    def before() -> None:
        at = text_array(accounts)
        ids = dict(conn.execute(q["before_0009_wallet_ledger_accounts"], {"accounts": at}))
        conn.execute(
            q["before_0009_insert_entries"],
            {
                "posting_id": SCRATCH_POSTING,
                "ledger_accounts": text_array([ids[a] for a in accounts] + [revenue]),
                "amounts": text_array([*amounts, -sum(amounts)]),
            },
        )
        conn.execute(q["lock_wallets"], {"accounts": at}).fetchall()
        conn.execute(
            q["before_0009_update_wallet_balances"],
            {"accounts": at, "amounts": text_array(amounts)},
        ).fetchall()

    def now() -> None:
        _usage_entries(conn, q, accounts, amounts, revenue)
        conn.execute(
            q["debit_wallets"], {"accounts": text_array(accounts), "amounts": text_array(amounts)}
        ).fetchall()

    print(f"the wallet step of one posting, {len(accounts):,} of {total:,} wallets, wall time:")
    before_ddl = (
        function_as_in("0008", "billing_check_balanced")
        + "; CREATE INDEX ledger_entries_account ON ledger_entries (ledger_account_id, entry_id)"
    )
    for _ in range(5):  # alternate, so that neither way always runs on a cold cache
        for label, ddl, step in (
            ("three statements, 0008's trigger and index (before)", before_ddl, before),
            ("entries joined, one UPDATE in account order (0009, now)", None, now),
        ):
            with rolled_back(conn):
                if ddl:
                    conn.execute(ddl)
                conn.execute(q["insert_posting"], posting)
                start = time.perf_counter()
                step()
                seconds = time.perf_counter() - start
                per_wallet = 1e6 * seconds / wallets
                print(f"  {label:<58} {1e3 * seconds:7.2f} ms {per_wallet:6.2f} us/wallet")


SCRATCH = {"posting_id": 999_999_999_999, "kind": "usage"}


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
    claim_event_keys(conn, q, sorted(ids))
    with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
        copy.write(data)


SCRATCH_POSTING = 999_999_999_999
NULL = "\\N"
REQUEST = CLASS_ORDER.index(BillableClass.REQUEST)
MIGRATIONS = Path(__file__).resolve().parent.parent / "sql" / "migrations"


class _Rollback(Exception):
    """Leave the scratch database as it was."""


def best_of(label: str, fn: Any, n: int, passes: int = 7) -> None:
    """The fastest of ``passes`` runs of ``fn`` (the least disturbed by the rest of the VM)."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    print(f"  {label:<52} {1e6 * best / n:7.2f} us each")


def _python_hot_path(conn: Any, priced: list[Any]) -> None:
    print("the worker's Python hot path (best of 7 passes):")
    for label, line in (
        ("COPY line: datetime.isoformat, 5 escape calls (before)", _copy_line_before),
        ("COPY line: msgspec timestamp, one escape check (now)", copy_line),
    ):
        best_of(label, lambda line=line: [line(p, 1) for p in priced], len(priced))
    for label, price_fn in (
        ("pricing: a loop over all 10 classes (before)", _price_before),
        ("pricing: only the classes used (now)", price),
    ):
        best_of(
            label,
            lambda f=price_fn: [f(p.event.usage, p.version) for p in priced],
            len(priced),
        )
    ids = sorted(p.event.event_id for p in priced[:5_000])
    for label, sql, value in (
        ("claim ids: a text[] parameter (before)", "SELECT cardinality(%s::text[])", ids),
        (
            "claim ids: one newline-separated text (now)",
            "SELECT cardinality(string_to_array(%s, E'\\n'))",
            "\n".join(ids),
        ),
    ):
        best_of(label, lambda s=sql, v=value: conn.execute(s, (v,)).fetchone(), len(ids))


def _copy_line_before(p: Any, posting_id: int) -> str:
    """``billing.usage.copy_line`` before this session's change (kept for the comparison)."""
    e, u, c = p.event, p.event.usage, p.charge
    a = c.amounts
    charged = not e.byok and c.total > 0
    text = _escaped
    return (
        f"{text(e.event_id)}\t{e.occurred_at.isoformat()}\t{text(e.account_id)}\t"
        f"{text(e.api_key_id)}\t{text(e.model)}\t{text(e.provider)}\t"
        f"{'t' if e.byok else 'f'}\t{p.version.effective_from_text}\t"
        f"{u.input_tokens}\t{u.cached_input_tokens}\t{u.cache_write_tokens}\t"
        f"{u.output_tokens}\t{u.reasoning_tokens}\t{u.image_count}\t{u.web_search_count}\t"
        f"{a[0]!s}\t{a[1]!s}\t{a[2]!s}\t{a[3]!s}\t{a[4]!s}\t{a[5]!s}\t{a[6]!s}\t{c.total!s}\t"
        f"{c.total if not e.byok else 0!s}\t{posting_id if charged else NULL}\t"
        f"{NULL if e.latency_ms is None else e.latency_ms}\t"
        f"{NULL if e.ttft_ms is None else e.ttft_ms}{extension_text(p)}\n"
    )


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\") if "\\" in value else value


def _price_before(usage: Usage, version: Any) -> Charge:
    """``billing.pricing.price`` (standard tier, completed) before this session's change."""
    rates = version.unit_rates
    counts = quantities(usage, 1)
    amounts: list[Decimal] = []
    total = ZERO
    for index, (quantity, rate) in enumerate(zip(counts, rates, strict=True)):
        if not quantity or rate is None:
            if quantity and index != REQUEST:
                raise Unpriced(f"{version.label()}: no price for class {index}", field="$.usage")
            amounts.append(ZERO)
            continue
        amount = EXACT.multiply(rate, quantity)
        amounts.append(amount)
        total = EXACT.add(total, amount)
    return Charge(counts, tuple(amounts), total)


if __name__ == "__main__":
    main()
