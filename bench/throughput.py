"""Throughput benchmark: the per-event Celery baseline vs. our batched fleet, in one run.

Against real RabbitMQ and PostgreSQL, with the same seeded synthetic events (many accounts with a
Zipf-like hot set, the catalog's models and providers, cached tokens, images, searches, 5% BYOK,
1% duplicates), it measures side by side:

* baseline     one Celery task per event, one transaction per event (``workers/baseline.py``)
* single       our fleet (``billing worker``), one event per message
* envelope100  our fleet, envelopes of 100 events per message (``BILLING_PREFETCH=200``, as the
               README advises for envelopes of 100)
* envelope100_hash  the same, the usage stream partitioned by account over 4 queues
               (``BILLING_USAGE_PARTITIONS=4``: CRC-32 of the account id mod 4), each worker
               consuming its own partitions, split by their traffic, so no two workers debit
               the same wallet (docs/operations.md); an envelope carries one partition
* sql          the same decode/price/record code fed directly, no broker (the ceiling)

For each: sustained events/s after warm-up (the 10th to 90th percentile of commit times), p50/p99
publish-to-commit latency at half that rate, CPU used by the broker, PostgreSQL and the workers,
and peak worker RSS. In the latency phase the envelope scenarios publish as a gateway would, with
``broker.BufferedUsagePublisher`` (an envelope per partition, published when it holds 100 events
or ``BILLING_PUBLISH_LINGER_MS`` after its first; a variant with ``BILLING_PUBLISH_LINGER_MS=0``
cuts each call's 100 events by partition instead), and an event's clock starts when it is handed
to the publisher. The phase's CPU by process and its p99 second by second are printed too.

Every scenario ends with ``billing audit`` and a comparison of every wallet
with the generator's expected totals: a fast wrong answer fails the benchmark (exit 1).

    python -m bench.throughput            # the full comparison (a few minutes)
    python -m bench.throughput --quick    # tiny, correctness only (runs in the test suite)
    python -m bench.throughput --only envelope100_hash --accounts 1000,10000   # 10x accounts
    python -m bench.throughput --only envelope100 --accounts 1000,10000 --hot-set scattered
    python -m bench.throughput --only envelope100 --variant w3:workers=3 \
        --variant small:BILLING_BATCH_EVENTS=1000   # also with other settings, same run
    python -m bench.throughput --only single --load-curve 0.3,0.4,0.6   # latency vs. load

``BILLING_BENCH_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) and
``BILLING_BENCH_BROKER_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``) choose the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, cast

import amqp
import psutil
import psycopg
from kombu import Connection, Producer
from psycopg import sql

from billing import broker, catalog, db, wallets
from billing.audit import run_audit
from billing.events import UsageEvent, encode_envelope, encode_event
from billing.settings import Settings
from billing.synthetic import TrafficShape, expected_debits, generate
from billing.usage import process_batch

ADMIN_URL = os.environ.get(
    "BILLING_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER_URL = os.environ.get("BILLING_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Database names: <prefix>_template, <prefix>_<scenario> (the test suite uses its own prefix).
DB_PREFIX = os.environ.get("BILLING_BENCH_DB_PREFIX", "billing_bench")
TEMPLATE = f"{DB_PREFIX}_template"
CREDIT = Decimal(10_000_000)
# envelope100_hash and bench.scaleout: queues by the account's partition, split between the
# workers by their traffic (broker.assign_partitions, as `billing broker assign` does)
# (4: more partitions split the traffic more evenly, but a gateway that flushes every 100 events
# then sends smaller envelopes; 4 had the best latency of 4, 8 and 16 in docs/performance.md run H)
HASH_PARTITIONS = 4
ENVELOPE_PREFETCH = 200  # messages: BILLING_PREFETCH for the envelope scenarios (README)
ROOT = Path(__file__).resolve().parent.parent
HotSet = Literal["first", "scattered"]  # where the busiest accounts fall in the lock order
HOT_SETS: tuple[HotSet, ...] = ("first", "scattered")
GatewayFraming = Literal["frames", "pyamqp"]  # how the simulated gateway writes (FastPublisher)
GATEWAY_FRAMINGS: tuple[GatewayFraming, ...] = ("frames", "pyamqp")
FRAME_OVERHEAD = 8  # an AMQP frame's type, channel and size (7 bytes), and its end octet
FRAME_END = b"\xce"


@dataclass(frozen=True)
class LoadPoint:
    """One latency phase of a load curve: publish-to-commit latency at a fraction of the rate."""

    fraction: float
    rate: float
    p50_ms: float
    p99_ms: float
    cpu: tuple[float, float, float, float]  # broker, PostgreSQL, workers, publisher
    p99_by_second_ms: tuple[float, ...] = ()  # of the events published in each second


@dataclass
class Result:
    scenario: str
    events: int
    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_rate: float | None = None
    cpu_broker: float = 0.0  # % of one core, during the measured window
    cpu_postgres: float = 0.0
    cpu_workers: float = 0.0
    cpu_us_per_event: float = 0.0
    peak_worker_rss_mb: float = 0.0
    audit_ok: bool = False
    balances_ok: bool = False
    rate_windows: list[float] | None = None
    # the workers' peak RSS in each of those deciles (None: a tenth shorter than a sample period)
    rss_windows_mb: list[float | None] | None = None
    # the latency phase: p99 ms of the events published in each of its seconds, and the CPU
    # (% of one core) of broker, PostgreSQL, workers and this process (the publisher) meanwhile
    latency_p99_by_second: list[float] | None = None
    latency_cpu: tuple[float, float, float, float] | None = None
    # --load-curve: more latency phases after the half-rate one, each at another fraction of the
    # sustained rate (fraction, events/s, p50 ms, p99 ms, CPU % of one core as in latency_cpu)
    load_curve: list[LoadPoint] | None = None
    # --rounds: the scenario and variant it belongs to, its account count and round
    group: str = ""
    accounts: int = 0
    round: int = 0
    hot_set: HotSet = "first"  # where the busiest accounts fall in the lock order (--hot-set)


# --- processes and CPU -------------------------------------------------------------------------
def _cpu(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _family(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


class Sampler(threading.Thread):
    """Samples cumulative CPU seconds of broker, PostgreSQL, workers and this process (the
    publisher of the latency phase), and worker RSS."""

    def __init__(self, worker_roots: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.worker_roots = worker_roots
        self.samples: list[tuple[float, float, float, float, float]] = []
        self.rss: list[tuple[float, int]] = []  # (time, workers' RSS summed)
        self.stop_flag = threading.Event()
        self.broker = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
        self.me = [psutil.Process()]

    def run(self) -> None:
        while not self.stop_flag.is_set():
            pg = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
            workers: list[psutil.Process] = []
            for pid in self.worker_roots():
                with contextlib.suppress(psutil.Error):
                    workers += _family(psutil.Process(pid))
            rss = 0
            for w in workers:
                with contextlib.suppress(psutil.Error):
                    rss += w.memory_info().rss
            self.rss.append((time.time(), rss))
            self.samples.append(
                (time.time(), _cpu(self.broker), _cpu(pg), _cpu(workers), _cpu(self.me))
            )
            self.stop_flag.wait(0.25)

    def usage_between(self, start: float, end: float) -> tuple[float, float, float]:
        """CPU seconds (broker, postgres, workers) used between two wall-clock times."""
        broker_s, postgres_s, workers_s, _me = self.all_usage_between(start, end)
        return broker_s, postgres_s, workers_s

    def all_usage_between(self, start: float, end: float) -> tuple[float, float, float, float]:
        """CPU seconds (broker, postgres, workers, this process) between two wall-clock times."""

        def at(t: float) -> tuple[float, float, float, float]:
            before = [s for s in self.samples if s[0] <= t] or self.samples[:1]
            return before[-1][1:]

        a, b = at(start), at(end)
        return (b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3])

    def peak_rss_mb_between(self, start: float, end: float) -> float | None:
        peak = max((rss for t, rss in self.rss if start <= t <= end), default=None)
        return None if peak is None else peak / 2**20

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()


# --- databases -------------------------------------------------------------------------------
def _url(database: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)


def _drop(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


def _recreate(name: str, template: str | None = None) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def prepare_template(accounts: list[str]) -> catalog.Catalog:
    _recreate(TEMPLATE)
    settings = replace(Settings.from_env({}), database_url=_url(TEMPLATE))
    q = db.queries(settings)
    with db.connect(settings) as conn:
        db.migrate(conn, settings.sql_dir)
        catalog.load_versions(
            conn,
            q,
            catalog.read_catalog_file(catalog.DEFAULT_CATALOG),
            now=datetime.now(UTC),
            loaded_by="bench",
        )
        for account in accounts:
            wallets.create_account(conn, q, account)
            wallets.adjust(conn, q, account, CREDIT, reason="bench credit", actor="bench")
        conn.execute("VACUUM ANALYZE")
        return catalog.snapshot(conn, q)


def scenario_settings(name: str) -> Settings:
    database = f"{DB_PREFIX}_{name}"
    _recreate(database, TEMPLATE)
    tag = f"{name}.{uuid.uuid4().hex[:8]}"
    return replace(
        Settings.from_env({}),
        database_url=_url(database),
        broker_url=BROKER_URL,
        usage_exchange=f"bench.usage.{tag}",
        usage_queue=f"bench.usage.{tag}",
        wallet_events_exchange=f"bench.wallet-events.{tag}",
        tasks_queue=f"bench.tasks.{tag}",
        exports_queue=f"bench.exports.{tag}",
    )


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": settings.database_url,
            "BILLING_BROKER_URL": settings.broker_url,
            "BILLING_USAGE_EXCHANGE": settings.usage_exchange,
            "BILLING_USAGE_QUEUE": settings.usage_queue,
            "BILLING_WALLET_EVENTS_EXCHANGE": settings.wallet_events_exchange,
            "BILLING_TASKS_QUEUE": settings.tasks_queue,
            "BILLING_EXPORTS_QUEUE": settings.exports_queue,
            "BILLING_METRICS_PORT": "0",  # several workers on one host; nothing scrapes them here
            **extra,
        }
    )
    return env


# Recorded events, polled while the workers run: one idempotency key per recorded event (audited),
# and the narrow key table costs the poll a tenth of a scan of the wide usage_events rows, which
# at 1M events took CPU from the workers and PostgreSQL it was measuring.
COUNT_RECORDED = "SELECT count(*) FROM usage_event_keys"


# --- measuring ---------------------------------------------------------------------------------
def count_recorded(settings: Settings) -> int:
    with db.connect(settings) as conn:
        return int(conn.execute(COUNT_RECORDED).fetchone()[0])  # type: ignore[index]


def wait_recorded(
    settings: Settings, expected: int, timeout: float, procs: Sequence[Any] = ()
) -> None:
    """Poll until ``expected`` events are recorded; fail at once if a worker process died."""
    deadline = time.monotonic() + timeout
    with db.connect(settings) as conn:
        while True:
            started = time.monotonic()
            n = int(conn.execute(COUNT_RECORDED).fetchone()[0])  # type: ignore[index]
            if n >= expected:
                return
            dead = [p for p in procs if _exited(p)]
            if dead:
                raise RuntimeError(f"a worker exited early; {n} of {expected} events recorded")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {n} of {expected} events recorded")
            # The count scans a table that grows with the run: poll no more than 5% of the time,
            # so the poll does not take a growing share of the CPU it measures.
            time.sleep(max(0.5, 20 * (time.monotonic() - started)))


def _exited(proc: Any) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is not None
    return not proc.is_alive() and proc.exitcode not in (0, None)


Deciles = list[tuple[float, float, float]]  # (start, end, events/s) of the 2nd to 9th tenth


def commit_window(settings: Settings, prefix: str) -> tuple[float, float, float, Deciles]:
    """(rate, t10, t90, deciles) from commit times of events whose id has ``prefix``."""
    with db.connect(settings) as conn:
        times = [
            r[0].timestamp()
            for r in conn.execute(
                "SELECT recorded_at FROM usage_events WHERE event_id LIKE %s ORDER BY recorded_at",
                (prefix + "%",),
            )
        ]
    n = len(times)
    t10, t90 = times[n // 10], times[(9 * n) // 10 - 1]
    rate = (0.8 * n) / max(t90 - t10, 1e-3)
    windows = []
    for d in range(1, 9):
        a, b = times[(d * n) // 10], times[((d + 1) * n) // 10 - 1]
        windows.append((a, b, (n / 10) / max(b - a, 1e-3)))
    return rate, t10, t90, windows


LATENCY_SAMPLES_PER_S = 200
# The pacing sleeps only when it is this far ahead, and what is due within it is handed to the
# publisher in one call. One sleep and one call per single event (6,000 a second) cost the
# simulated gateway more CPU than its publishes; envelopes (one every 4 ms or more at these
# rates) are still paced one by one.
PACING_TICK_S = 0.002


@dataclass(frozen=True)
class Latency:
    """Publish-to-commit latency of the timed events, in ms, and when the phase ran."""

    p50_ms: float
    p99_ms: float
    p99_by_second_ms: list[float]  # of the events published in each second of the phase
    start: float
    end: float


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def measure_latency(
    settings: Settings,
    publish: Callable[[list[UsageEvent]], None],
    events: list[UsageEvent],
    rate: float,
    per_message: int,
) -> Latency:
    """Publish ``events`` paced at ``rate`` events/s; p50/p99 ms from publish to visible commit.

    About ``LATENCY_SAMPLES_PER_S`` events a second are timed (one per message, every k-th
    message), and a poller looks their keys up in the narrow key table every 5 ms. The poll must
    stay small whatever the rate: timing every event made it a growing query that competed for
    the CPU it was measuring and, once a backlog formed, fed it. An event's clock starts when it
    is handed to ``publish`` (a publisher that holds it back to fill an envelope pays for that).
    """
    sent_at: dict[str, float] = {}
    pending: set[str] = set()
    published: set[str] = set()
    lock = threading.Lock()
    timed: list[tuple[float, float]] = []  # (sent at, latency s)
    done = threading.Event()

    def poll() -> None:
        with db.connect(settings) as conn:
            while not (done.is_set() and not pending):
                with lock:
                    ids = list(pending)
                if ids:
                    seen = conn.execute(
                        "SELECT event_id FROM usage_event_keys WHERE event_id = ANY(%s)", (ids,)
                    ).fetchall()
                    now = time.time()
                    with lock:
                        for (event_id,) in seen:
                            pending.discard(event_id)
                            timed.append((sent_at[event_id], now - sent_at[event_id]))
                time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    interval = per_message / rate
    every = max(1, round(rate / per_message / LATENCY_SAMPLES_PER_S))  # messages per sample
    messages = -(-len(events) // per_message)
    start_wall = time.time()
    start = time.perf_counter()
    m = 0  # the next message to publish
    while m < messages:
        delay = start + m * interval - time.perf_counter()
        if delay > PACING_TICK_S:
            time.sleep(delay)
        # every message due within the tick, handed over in one call (as a gateway hands over
        # the events of the requests that ended meanwhile)
        due = int((time.perf_counter() + PACING_TICK_S - start) / interval) + 1
        last = min(messages, max(due, m + 1))
        chunk = events[m * per_message : last * per_message]
        stamp = time.time()
        for k in range(m, last):
            sample = events[min(k * per_message + per_message // 2, len(events) - 1)].event_id
            if k % every == 0 and sample not in published:  # not a duplicate of an earlier event
                with lock:
                    sent_at[sample] = stamp
                    pending.add(sample)
        published.update(e.event_id for e in chunk)
        publish(chunk)
        m = last
    done.set()
    poller.join(timeout=120)
    end_wall = time.time()
    latencies = sorted(latency for _sent, latency in timed)
    by_second: dict[int, list[float]] = {}
    for sent, latency in timed:
        by_second.setdefault(int(sent - start_wall), []).append(latency)
    return Latency(
        p50_ms=_quantile(latencies, 0.5) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
        p99_by_second_ms=[_quantile(sorted(v), 0.99) * 1000 for _s, v in sorted(by_second.items())],
        start=start_wall,
        end=end_wall,
    )


class FastPublisher:
    """The simulated gateway: pre-loads the queue, then publishes the latency phase.

    Persistent messages with the properties ``broker.UsagePublisher`` sets, cut as it cuts them
    (``broker.envelopes``), but with no per-message confirm wait. The gateway is not what is
    measured, yet it shares the 2 cores, so by default (``framing="frames"``) each message is one
    socket write of its three AMQP frames, built from encodings made once: the ``basic.publish``
    method per routing key (py-amqp's ``dumps``) and the content properties (py-amqp's
    ``Message``). In a loop that costs 3-4 us of CPU per message, where py-amqp's
    ``basic_publish``, which re-encodes both every time (``framing="pyamqp"``, the simulated
    gateway before the tenth session), costs 15 and kombu's ``Producer.publish`` 25
    (``bench.amqp_client``).
    """

    def __init__(self, settings: Settings, framing: GatewayFraming = "frames") -> None:
        self.conn = Connection(settings.broker_url)
        self.settings = settings
        self.framing = framing
        channel = self.conn.channel()
        for queue in broker.usage_queues(settings):
            queue(channel).declare()
        self.channel = self.conn.channel()
        self.exchange = broker.usage_exchange(settings).name
        connection = self.conn.connection
        # py-amqp polls the socket for a connection.blocked notice before every publish (a
        # zero-timeout read: three system calls); this publisher never reads, so skip the poll
        properties = connection.client_properties  # this connection's own copy
        properties["capabilities"] = {
            **properties.get("capabilities", {}),
            "connection.blocked": False,
        }
        self._write = connection.transport.write  # sendall, or the connection is marked lost
        self._write_lock = threading.Lock()  # a linger thread may publish too: no torn frames
        self._body_frame_max = connection.frame_max - FRAME_OVERHEAD
        self._properties = amqp.Message(b"", **broker.PERSISTENT_JSON)._serialize_properties()
        self._publish_frames: dict[str, bytes] = {}  # routing key -> its basic.publish frame

    def raw(self, body: bytes, account_id: str = "") -> None:
        routing_key = broker.usage_routing_key(self.settings, account_id)
        if self.framing == "pyamqp":
            self.channel.basic_publish(
                amqp.Message(body, **broker.PERSISTENT_JSON),
                exchange=self.exchange,
                routing_key=routing_key,
            )
            return
        method = self._publish_frames.get(routing_key)
        if method is None:
            args = amqp.serialization.dumps("Bssbb", (0, self.exchange, routing_key, False, False))
            method = self._frame(1, struct.pack(">HH", *amqp.spec.Basic.Publish) + args)
            self._publish_frames[routing_key] = method
        header = struct.pack(">HHQ", amqp.spec.Basic.Publish[0], 0, len(body)) + self._properties
        parts = [method, self._frame(2, header)]
        step = self._body_frame_max
        parts += [self._frame(3, body[i : i + step]) for i in range(0, len(body), step)]
        with self._write_lock:
            self._write(b"".join(parts))

    def _frame(self, frame_type: int, payload: bytes) -> bytes:
        """An AMQP 0-9-1 frame on this publisher's channel: type, channel, size, payload, end."""
        head = struct.pack(">BHI", frame_type, self.channel.channel_id, len(payload))
        return head + payload + FRAME_END

    def events(self, events: list[UsageEvent], per_message: int) -> None:
        for body, account_id, _ in broker.usage_messages(
            events, per_message, self.settings.usage_partitions
        ):
            self.raw(body, account_id)

    def buffered(self, per_message: int, linger_ms: int) -> broker.BufferedUsagePublisher:
        """The gateway's buffered publisher (envelopes by partition, ``linger_ms``) on this one."""
        return broker.BufferedUsagePublisher(
            self.raw,
            size=per_message,
            partitions=self.settings.usage_partitions,
            linger_ms=linger_ms,
        )

    def close(self) -> None:
        self.conn.release()


def verify(
    settings: Settings, events: list[UsageEvent], snap: catalog.Catalog
) -> tuple[bool, bool]:
    q = db.queries(settings)
    with db.connect(settings) as conn:
        report = run_audit(conn, q)
        balances = {a: b for a, b in conn.execute("SELECT account_id, balance FROM wallets")}
    expected = expected_debits(events, snap)
    balances_ok = all(CREDIT - balances[a] == expected.get(a, Decimal(0)) for a in balances)
    if not report.ok:
        print("  audit FAILED:", [c.name for c in report.checks if not c.ok], file=sys.stderr)
    if not balances_ok:
        print("  balances differ from the generator's expected totals", file=sys.stderr)
    return report.ok, balances_ok


# --- scenarios ---------------------------------------------------------------------------------
def partition_groups(
    events: list[UsageEvent], workers: int, partitions: int = HASH_PARTITIONS
) -> list[tuple[int, ...]]:
    """Each worker's partitions, split by the traffic (as ``billing broker assign`` splits them
    from recorded usage); prints each worker's share of the events."""
    accounts = Counter(e.account_id for e in events)
    per_partition = broker.events_per_partition(accounts.items(), partitions)
    groups = broker.assign_partitions(per_partition, partitions, workers)
    shares = [sum(per_partition.get(j, 0) for j in group) / len(events) for group in groups]
    print("  events per worker: " + ", ".join(f"{s:.0%}" for s in shares), flush=True)
    return groups


def run_fleet(
    name: str,
    events: list[UsageEvent],
    latency_events: list[UsageEvent],
    snap: catalog.Catalog,
    per_message: int,
    workers: int,
    worker_env: dict[str, str],
    partitions: int = 1,
    curve: Sequence[tuple[float, list[UsageEvent]]] = (),
    gateway_framing: GatewayFraming = "frames",
) -> Result:
    """Our fleet; ``partitions`` > 1: each worker consumes a group of partitions (by traffic);
    ``curve``: latency phases at other fractions of the rate (``measure``);
    ``gateway_framing``: how the simulated gateway writes its messages (``FastPublisher``)."""
    scenario = re.split(r"[@\[#]", name)[0]  # the label without accounts, variant or round
    fleet_env = {**worker_env, "BILLING_USAGE_PARTITIONS": str(partitions)}
    # the simulated gateway reads the settings the workers get (partitions, a variant's linger)
    settings = Settings.from_env(env_for(scenario_settings(scenario), **fleet_env))
    publisher = FastPublisher(settings, gateway_framing)
    publisher.events(events, per_message)
    command = [sys.executable, "-m", "billing.cli", "worker", "--loglevel=WARNING", "--no-migrate"]
    envs = []
    groups = partition_groups(events, workers, partitions) if partitions > 1 else []
    for i in range(workers):
        env = dict(fleet_env)
        if groups:
            env["BILLING_USAGE_CONSUME_PARTITIONS"] = ",".join(map(str, groups[i]))
        envs.append(env_for(settings, **env))
    # the latency phase publishes as a gateway would: envelopes buffered by partition, each
    # published when full or BILLING_PUBLISH_LINGER_MS after its first event (0: each call's
    # events are cut into envelopes at once, as before)
    gateway = publisher.buffered(per_message, settings.publish_linger_ms if per_message > 1 else 0)
    try:
        return measure(
            name, settings, events, latency_events, snap, [command] * workers, envs,
            gateway.add_many, per_message, drain_timeout=600, curve=curve,
        )  # fmt: skip
    finally:
        # after a failed measurement the scenario's queues are gone: do not hide its error
        with contextlib.suppress(Exception):
            gateway.close()
        publisher.close()


def run_baseline(
    events: list[UsageEvent],
    latency_events: list[UsageEvent],
    snap: catalog.Catalog,
    concurrency: int,
) -> Result:
    settings = scenario_settings("baseline")
    env = env_for(settings, BILLING_USAGE_CONSUMER="0")
    os.environ.update(env)  # the Celery app below reads its settings from the environment
    from workers.baseline import record_event

    conn = Connection(settings.broker_url)
    producer = Producer(conn.channel())

    def send(chunk: list[UsageEvent]) -> None:
        for e in chunk:
            record_event.apply_async(
                args=[encode_event(e).decode()],
                queue=settings.tasks_queue,
                producer=producer,
                routing_key=settings.tasks_queue,
            )

    from kombu import Queue

    Queue(settings.tasks_queue, durable=True)(conn.channel()).declare()
    send(events)
    command = [
        sys.executable, "-m", "celery", "-A", "workers.baseline", "worker", "--pool=prefork",
        f"--concurrency={concurrency}", "-Q", settings.tasks_queue, "--without-gossip",
        "--without-mingle", "--without-heartbeat", "--loglevel=WARNING",
    ]  # fmt: skip
    try:
        return measure(
            "baseline",
            settings,
            events,
            latency_events,
            snap,
            [command],
            [env],
            send,
            1,
            drain_timeout=900,
        )
    finally:
        conn.release()


def measure(
    name: str,
    settings: Settings,
    events: list[UsageEvent],
    latency_events: list[UsageEvent],
    snap: catalog.Catalog,
    commands: list[list[str]],
    envs: list[dict[str, str]],
    publish: Callable[[list[UsageEvent]], None],
    per_message: int,
    drain_timeout: float,
    curve: Sequence[tuple[float, list[UsageEvent]]] = (),
) -> Result:
    """The one measurement protocol every broker scenario goes through (a fair comparison).

    The queue already holds ``events``. Start the worker processes, wait until every event is
    recorded, take the sustained rate and CPU from the 10th-90th percentile of commit times, then
    publish ``latency_events`` paced at half that rate and measure publish-to-commit latency.
    ``curve``: then the same again for each (fraction of the rate, its own events), once the
    phase before is all recorded. Stop the workers, then audit and compare with the generator's
    expected totals.
    """
    procs: list[subprocess.Popen[bytes]] = []
    sampler = Sampler(lambda: [p.pid for p in procs])
    sampler.start()
    try:
        procs.extend(
            subprocess.Popen(command, env=env, cwd=ROOT)
            for command, env in zip(commands, envs, strict=True)
        )
        unique = len({e.event_id for e in events})
        wait_recorded(settings, unique, timeout=drain_timeout, procs=procs)
        rate, t10, t90, windows = commit_window(settings, events[0].event_id.split("-")[0])
        cpu = sampler.usage_between(t10, t90)
        latency = measure_latency(settings, publish, latency_events, rate / 2, per_message)
        expected = unique + len({e.event_id for e in latency_events})
        wait_recorded(settings, expected, timeout=120, procs=procs)
        time.sleep(0.3)  # one more CPU sample after the phase
        points: list[tuple[float, Latency]] = []
        for fraction, phase_events in curve:
            point = measure_latency(settings, publish, phase_events, rate * fraction, per_message)
            expected += len({e.event_id for e in phase_events})
            wait_recorded(settings, expected, timeout=120, procs=procs)
            time.sleep(0.3)
            points.append((fraction, point))
    finally:
        _stop(procs, sampler)
        _delete_broker_objects(settings)
    published = events + latency_events + [e for _f, phase in curve for e in phase]
    audit_ok, balances_ok = verify(settings, published, snap)
    result = _result(
        name, unique, rate, t90 - t10, cpu, sampler, latency.p50_ms, latency.p99_ms, rate / 2,
        audit_ok, balances_ok, windows,
    )  # fmt: skip
    result.latency_p99_by_second = latency.p99_by_second_ms
    result.latency_cpu = _phase_cpu(sampler, latency)
    if curve:
        result.load_curve = [
            LoadPoint(
                fraction,
                rate * fraction,
                p.p50_ms,
                p.p99_ms,
                _phase_cpu(sampler, p),
                tuple(p.p99_by_second_ms),
            )
            for fraction, p in points
        ]
    return result


def _phase_cpu(sampler: Sampler, phase: Latency) -> tuple[float, float, float, float]:
    """CPU in % of one core (broker, PostgreSQL, workers, publisher) during a latency phase."""
    seconds = max(phase.end - phase.start, 1e-3)
    used = sampler.all_usage_between(phase.start, phase.end)
    return (
        100 * used[0] / seconds, 100 * used[1] / seconds, 100 * used[2] / seconds,
        100 * used[3] / seconds,
    )  # fmt: skip


def _delete_broker_objects(settings: Settings) -> None:
    """The scenario's queues and exchanges (each run names its own): a run leaves none behind."""
    queues = [*broker.usage_queue_names(settings), settings.tasks_queue, settings.exports_queue]
    exchanges = [
        settings.usage_exchange,
        settings.wallet_events_exchange,
        settings.tasks_queue,
        settings.exports_queue,
    ]
    with Connection(settings.broker_url) as conn:
        for name in queues:
            with contextlib.suppress(Exception), conn.channel() as channel:
                channel.queue_delete(name)
        for name in exchanges:
            with contextlib.suppress(Exception), conn.channel() as channel:
                channel.exchange_delete(name)


def _stop(procs: Sequence[subprocess.Popen[bytes]], sampler: Sampler) -> None:
    """SIGTERM the workers (they finish the batch in hand), wait, stop sampling."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)
    sampler.stop()


def _sql_worker(database_url: str, bodies: list[bytes], batch_messages: int) -> None:
    settings = replace(Settings.from_env({}), database_url=database_url)
    q = db.queries(settings)
    with db.connect(settings) as conn:
        snap = catalog.snapshot(conn, q)
        for i in range(0, len(bodies), batch_messages):
            process_batch(
                conn, q, snap, bodies[i : i + batch_messages], settings, datetime.now(UTC)
            )


def run_sql(
    events: list[UsageEvent],
    snap: catalog.Catalog,
    processes: int,
    batch_events: int,
    label: str = "sql",
) -> Result:
    settings = scenario_settings("sql")
    bodies = [encode_envelope(events[i : i + 100]) for i in range(0, len(events), 100)]
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_sql_worker,
            args=(settings.database_url, bodies[k::processes], batch_events // 100),
        )
        for k in range(processes)
    ]
    sampler = Sampler(lambda: [p.pid for p in procs if p.pid is not None])
    sampler.start()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sampler.stop()
    unique = len({e.event_id for e in events})
    rate, t10, t90, windows = commit_window(settings, events[0].event_id.split("-")[0])
    cpu = sampler.usage_between(t10, t90)
    audit_ok, balances_ok = verify(settings, events, snap)
    return _result(
        label,
        unique,
        rate,
        t90 - t10,
        cpu,
        sampler,
        None,
        None,
        None,
        audit_ok,
        balances_ok,
        windows,
    )


def _result(
    name: str,
    events: int,
    rate: float,
    window: float,
    cpu: tuple[float, float, float],
    sampler: Sampler,
    p50: float | None,
    p99: float | None,
    lat_rate: float | None,
    audit_ok: bool,
    balances_ok: bool,
    windows: Deciles,
) -> Result:
    window = max(window, 1e-3)
    return Result(
        scenario=name,
        events=events,
        rate=rate,
        p50_ms=p50,
        p99_ms=p99,
        latency_rate=lat_rate,
        cpu_broker=100 * cpu[0] / window,
        cpu_postgres=100 * cpu[1] / window,
        cpu_workers=100 * cpu[2] / window,
        cpu_us_per_event=1e6 * sum(cpu) / (rate * window),
        peak_worker_rss_mb=max((rss for _t, rss in sampler.rss), default=0) / 2**20,
        audit_ok=audit_ok,
        balances_ok=balances_ok,
        rate_windows=[rate for _a, _b, rate in windows],
        rss_windows_mb=[sampler.peak_rss_mb_between(a, b) for a, b, _rate in windows],
    )


def print_latency_phases(results: list[Result]) -> None:
    """Where the latency phase spent the CPU, and its p99 second by second."""
    print("\nlatency phase: CPU % of one core (broker, postgres, workers, publisher), p99 ms")
    for r in results:
        if r.latency_cpu and r.latency_p99_by_second:
            cpu = " ".join(f"{x:.0f}" for x in r.latency_cpu)
            by_second = " ".join(f"{x:,.0f}" for x in r.latency_p99_by_second)
            print(f"{r.scenario:<23}cpu {cpu} | p99 {by_second}")


def print_load_curves(results: list[Result]) -> None:
    """--load-curve: each scenario's latency at each fraction of its rate, half rate included."""
    rows = [r for r in results if r.load_curve]
    if not rows:
        return
    print("\nload curve: p50 / p99 ms at fractions of the sustained rate (CPU % total)")
    for r in rows:
        assert r.load_curve is not None and r.latency_cpu is not None
        points = [
            LoadPoint(0.5, r.latency_rate or 0.0, r.p50_ms or 0.0, r.p99_ms or 0.0, r.latency_cpu),
            *r.load_curve,
        ]
        cells = [
            f"{p.fraction:.0%} ({p.rate:,.0f}/s): {p.p50_ms:,.0f} / {p.p99_ms:,.0f} "
            f"({sum(p.cpu):.0f}%)"
            for p in sorted(points, key=lambda p: p.fraction)
        ]
        print(f"{r.scenario:<23}" + "  ".join(cells))


def print_rounds(results: list[Result]) -> None:
    """--rounds: each round's rate per account count, and its ratio to the first count's rate in
    the same round (the counts alternate, so a slow period of the VM hits both)."""
    groups: dict[str, dict[int, dict[int, float]]] = {}
    for r in results:
        if r.round:
            groups.setdefault(r.group, {}).setdefault(r.round, {})[r.accounts] = r.rate
    if not groups or max(len(rounds) for rounds in groups.values()) < 2:
        return
    print("\nrounds: events/s per account count, and the ratio to the first count in the round")
    for group, rounds in groups.items():
        counts = sorted({n for rates in rounds.values() for n in rates})
        ratios: dict[int, list[float]] = {n: [] for n in counts[1:]}
        for round_, rates in sorted(rounds.items()):
            cells = []
            for n in counts:
                cell = f"{n:,}: {rates[n]:,.0f}" if n in rates else f"{n:,}: -"
                if n != counts[0] and n in rates and counts[0] in rates:
                    ratios[n].append(rates[n] / rates[counts[0]])
                    cell += f" ({ratios[n][-1]:.0%})"
                cells.append(cell)
            print(f"{group:<23}round {round_}  " + "  ".join(cells))
        for n, values in ratios.items():
            if values:
                mean = sum(values) / len(values)
                low, high = min(values), max(values)
                spread = f"rounds {low:.0%}-{high:.0%}"
                print(f"{group:<23}{n:,} accounts: {mean:.1%} of the rate ({spread})")


def print_deciles(results: list[Result]) -> None:
    """The shape of each run: events/s and the workers' peak RSS in its 2nd to 9th tenth."""
    print("\nper tenth of the run (2nd to 9th): events/s, then peak worker RSS in MB")
    for r in results:
        if r.rate_windows and r.rss_windows_mb:
            print(f"{r.scenario:<23}" + " ".join(f"{x:>7,.0f}" for x in r.rate_windows))
            rss = ("-" if x is None else f"{x:,.0f}" for x in r.rss_windows_mb)
            print(f"{'':<23}" + " ".join(f"{x:>7}" for x in rss))


# --- main --------------------------------------------------------------------------------------
def print_table(results: list[Result]) -> None:
    base = next((r.rate for r in results if r.scenario == "baseline"), None)
    head = (
        f"{'scenario':<23}{'events':>9}{'events/s':>10}{'x base':>8}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'@ ev/s':>8}{'cpu mq%':>8}{'cpu pg%':>8}{'cpu wk%':>8}"
        f"{'us/ev':>7}{'rss MB':>8}  correct"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        x = f"{r.rate / base:.1f}" if base else "-"
        p50 = f"{r.p50_ms:.0f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.0f}" if r.p99_ms is not None else "-"
        at = f"{r.latency_rate:.0f}" if r.latency_rate is not None else "-"
        ok = "yes" if r.audit_ok and r.balances_ok else "NO"
        print(
            f"{r.scenario:<23}{r.events:>9,}{r.rate:>10,.0f}{x:>8}{p50:>8}{p99:>8}{at:>8}"
            f"{r.cpu_broker:>8.0f}{r.cpu_postgres:>8.0f}{r.cpu_workers:>8.0f}"
            f"{r.cpu_us_per_event:>7.0f}{r.peak_worker_rss_mb:>8.0f}  {ok}"
        )


FLEET_SCENARIOS = ("single", "envelope100", "envelope100_hash")


@dataclass(frozen=True)
class Variant:
    """A fleet scenario run again with other worker settings, worker or partition count."""

    name: str = ""
    env: tuple[tuple[str, str], ...] = ()
    workers: int | None = None
    partitions: int | None = None  # envelope100_hash only
    hot_set: HotSet | None = None  # --hot-set
    gateway: GatewayFraming | None = None  # how the simulated gateway writes (FastPublisher)


def ranked_accounts(accounts: list[str], hot_set: HotSet) -> list[str]:
    """The accounts in the order the generator's Zipf-like traffic falls off along.

    ``first``: as given (sorted ids), so the busiest wallets are the first a batch locks (its
    account order) and are held the longest. ``scattered``: a seeded shuffle, the same for every
    scenario of a count, so the busiest fall anywhere in that order, as arbitrary ids would.
    """
    if hot_set == "scattered":
        return random.Random(len(accounts)).sample(accounts, len(accounts))
    if hot_set == "first":
        return list(accounts)
    raise ValueError(f"hot set {hot_set!r}: expected one of {HOT_SETS}")


def parse_fractions(text: str) -> tuple[float, ...]:
    """``0.3,0.4,0.6`` -> fractions of the sustained rate, each in (0, 1.5]."""
    try:
        fractions = tuple(float(item) for item in text.split(","))
    except ValueError:
        fractions = ()
    if not fractions or not all(0 < f <= 1.5 for f in fractions):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected fractions of the rate in (0, 1.5], e.g. 0.3,0.4,0.6"
        )
    return fractions


def parse_variant(text: str) -> Variant:
    """``w3:workers=3,partitions=8,hot=scattered,gateway=pyamqp,BILLING_BATCH_EVENTS=2000`` ->
    a ``Variant``."""
    name, _, assignments = text.partition(":")
    pairs = [item.split("=", 1) for item in assignments.split(",") if "=" in item]
    env = tuple((k, v) for k, v in pairs if k.startswith("BILLING_"))
    counts = {k: v for k, v in pairs if k in ("workers", "partitions")}
    hot = [v for k, v in pairs if k == "hot"]  # checked against HOT_SETS below
    gateway = [v for k, v in pairs if k == "gateway"]  # and GATEWAY_FRAMINGS
    if (
        not name
        or not pairs
        or len(env) + len(counts) + len(hot) + len(gateway) != len(pairs)
        or not all(v.isdigit() and int(v) >= 1 for v in counts.values())
        or not all(v in HOT_SETS for v in hot)
        or not all(v in GATEWAY_FRAMINGS for v in gateway)
    ):
        raise SystemExit(
            f"--variant {text!r}: expected NAME:SETTING[,SETTING...], each workers=N, "
            "partitions=N, hot=first|scattered, gateway=frames|pyamqp or BILLING_VAR=VALUE"
        )
    workers, partitions = counts.get("workers"), counts.get("partitions")
    return Variant(
        name,
        env,
        int(workers) if workers else None,
        int(partitions) if partitions else None,
        cast("HotSet", hot[-1]) if hot else None,
        cast("GatewayFraming", gateway[-1]) if gateway else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, correctness only")
    parser.add_argument(
        "--only",
        action="append",
        choices=["baseline", "single", "envelope100", "envelope100_hash", "sql"],
    )
    parser.add_argument("--events", type=int, help="events for the fleet scenarios")
    parser.add_argument("--baseline-events", type=int, default=10_000)
    parser.add_argument(
        "--accounts",
        default="1000",
        help="accounts; several (1000,10000) run each fleet scenario once per count, same run",
    )
    parser.add_argument("--workers", type=int, default=2, help="usage worker processes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each fleet scenario's account counts and variants this many times, "
        "alternating (same run), and print each round's ratio between the counts",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:SETTING[,...]",
        help="also run each fleet scenario with these settings (same run); a SETTING is "
        "workers=N, partitions=N (envelope100_hash), hot=first|scattered (--hot-set) or "
        "BILLING_VAR=VALUE",
    )
    parser.add_argument(
        "--hot-set",
        choices=HOT_SETS,
        default="first",
        help="which accounts get the Zipf-like hot set's traffic: the first ids (acct-00000 is "
        "the busiest; its wallet is locked first in a batch's account order, the longest hold) "
        "or accounts at seeded random positions in that order",
    )
    parser.add_argument(
        "--gateway",
        choices=GATEWAY_FRAMINGS,
        default="frames",
        help="how the simulated gateway writes a message: one socket write of frames encoded "
        "once (default), or py-amqp's basic_publish (the gateway of runs before the tenth "
        "session; in a loop it costs about 15 us of CPU per message against 3-4)",
    )
    parser.add_argument("--batch-events", type=int, default=5_000)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument(
        "--load-curve",
        type=parse_fractions,
        default=(),
        metavar="F[,F...]",
        help="fleet scenarios: after the half-rate phase, a latency phase at each of these "
        "fractions of the sustained rate (e.g. 0.3,0.4,0.6), each as long and with its own "
        "events, to show where the latency turns up",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    scenarios = args.only or ["baseline", "single", "envelope100", "envelope100_hash", "sql"]
    fleet_events = args.events or (3_000 if args.quick else 200_000)
    base_events = 300 if args.quick else args.baseline_events
    lat_seconds = 0.5 if args.quick else args.latency_seconds
    counts = [50] if args.quick else [int(n) for n in str(args.accounts).split(",")]
    all_accounts = [f"acct-{i:05d}" for i in range(max(counts))]
    print(f"preparing: {len(all_accounts):,} accounts, catalog, template database ...", flush=True)
    snap = prepare_template(all_accounts)
    now = datetime.now(UTC)
    worker_env = {"BILLING_BATCH_EVENTS": str(args.batch_events)}
    variants = [Variant(), *(parse_variant(v) for v in args.variant)]

    results: list[Result] = []
    runs = [
        (name, count, variant, round_)
        for name in scenarios
        for round_ in range(1, (args.rounds if name in FLEET_SCENARIOS else 1) + 1)
        for count in (counts if name != "baseline" else counts[:1])
        for variant in (variants if name in FLEET_SCENARIOS else variants[:1])
    ]
    for name, count, variant, round_ in runs:
        hot_set: HotSet = variant.hot_set or args.hot_set
        ranked = ranked_accounts(all_accounts[:count], hot_set)
        shape = TrafficShape(accounts=ranked, window=timedelta(hours=6))

        def make(prefix: str, n: int, shape: TrafficShape = shape) -> list[UsageEvent]:
            return list(generate(snap, shape, n, seed=42, now=now, prefix=prefix))

        tag = f"[{variant.name}]" if variant.name else ""
        label = (name if len(counts) == 1 else f"{name}@{count}") + tag
        group = name + tag  # the scenario and variant, all counts and rounds
        label += f"#{round_}" if args.rounds > 1 and name in FLEET_SCENARIOS else ""
        env = {**worker_env, **dict(variant.env)}
        workers = variant.workers or args.workers
        framing = variant.gateway or args.gateway
        print(f"running {label} ...", flush=True)
        if name == "baseline":
            lat = make("blat", max(50, int(600 * lat_seconds)))
            results.append(run_baseline(make("base", base_events), lat, snap, 2))
        elif name == "single":
            lat = make("slat", max(200, int(8_000 * lat_seconds)))
            curve = [(f, make(f"slat{f:g}-", len(lat))) for f in args.load_curve]
            events = make("single", fleet_events)
            results.append(
                run_fleet(
                    label, events, lat, snap, 1, workers, env, curve=curve, gateway_framing=framing
                )
            )
        elif name.startswith("envelope100"):
            lat = make("elat", max(1_000, int(25_000 * lat_seconds)))
            curve = [(f, make(f"elat{f:g}-", len(lat))) for f in args.load_curve]
            events = make("env", fleet_events)
            partitions = (variant.partitions or HASH_PARTITIONS) if name.endswith("_hash") else 1
            # the prefetch the README gives for envelopes of 100 (two batches), unless a variant
            # sets one: the default 4,000 is for single events
            env = {"BILLING_PREFETCH": str(ENVELOPE_PREFETCH), **env}
            results.append(
                run_fleet(
                    label,
                    events,
                    lat,
                    snap,
                    100,
                    workers,
                    env,
                    partitions,
                    curve=curve,
                    gateway_framing=framing,
                )
            )
        else:
            events = make("sql", fleet_events)
            results.append(run_sql(events, snap, args.workers, args.batch_events, label=label))
        results[-1].group, results[-1].accounts, results[-1].round = group, count, round_
        results[-1].hot_set = hot_set
        print_table(results[-1:])
    print_deciles(results)
    print_latency_phases(results)
    print_load_curves(results)
    print_rounds(results)
    print()
    print_table(results)
    if args.quick:
        print("(--quick: a correctness smoke test; at this size the timings mean nothing)")
        for name in [*scenarios, "template"]:  # a smoke test leaves nothing behind
            _drop(f"{DB_PREFIX}_{name}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    correct = all(r.audit_ok and r.balances_ok for r in results)
    if not correct:
        print("FAILED: a scenario's books do not match the generator's totals", file=sys.stderr)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
