"""Fault injection: kill, restart and flood a real fleet under load, then prove the books.

The run owns PRIVATE servers (``bench.private_services``: a temporary PostgreSQL cluster and a
second RabbitMQ node on free ports), because it stops and restarts them; the shared 5432/5672
servers are never touched. It then:

1. migrates a fresh database, loads the shipped catalog and opens a hot account plus cold ones;
2. starts ``--workers`` real ``billing worker`` processes (small batches, metrics ports on);
3. publishes seeded synthetic traffic (the hot account takes half of it, 5% BYOK) at a steady
   pace over ``--duration`` seconds, in single-event messages and envelopes, with duplicates
   (2-5 copies of 3% of the events) and poison mixed in: invalid JSON, payloads over the size cap,
   wrong types (alone and inside envelopes of good events), unknown accounts and unknown models;
4. meanwhile injects faults on a schedule: SIGKILL of a worker while it holds an unacknowledged
   batch (read from its ``/metrics``), SIGTERM (the worker must exit 0 after draining), RabbitMQ
   stop/start, PostgreSQL restart, a lock/statement timeout storm (database-level timeouts, worker
   sessions cut so they pick them up, the hot wallet row locked), a redelivery burst (a consumer
   takes hundreds of messages and disconnects without acking) and a duplicate burst (events
   already published, published again 1-4 more times);
5. drains, stops the fleet with SIGTERM, and checks: every distinct good event recorded once,
   every poison item parked with its reason, ``billing audit`` clean, and every wallet's balance
   equal to its opening credit minus the independent expected total (each distinct published
   event priced alone by the pure pricing function), to the last of 12 decimals.

    python -m bench.chaos --short              # ~1-2 min: in the test suite
    python -m bench.chaos --long --json F      # ~12 min: the figures in docs/chaos.md

Exit status 0 only if everything above holds. The report lists events published, duplicates
injected, poison by kind, faults by kind, events debited and parked, and the audit result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import orjson
import psycopg
from kombu import Consumer
from psycopg import sql

from billing import broker, catalog, db, wallets
from billing.audit import run_audit
from billing.events import SCHEMA_BATCH_V1, UsageEvent, encode_envelope, encode_event
from billing.settings import Settings
from billing.synthetic import TrafficShape, expected_debits, generate

from .private_services import PrivatePostgres, PrivateRabbit, free_port

DATABASE = "billing_chaos"
OPENING_CREDIT = Decimal(1000)
SHORT_SCHEDULE = (
    (0.10, "sigkill"),
    (0.20, "redelivery_burst"),
    (0.28, "broker_restart"),
    (0.50, "pg_restart"),
    (0.60, "timeout_storm"),
    (0.72, "sigterm"),
    (0.80, "duplicate_burst"),
    (0.88, "sigkill"),
)


@dataclass(frozen=True)
class Mode:
    events: int
    duration: float
    workers: int
    accounts: int
    cycles: int  # how many times the schedule repeats over the run

    @property
    def schedule(self) -> list[tuple[float, str]]:
        out = []
        for c in range(self.cycles):
            out += [((c + at) / self.cycles, kind) for at, kind in SHORT_SCHEDULE]
        return out


SHORT = Mode(events=4000, duration=40, workers=2, accounts=20, cycles=1)
LONG = Mode(events=120_000, duration=600, workers=3, accounts=200, cycles=6)


@dataclass
class Tally:
    messages: int = 0
    events_published: int = 0  # including duplicates and poison items
    duplicates: int = 0
    poison: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fault(self, kind: str, started: float, **detail: Any) -> None:
        with self.lock:
            self.faults[kind] += 1
            self.fault_log.append(
                {"kind": kind, "seconds": round(time.monotonic() - started, 2), **detail}
            )
        print(f"  fault {kind}: {detail or ''} ({time.monotonic() - started:.1f}s)", flush=True)


# --- the fleet -------------------------------------------------------------------------------
class Fleet:
    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.procs: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        self.started = 0
        self.exit_codes: list[int] = []

    def env(self, metrics_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        s = self.settings
        env.update(
            {
                "BILLING_DATABASE_URL": s.database_url,
                "BILLING_BROKER_URL": s.broker_url,
                "BILLING_DATA_DIR": str(s.data_dir),
                "BILLING_USAGE_EXCHANGE": s.usage_exchange,
                "BILLING_USAGE_QUEUE": s.usage_queue,
                "BILLING_WALLET_EVENTS_EXCHANGE": s.wallet_events_exchange,
                "BILLING_TASKS_QUEUE": s.tasks_queue,
                "BILLING_EXPORTS_QUEUE": s.exports_queue,
                "BILLING_BATCH_SIZE": "200",
                "BILLING_BATCH_EVENTS": "1000",
                "BILLING_BATCH_TIMEOUT_MS": "100",
                "BILLING_PREFETCH": "400",
                "BILLING_METRICS_PORT": str(metrics_port),
            }
        )
        return env

    def start(self, slot: int) -> None:
        port = free_port()
        log = open(self.log_dir / f"worker-{self.started}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "billing.cli", "worker", "--loglevel=INFO", "--no-migrate"],
            env=self.env(port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.started += 1
        self.procs[slot] = (proc, port)

    def metric(self, slot: int, name: str) -> float | None:
        _, port = self.procs[slot]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
        except OSError:
            return None
        return None

    def probe(self, slot: int, path: str) -> int | None:
        _, port = self.procs[slot]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def kill_mid_batch(self, slot: int) -> bool:
        """SIGKILL once the worker holds unacknowledged messages (up to 3 s), then restart."""
        deadline = time.monotonic() + 3
        holding = False
        while time.monotonic() < deadline:
            unacked = self.metric(slot, "billing_usage_unacked_messages")
            if unacked:
                holding = True
                break
            time.sleep(0.01)
        proc, _ = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.start(slot)
        return holding

    def terminate(self, slot: int, restart: bool = True) -> int:
        proc, _ = self.procs[slot]
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.exit_codes.append(code)
        if restart:
            self.start(slot)
        return code

    def stop(self) -> None:
        for slot in list(self.procs):
            proc, _ = self.procs[slot]
            if proc.poll() is None:
                self.terminate(slot, restart=False)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


# --- traffic ---------------------------------------------------------------------------------
def make_traffic(cat: catalog.Catalog, accounts: list[str], count: int, seed: int) -> list[Any]:
    """Half the events on the hot account, half over the cold ones, interleaved; no duplicates."""
    now = datetime.now(UTC)
    hot = generate(
        cat,
        TrafficShape(accounts=["hot"], duplicate_share=0),
        count // 2,
        seed=seed,
        now=now,
        prefix="hot",
    )
    cold = generate(
        cat,
        TrafficShape(accounts=accounts, duplicate_share=0),
        count - count // 2,
        seed=seed + 1,
        now=now,
        prefix="cold",
    )
    out: list[UsageEvent] = []
    for a, b in zip(hot, cold, strict=False):
        out += [a, b]
    out += list(cold)
    return out


class Poison:
    """Bad items of each kind, each distinct (its own dead letter)."""

    KINDS = (
        "malformed_json",
        "too_large",
        "wrong_types",
        "wrong_types_in_envelope",
        "unknown_account",
        "unknown_model",
    )
    REASON: ClassVar[dict[str, str]] = {
        "malformed_json": "malformed_json",
        "too_large": "too_large",
        "wrong_types": "invalid_event",
        "wrong_types_in_envelope": "invalid_event",
        "unknown_account": "unknown_account",
        "unknown_model": "unpriced",
    }

    def __init__(self, template: UsageEvent, max_bytes: int) -> None:
        self.template, self.max_bytes, self.n = template, max_bytes, 0

    def _event(self, **changes: Any) -> dict[str, Any]:
        self.n += 1
        body = orjson.loads(encode_event(self.template))
        body.update(event_id=f"poison-{self.n:06d}", **changes)
        return dict(body)

    def make(self, kind: str, good: list[UsageEvent]) -> bytes:
        if kind == "malformed_json":
            return orjson.dumps(self._event())[:-7]  # truncated: not JSON
        if kind == "too_large":
            return orjson.dumps(self._event(padding="x" * (self.max_bytes + 1)))
        if kind == "wrong_types":
            return orjson.dumps(self._event(usage={"input_tokens": "many"}))
        if kind == "unknown_account":
            return orjson.dumps(self._event(account_id=f"ghost-{self.n}"))
        if kind == "unknown_model":
            return orjson.dumps(self._event(model="nobody/no-such-model"))
        assert kind == "wrong_types_in_envelope"
        events: list[Any] = [orjson.loads(encode_event(e)) for e in good]
        events.insert(len(events) // 2, self._event(usage={"output_tokens": -5}))
        return orjson.dumps({"schema": SCHEMA_BATCH_V1, "events": events})


class Publisher(threading.Thread):
    """Publishes the traffic paced over ``duration``; duplicates and poison mixed in."""

    def __init__(
        self, settings: Settings, events: list[UsageEvent], duration: float, tally: Tally, seed: int
    ) -> None:
        super().__init__(name="publisher", daemon=True)
        self.settings, self.events, self.duration, self.tally = settings, events, duration, tally
        self.rng = random.Random(seed)
        self.poison = Poison(events[0], settings.max_message_bytes)
        self.published: list[UsageEvent] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _send(self, pub: broker.UsagePublisher, body: bytes, events: int) -> None:
        pub.publish_raw(body)
        with self.tally.lock:
            self.tally.messages += 1
            self.tally.events_published += events

    def _run(self) -> None:
        start = time.monotonic()
        kinds = list(Poison.KINDS)
        with broker.UsagePublisher(self.settings) as pub:
            i, n = 0, len(self.events)
            while i < n:
                # pace: event i is due at i/n of the duration
                due = start + self.duration * i / n
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                roll = self.rng.random()
                if roll < 0.2 and i + 10 <= n:  # an envelope of 10
                    chunk = self.events[i : i + 10]
                    self._send(pub, encode_envelope(chunk), len(chunk))
                else:
                    chunk = self.events[i : i + 1]
                    self._send(pub, encode_event(chunk[0]), 1)
                self.published += chunk
                i += len(chunk)
                if self.rng.random() < 0.03:  # a gateway retry: 2-5 copies in all
                    dup = self.rng.choice(chunk)
                    extra = self.rng.randint(1, 4)
                    for _ in range(extra):
                        self._send(pub, encode_event(dup), 1)
                    with self.tally.lock:
                        self.tally.duplicates += extra
                if self.rng.random() < 0.01:  # poison, every kind in turn
                    kind = kinds[self.tally.poison.total() % len(kinds)]
                    good = self.events[max(0, i - 5) : i]
                    self._send(
                        pub, self.poison.make(kind, good), 1 + len(good) * (kind[-8:] == "envelope")
                    )
                    with self.tally.lock:
                        self.tally.poison[kind] += 1
                        if kind == "wrong_types_in_envelope":
                            self.tally.duplicates += len(good)  # good events sent again inside


# --- faults ----------------------------------------------------------------------------------
class Faults:
    def __init__(
        self,
        fleet: Fleet,
        pg: PrivatePostgres,
        rabbit: PrivateRabbit,
        settings: Settings,
        publisher: Publisher,
        tally: Tally,
        started: float,
    ) -> None:
        self.fleet, self.pg, self.rabbit, self.settings = fleet, pg, rabbit, settings
        self.publisher, self.tally, self.started = publisher, tally, started
        self.rng = random.Random(7)
        self.kills = 0

    def run(self, kind: str) -> None:
        getattr(self, kind)()

    def sigkill(self) -> None:
        slot = self.kills % len(self.fleet.procs)
        self.kills += 1
        holding = self.fleet.kill_mid_batch(slot)
        self.tally.fault("sigkill", self.started, worker=slot, held_unacked_batch=holding)

    def sigterm(self) -> None:
        slot = (self.kills + 1) % len(self.fleet.procs)
        t = time.monotonic()
        code = self.fleet.terminate(slot)
        self.tally.fault(
            "sigterm",
            self.started,
            worker=slot,
            exit_code=code,
            drain_s=round(time.monotonic() - t, 1),
        )
        if code != 0:
            raise RuntimeError(f"worker exited {code} on SIGTERM")

    def broker_restart(self) -> None:
        t = time.monotonic()
        self.rabbit.stop()
        time.sleep(1)
        not_ready = [self.fleet.probe(s, "/readyz") for s in self.fleet.procs]
        self.rabbit.start()
        down = time.monotonic() - t
        # every worker reconnects and reports ready again
        deadline = time.monotonic() + 60
        while any(self.fleet.probe(s, "/readyz") != 200 for s in self.fleet.procs):
            if time.monotonic() > deadline:
                raise RuntimeError("a worker did not become ready again after the broker restart")
            time.sleep(0.2)
        self.tally.fault(
            "broker_restart",
            self.started,
            down_s=round(down, 1),
            readyz_while_down=not_ready,
            ready_again_s=round(time.monotonic() - t - down, 1),
        )

    def pg_restart(self) -> None:
        t = time.monotonic()
        self.pg.restart()
        self.tally.fault("pg_restart", self.started, down_s=round(time.monotonic() - t, 1))

    def timeout_storm(self, seconds: float = 4.0) -> None:
        """Tight database-wide lock and statement timeouts, worker sessions cut, hot wallet held."""
        ident = sql.Identifier(DATABASE)
        with psycopg.connect(self.pg.url, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} SET lock_timeout = '100ms'").format(ident))
            admin.execute(
                sql.SQL("ALTER DATABASE {} SET statement_timeout = '150ms'").format(ident)
            )
            try:
                with psycopg.connect(self.pg.url_for(DATABASE)) as locker:
                    locker.execute("SET lock_timeout = 0")
                    locker.execute("SET statement_timeout = 0")
                    _terminate_others(admin, locker)
                    locker.execute("SELECT 1 FROM wallets WHERE account_id = 'hot' FOR UPDATE")
                    time.sleep(seconds)
                    locker.rollback()
            finally:
                admin.execute(sql.SQL("ALTER DATABASE {} RESET lock_timeout").format(ident))
                admin.execute(sql.SQL("ALTER DATABASE {} RESET statement_timeout").format(ident))
                _terminate_others(admin, None)
        self.tally.fault("timeout_storm", self.started, held_s=seconds)

    def redelivery_burst(self, flood: int = 300) -> None:
        """A consumer takes a flood of messages and vanishes without acking: the broker
        redelivers all it held to the workers at once (the flood: already published events)."""
        sample = self.rng.sample(
            self.publisher.published, min(flood, len(self.publisher.published))
        )
        held = 0

        def hold(message: Any) -> None:
            nonlocal held
            held += 1

        with broker.connect(self.settings) as conn:
            channel = conn.channel()
            channel.basic_qos(0, 2 * flood, False)
            consumer = Consumer(channel, queues=[broker.usage_queue(self.settings)], no_ack=False)
            consumer.on_message = hold
            consumer.consume()
            with broker.UsagePublisher(self.settings) as pub:
                for event in sample:
                    pub.publish_raw(encode_event(event))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=0.2)
        # the connection closed with every held message unacknowledged
        with self.tally.lock:
            self.tally.duplicates += len(sample)
            self.tally.messages += len(sample)
            self.tally.events_published += len(sample)
        self.tally.fault("redelivery_burst", self.started, flooded=len(sample), held=held)

    def duplicate_burst(self) -> None:
        sample = self.rng.sample(self.publisher.published, min(200, len(self.publisher.published)))
        sent = 0
        with broker.UsagePublisher(self.settings) as pub:
            for event in sample:
                for _ in range(self.rng.randint(1, 4)):
                    pub.publish_raw(encode_event(event))
                    sent += 1
        with self.tally.lock:
            self.tally.duplicates += sent
            self.tally.messages += sent
            self.tally.events_published += sent
        self.tally.fault("duplicate_burst", self.started, events=len(sample), copies=sent)


def _terminate_others(admin: psycopg.Connection[Any], keep: psycopg.Connection[Any] | None) -> None:
    keep_pid = keep.info.backend_pid if keep is not None else 0
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid() AND pid <> %s",
        (DATABASE, keep_pid),
    )


# --- the run ---------------------------------------------------------------------------------
def counts(url: str) -> tuple[int, Counter[str]]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        recorded = int(conn.execute("SELECT count(*) FROM usage_events").fetchone()[0])  # type: ignore[index]
        parked: Counter[str] = Counter(
            {
                r: int(n)
                for r, n in conn.execute(
                    "SELECT reason_code, count(*) FROM dead_letters WHERE status = 'parked' "
                    "GROUP BY 1"
                )
            }
        )
    return recorded, parked


def run(mode: Mode, seed: int, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    tally = Tally()
    with PrivatePostgres(workdir) as pg, PrivateRabbit(workdir) as rabbit:
        print(
            f"private servers up in {time.monotonic() - t0:.1f}s: {pg.url} {rabbit.url}", flush=True
        )
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        settings = replace(
            Settings.from_env({}),
            data_dir=workdir,
            database_url=pg.url_for(DATABASE),
            broker_url=rabbit.url,
            usage_exchange="chaos.usage",
            usage_queue="chaos.usage",
            wallet_events_exchange="chaos.wallet-events",
            tasks_queue="chaos.tasks",
            exports_queue="chaos.exports",
        )
        q = db.queries(settings)
        accounts = [f"cold-{i:04d}" for i in range(mode.accounts - 1)]
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            db.migrate(conn, settings.sql_dir)
            catalog.load_versions(
                conn,
                q,
                catalog.read_catalog_file(catalog.DEFAULT_CATALOG),
                now=datetime.now(UTC) - timedelta(days=1),
                loaded_by="chaos",
            )
            for a in ["hot", *accounts]:
                wallets.create_account(conn, q, a)
                wallets.adjust(conn, q, a, OPENING_CREDIT, reason="chaos opening", actor="chaos")
            cat = catalog.snapshot(conn, q)
        with broker.connect(settings) as bconn:
            broker.declare_topology(bconn, settings)
        events = make_traffic(cat, accounts, mode.events, seed)
        expected = expected_debits(events, cat)  # independent of the pipeline
        unique = len({e.event_id for e in events})

        fleet = Fleet(settings, workdir)
        for slot in range(mode.workers):
            fleet.start(slot)
        started = time.monotonic()
        publisher = Publisher(settings, events, mode.duration, tally, seed)
        publisher.start()
        faults = Faults(fleet, pg, rabbit, settings, publisher, tally, started)
        try:
            for at, kind in mode.schedule:
                due = started + at * mode.duration
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                faults.run(kind)
            publisher.join()
            if publisher.error is not None:
                raise publisher.error
            published_s = time.monotonic() - started
            expected_parked: Counter[str] = Counter()
            for kind, n in tally.poison.items():
                expected_parked[Poison.REASON[kind]] += n
            deadline = time.monotonic() + max(180, mode.duration)
            while True:
                with contextlib.suppress(psycopg.OperationalError):
                    recorded, parked = counts(settings.database_url)
                    if recorded >= unique and parked == expected_parked:
                        break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            drained_s = time.monotonic() - started
        finally:
            fleet.stop()
        logs = fleet.logs()

        recorded, parked = counts(settings.database_url)
        with psycopg.connect(settings.database_url) as conn:
            report = run_audit(conn, q)
            balances = {a: b for a, b in conn.execute("SELECT account_id, balance FROM wallets")}
            byok = int(conn.execute("SELECT count(*) FROM usage_events WHERE byok").fetchone()[0])  # type: ignore[index]
            poison_recorded = int(
                conn.execute(
                    "SELECT count(*) FROM usage_events WHERE event_id LIKE 'poison-%'"
                ).fetchone()[0]  # type: ignore[index]
            )
        wrong = {
            a: {"expected": str(OPENING_CREDIT - expected.get(a, Decimal(0))), "actual": str(b)}
            for a, b in balances.items()
            if b != OPENING_CREDIT - expected.get(a, Decimal(0))
        }
        result = {
            "mode": {**mode.__dict__, "seed": seed},
            "messages_published": tally.messages,
            "events_published": tally.events_published,
            "distinct_good_events": unique,
            "duplicates_injected": tally.duplicates,
            "poison_injected": dict(tally.poison),
            "faults": dict(tally.faults),
            "fault_log": tally.fault_log,
            "worker_processes_started": fleet.started,
            "sigterm_exit_codes": fleet.exit_codes,
            "transient_batch_failures_logged": logs.count(" failed (attempt "),
            "batches_requeued_logged": logs.count("requeueing "),
            "events_recorded": recorded,
            "events_debited": recorded - byok,
            "events_byok": byok,
            "parked": dict(parked),
            "expected_parked": dict(expected_parked),
            "poison_recorded": poison_recorded,
            "lost": max(0, unique - recorded),
            "balances_checked": len(balances),
            "balances_wrong": wrong,
            "expected_total_debited": str(sum(expected.values(), Decimal(0))),
            "audit_ok": report.ok,
            "audit_failures": {c.name: c.violations[:5] for c in report.checks if not c.ok},
            "published_s": round(published_s, 1),
            "drained_s": round(drained_s, 1),
            "total_s": round(time.monotonic() - t0, 1),
        }
        result["ok"] = bool(
            report.ok
            and recorded == unique
            and not wrong
            and parked == expected_parked
            and poison_recorded == 0
            and all(code == 0 for code in fleet.exit_codes)
            and tally.faults["sigkill"] >= 1
            and tally.faults["broker_restart"] >= 1
            and tally.faults["pg_restart"] >= 1
        )
        if not result["ok"]:
            print("worker logs (tail):\n" + logs[-6000:], file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--short", action="store_true", help="~1-2 minutes (the test suite)")
    size.add_argument("--long", action="store_true", help="~12 minutes (docs/chaos.md)")
    parser.add_argument("--events", type=int, help="override the mode's event count")
    parser.add_argument("--duration", type=float, help="override the load duration (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    mode = LONG if args.long else SHORT
    if args.events:
        mode = replace(mode, events=args.events)
    if args.duration:
        mode = replace(mode, duration=args.duration)
    workdir = Path(tempfile.mkdtemp(prefix="billing-chaos-"))
    os.chmod(workdir, 0o755)  # the private servers run as their own users
    try:
        result = run(mode, args.seed, workdir)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("chaos: " + ("clean" if result["ok"] else "FAILED"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
