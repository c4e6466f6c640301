"""Real `billing worker` processes (Celery + the batched consumer) against RabbitMQ/PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from billing import broker, catalog
from billing.audit import run_audit
from billing.db import Queries
from billing.settings import Settings
from billing.synthetic import TrafficShape, generate

from .conftest import worker_env
from .helpers import balances, expected_debits, open_account, wait_until

pytestmark = pytest.mark.slow


class Fleet:
    def __init__(self, settings: Settings, log_dir: Path, **env: str) -> None:
        self.settings, self.log_dir, self.env = settings, log_dir, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "billing.cli", "worker", "--loglevel=INFO", "--no-migrate"],
            env=worker_env(self.settings, **self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def logs(self) -> list[str]:
        return [p.read_text() for p in sorted(self.log_dir.glob("worker-*.log"))]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(**env: str) -> Fleet:
        fleets.append(Fleet(settings, tmp_path, **env))
        return fleets[-1]

    yield make
    for f in fleets:
        f.stop()


def recorded(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM usage_events").fetchone()[0])  # type: ignore[index]


def traffic(
    conn: psycopg.Connection[Any], q: Queries, accounts: list[str], count: int, seed: int
) -> list[Any]:
    shape = TrafficShape(accounts=accounts, duplicate_share=0.03)
    return list(
        generate(
            catalog.snapshot(conn, q),
            shape,
            count,
            seed=seed,
            now=datetime.now(UTC),
            prefix=f"t{seed}",
        )
    )


def test_sigkill_mid_batch_and_restart_leaves_every_event_debited_once(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries, fleet: Any
) -> None:
    accounts = [f"acct-{i:02d}" for i in range(20)]
    for a in accounts:
        open_account(conn, q, a, "1000")
    events = traffic(conn, q, accounts, 8000, seed=11)
    unique = len({e.event_id for e in events})
    workers = fleet(BILLING_BATCH_SIZE="100")
    worker = workers.start()
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events, envelope_size=5)  # 1,600 messages

    kills = 0
    for fraction in (0.15, 0.5):  # SIGKILL twice, mid-stream, then restart
        wait_until(lambda f=fraction: recorded(conn) >= unique * f, timeout=120, interval=0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
        assert recorded(conn) < unique, "the worker finished before it could be killed"
        worker = workers.start()
    wait_until(lambda: recorded(conn) == unique, timeout=180)
    workers.stop()

    assert kills == 2
    assert recorded(conn) == unique
    expected = expected_debits(conn, q, events)
    assert {a: Decimal(1000) - b for a, b in balances(conn).items() if a in expected} == expected
    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]


def test_two_workers_on_one_hot_wallet(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries, fleet: Any
) -> None:
    accounts = ["hot"] + [f"cold-{i}" for i in range(9)]
    for a in accounts:
        open_account(conn, q, a, "1000")
    # TrafficShape's Zipf weights give the first account about half the traffic.
    events = traffic(conn, q, accounts, 6000, seed=12)
    share = sum(e.account_id == "hot" for e in events) / len(events)
    assert share > 0.3
    unique = len({e.event_id for e in events})
    workers = fleet(BILLING_BATCH_SIZE="50", BILLING_PREFETCH="100")
    workers.start()
    workers.start()
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events, envelope_size=1)
    wait_until(lambda: recorded(conn) == unique, timeout=180)
    workers.stop()

    logs = workers.logs()
    batches = [int(log.split("usage consumer stopped after ")[1].split()[0]) for log in logs]
    assert all(n > 0 for n in batches), "both workers must have taken batches"
    assert not any("deadlock" in log.lower() for log in logs)
    expected = expected_debits(conn, q, events)
    assert {a: Decimal(1000) - b for a, b in balances(conn).items() if a in expected} == expected
    report = run_audit(conn, q)
    assert report.ok, [c for c in report.checks if not c.ok]


def test_sigterm_drains_the_batch_in_hand(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries, fleet: Any
) -> None:
    open_account(conn, q, "acme", "100")
    events = traffic(conn, q, ["acme"], 300, seed=13)
    # a long batch window: the batch is still open when SIGTERM arrives
    workers = fleet(
        BILLING_BATCH_SIZE="100000",
        BILLING_BATCH_TIMEOUT_MS="600000",
        BILLING_BATCH_IDLE_MS="600000",
    )
    worker = workers.start()
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events)
    with broker.connect(settings) as bconn:
        wait_until(lambda: broker.queue_depth(bconn, settings) == 0, timeout=60)
    assert recorded(conn) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert recorded(conn) == len({e.event_id for e in events})


def test_a_batch_closes_when_the_queue_goes_idle_not_at_its_deadline(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries, fleet: Any
) -> None:
    """Below capacity an event waits ``BILLING_BATCH_IDLE_MS``, not the whole batch deadline."""
    open_account(conn, q, "acme", "100")
    events = traffic(conn, q, ["acme"], 50, seed=17)
    workers = fleet(BILLING_BATCH_TIMEOUT_MS="600000", BILLING_BATCH_IDLE_MS="20")
    workers.start()
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events)
    # a 10-minute deadline: only the idle rule can close these batches within the wait
    wait_until(lambda: recorded(conn) == len({e.event_id for e in events}), timeout=60)


def test_embedded_demo_runs_with_no_servers_configured(tmp_path: Path) -> None:
    """The README's first command: pgserver + filesystem queue, separate worker processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env["BILLING_DATA_DIR"] = str(tmp_path / "data")
    run = subprocess.run(
        [sys.executable, "-m", "billing.cli", "demo", "--events", "3000", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "audit: clean" in run.stdout
    assert "parked: malformed_json" in run.stdout
