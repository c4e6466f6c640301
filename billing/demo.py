"""``billing demo``: realistic gateway traffic through the queue into priced, debited wallets.

The demo process is the producer (the gateway's side); the workers are separate ``billing worker``
processes, as in production. With no configuration everything is embedded (pgserver PostgreSQL and
the filesystem queue in ``.billing/``); with ``BILLING_DATABASE_URL``/``BILLING_BROKER_URL`` set it
runs against real servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from billing import broker, catalog, db, wallets
from billing.audit import run_audit
from billing.db import Queries
from billing.errors import AccountExists
from billing.money import format_usd
from billing.settings import Settings
from billing.synthetic import TrafficShape, generate

POISON = [
    b'{"schema": "usage.v1", "event_id": ',  # truncated JSON
    b'{"schema": "usage.v2", "event_id": "demo-poison-schema"}',
]


def run_demo(
    settings: Settings,
    *,
    count: int,
    worker_count: int,
    envelope: int,
    account_count: int,
    seed: int,
    console: Console,
) -> bool:
    q = db.queries(settings)
    url = db.database_url(settings)
    where = (
        "embedded (pgserver + filesystem queue in " + str(settings.data_dir) + ")"
        if (settings.embedded_database and settings.embedded_broker)
        else "configured servers"
    )
    console.print(
        f"[bold]gateway-billing demo[/bold]: {count:,} events, {worker_count} workers, "
        f"envelopes of {envelope}, {where}"
    )
    with db.connect(settings) as conn:
        db.migrate(conn, settings.sql_dir)
        loaded = catalog.load_versions(
            conn,
            q,
            catalog.read_catalog_file(catalog.DEFAULT_CATALOG),
            now=datetime.now(UTC),
            loaded_by="demo",
            max_clock_skew=settings.max_clock_skew,
        )
        snap = catalog.snapshot(conn, q)
        accounts = [f"demo-{i:03d}" for i in range(1, account_count + 1)]
        for i, account in enumerate(accounts):
            with contextlib.suppress(AccountExists):
                wallets.create_account(conn, q, account, f"Demo customer {i + 1}")
            credit = Decimal(5) if i % 10 == 9 else Decimal(25 + 5 * (i % 7))
            wallets.adjust(
                conn,
                q,
                account,
                credit,
                reason="demo starting credit",
                actor="demo",
                reference=f"demo-credit:{account}",
            )
    console.print(
        f"catalog: {len(loaded.added)} versions added, {len(loaded.unchanged)} present; "
        f"{account_count} accounts with starting credit"
    )

    env = {**os.environ, "BILLING_DATABASE_URL": url, "BILLING_DATA_DIR": str(settings.data_dir)}
    if not settings.embedded_broker:
        env["BILLING_BROKER_URL"] = settings.broker_url
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "billing.cli", "worker", "--loglevel=WARNING", "--no-migrate"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(worker_count)
    ]
    run = uuid.uuid4().hex[:8]
    started = datetime.now(UTC)
    try:
        shape = TrafficShape(accounts=accounts)
        events = list(generate(snap, shape, count, seed=seed, now=started, prefix=f"demo-{run}"))
        unique = len({e.event_id for e in events})
        t0 = time.monotonic()
        with broker.UsagePublisher(settings) as publisher:
            publisher.publish_many(events, envelope_size=envelope)
            for body in POISON:
                publisher.publish_raw(body)
        publish_s = time.monotonic() - t0
        expected = unique + len(POISON)
        done, last_change = 0, time.monotonic()
        with Progress(
            TextColumn("billing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("events"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("billing", total=expected)
            with db.connect(settings) as conn:
                while done < expected:
                    now_done = _processed(conn, q, started)
                    if now_done != done:
                        done, last_change = now_done, time.monotonic()
                    progress.update(task, completed=done)
                    if any(p.poll() is not None for p in procs):
                        console.print("[red]a worker exited early[/red]")
                        break
                    if time.monotonic() - last_change > 60:
                        console.print("[red]no progress for 60 s[/red]")
                        break
                    time.sleep(0.2)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()

    with db.connect(settings) as conn:
        _summary(conn, q, console, started, len(events), unique, publish_s, elapsed)
        report = run_audit(conn, q)
    console.print(
        "audit: "
        + ("[green]clean[/green]" if report.ok else "[red]FAILED[/red]")
        + " (`billing audit` for details)"
    )
    return report.ok and done >= expected


def _processed(conn: Any, q: Queries, since: datetime) -> int:
    row = conn.execute(q["demo_processed"], {"t": since}).fetchone()
    return int(row[0])


def _summary(
    conn: Any,
    q: Queries,
    console: Console,
    since: datetime,
    published: int,
    unique: int,
    publish_s: float,
    elapsed: float,
) -> None:
    params = {"t": since}
    rec, byok, debited, notional, first, last = conn.execute(q["demo_totals"], params).fetchone()
    totals = Table(title="events", show_header=False)
    totals.add_row("published (incl. gateway retries)", f"{published:,}")
    totals.add_row("duplicates ignored", f"{published - unique:,}")
    totals.add_row("recorded (debited)", f"{rec - byok:,}")
    totals.add_row("recorded (BYOK, debited 0)", f"{byok:,}")
    for code, n in conn.execute(q["demo_parked"], params):
        totals.add_row(f"parked: {code}", f"{n:,}")
    totals.add_row("publish rate", f"{unique / publish_s:,.0f} events/s")
    totals.add_row("end-to-end (publish start to last commit)", f"{elapsed:.1f} s")
    if first is not None and last > first:
        rate = rec / (last - first).total_seconds()
        totals.add_row("worker throughput (first to last commit)", f"{rate:,.0f} events/s")
    console.print(totals)

    by_model = Table(title="revenue by model (exact USD)")
    for col in ("model", "provider", "events", "debited"):
        by_model.add_column(col, justify="left" if col in ("model", "provider") else "right")
    for model, provider, n, total in conn.execute(q["demo_by_model"], params):
        by_model.add_row(model, provider, f"{n:,}", format_usd(total))
    by_model.add_row(
        "[bold]all[/bold]", "", f"{rec - byok:,}", f"[bold]{format_usd(debited)}[/bold]"
    )
    console.print(by_model)

    by_class = Table(title="revenue by billable class (exact USD)")
    for col in ("class", "quantity", "debited"):
        by_class.add_column(col, justify="left" if col == "class" else "right")
    row = conn.execute(q["demo_by_class"], params).fetchone()
    names = (
        "input tokens",
        "cached input tokens",
        "cache write tokens",
        "output tokens (incl. reasoning)",
        "images",
        "web searches",
        "requests",
        "1-hour cache write tokens",
        "audio input tokens",
        "audio output tokens",
    )
    for i, name in enumerate(names):
        quantity, amount = row[2 * i], row[2 * i + 1]
        by_class.add_row(name, f"{quantity or 0:,}", format_usd(amount or Decimal(0)))
    console.print(by_class)
    console.print(f"BYOK notional provider cost (not debited, no fee): {format_usd(notional)} USD")

    balances = Table(title="balances (10 busiest wallets)")
    for col in ("account", "balance", "state", "events"):
        balances.add_column(col, justify="left" if col == "account" else "right")
    for account, balance, state, n in conn.execute(q["demo_busiest_wallets"], params):
        shown = format_usd(balance)
        balances.add_row(
            account, f"[red]{shown}[/red]" if state == "exhausted" else shown, state, f"{n:,}"
        )
    console.print(balances)
