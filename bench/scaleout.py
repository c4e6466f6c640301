"""Scale-out benchmark: 1, 2 and 4 usage-worker processes, partitioning by account off and on.

Against one RabbitMQ and one PostgreSQL, with the same seeded synthetic traffic as
``bench.throughput`` (a Zipf-like hot set of accounts, the catalog's models, 5% BYOK, 1%
duplicates), for each worker count and partitioning mode it pre-loads the queue(s), starts the
``billing worker`` processes, and reports:

* sustained events/s (10th to 90th percentile of commit times, as ``bench.throughput``);
* lock waits: ``pg_stat_activity`` sampled every 50 ms during the run: the share of samples in
  which a billing backend was waiting on a heavyweight lock (``wait_event_type = 'Lock'``: row,
  transaction id, tuple), with the most frequent wait events;
* correctness: ``billing audit`` and every balance against the generator's expected totals (a
  wrong answer fails the run, exit 1).

Modes: ``single`` is one usage queue that every worker consumes; ``hash`` partitions the stream
by account over 4 queues (``BILLING_USAGE_PARTITIONS=4``: CRC-32 of the account id mod 4,
computed by the publisher, ``broker.partition_of``), each worker consuming a group of them split by
their traffic (``broker.assign_partitions``), so one account's events go to one worker: no two
workers contend for the same wallet row.

    python -m bench.scaleout                         # 1, 2, 4 workers x single, hash (minutes)
    python -m bench.scaleout --quick                 # tiny, correctness only
    python -m bench.scaleout --workers 1,2 --modes hash --events 50000 --json out.json
    python -m bench.scaleout --workers 2 --modes single --accounts 1000,10000,1000,10000

Servers as ``bench.throughput``
(``BILLING_BENCH_DATABASE_URL``, ``BILLING_BENCH_BROKER_URL``); databases are named
``BILLING_BENCH_DB_PREFIX`` (default ``billing_scaleout``) + ``_<scenario>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta

os.environ.setdefault("BILLING_BENCH_DB_PREFIX", "billing_scaleout")

from bench.throughput import (
    DB_PREFIX,
    HASH_PARTITIONS,
    ROOT,
    _drop,
    commit_window,
    env_for,
    partition_groups,
    prepare_template,
    scenario_settings,
    verify,
    wait_recorded,
)
from billing import broker, catalog, db
from billing.events import UsageEvent
from billing.settings import Settings
from billing.synthetic import TrafficShape, generate

SAMPLE_INTERVAL_S = 0.05


@dataclass
class ScaleResult:
    mode: str
    workers: int
    accounts: int
    events: int
    rate: float
    lock_wait_share: float  # samples with >= 1 backend waiting on a Lock / samples with activity
    lock_waiting_backends: float  # mean backends waiting on a Lock per sample
    active_backends: float  # mean backends in a transaction per sample
    top_waits: list[tuple[str, int]] = field(default_factory=list)
    audit_ok: bool = False
    balances_ok: bool = False


class LockSampler(threading.Thread):
    """Samples the billing backends of one database in ``pg_stat_activity``."""

    QUERY = """
        SELECT state, wait_event_type, wait_event FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND state <> 'idle'"""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.stop_flag = threading.Event()
        self.samples = 0
        self.busy_samples = 0
        self.lock_samples = 0
        self.lock_backends = 0
        self.active = 0
        self.waits: Counter[str] = Counter()

    def run(self) -> None:
        with db.connect(self.settings) as conn:
            while not self.stop_flag.is_set():
                rows = conn.execute(self.QUERY).fetchall()  # type: ignore[arg-type]
                self.samples += 1
                if rows:
                    self.busy_samples += 1
                    self.active += len(rows)
                locked = [r for r in rows if r[1] == "Lock"]
                if locked:
                    self.lock_samples += 1
                    self.lock_backends += len(locked)
                for _state, kind, event in rows:
                    if kind is not None and kind != "Client":
                        self.waits[f"{kind}:{event}"] += 1
                time.sleep(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()


def delete_broker_entities(settings: Settings) -> None:
    with broker.connect(settings) as conn:
        channel = conn.channel()
        for name in broker.usage_queue_names(settings):
            channel.queue_delete(name)
        for name in (settings.tasks_queue, settings.exports_queue):
            channel.queue_delete(name)
        for name in (
            settings.usage_exchange,
            settings.wallet_events_exchange,
            settings.tasks_queue,
            settings.exports_queue,
        ):
            channel.exchange_delete(name)


def run_scenario(
    mode: str,
    workers: int,
    accounts: int,
    events: list[UsageEvent],
    snap: catalog.Catalog,
    per_message: int,
    batch_events: int,
    timeout: float,
) -> ScaleResult:
    name = f"{mode}_w{workers}"
    settings = scenario_settings(name)
    if mode == "hash":
        settings = replace(settings, usage_partitions=HASH_PARTITIONS)
    with broker.UsagePublisher(settings) as publisher:
        publisher.publish_many(events, envelope_size=per_message)
    base_env = {"BILLING_BATCH_EVENTS": str(batch_events)}
    groups: list[tuple[int, ...]] = []
    if mode == "hash":
        base_env["BILLING_USAGE_PARTITIONS"] = str(HASH_PARTITIONS)
        groups = partition_groups(events, workers)
    command = [sys.executable, "-m", "billing.cli", "worker", "--loglevel=WARNING", "--no-migrate"]
    sampler = LockSampler(settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sampler.start()
        for i in range(workers):
            env = dict(base_env)
            if mode == "hash":
                env["BILLING_USAGE_CONSUME_PARTITIONS"] = ",".join(map(str, groups[i]))
            procs.append(subprocess.Popen(command, env=env_for(settings, **env), cwd=ROOT))
        unique = len({e.event_id for e in events})
        wait_recorded(settings, unique, timeout=timeout, procs=procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        sampler.stop()
    rate, _t10, _t90, _windows = commit_window(settings, events[0].event_id.split("-")[0])
    audit_ok, balances_ok = verify(settings, events, snap)
    delete_broker_entities(settings)
    busy = max(sampler.busy_samples, 1)
    return ScaleResult(
        mode=mode,
        workers=workers,
        accounts=accounts,
        events=unique,
        rate=rate,
        lock_wait_share=sampler.lock_samples / busy,
        lock_waiting_backends=sampler.lock_backends / max(sampler.samples, 1),
        active_backends=sampler.active / max(sampler.samples, 1),
        top_waits=sampler.waits.most_common(4),
        audit_ok=audit_ok,
        balances_ok=balances_ok,
    )


def print_table(results: list[ScaleResult]) -> None:
    head = (
        f"{'mode':<7}{'workers':>8}{'accounts':>9}{'events':>9}{'events/s':>10}{'x 1 wkr':>8}"
        f"{'lock %':>8}{'waiting':>8}{'active':>8}  correct  top waits (samples)"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        one = next(
            (
                o.rate
                for o in results
                if o.mode == r.mode and o.accounts == r.accounts and o.workers == 1
            ),
            None,
        )
        x = f"{r.rate / one:.2f}" if one else "-"
        ok = "yes" if r.audit_ok and r.balances_ok else "NO"
        waits = ", ".join(f"{w} {n}" for w, n in r.top_waits) or "-"
        print(
            f"{r.mode:<7}{r.workers:>8}{r.accounts:>9,}{r.events:>9,}{r.rate:>10,.0f}{x:>8}"
            f"{100 * r.lock_wait_share:>7.1f}%{r.lock_waiting_backends:>8.2f}"
            f"{r.active_backends:>8.2f}  {ok:<7}  {waits}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, correctness only")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--modes", default="single,hash", help="single, hash or both")
    parser.add_argument("--events", type=int, help="events per scenario (default 200,000)")
    parser.add_argument(
        "--accounts",
        default="1000",
        help="accounts; several (1000,10000,1000,10000) run every scenario once per count, in "
        "that order, same run",
    )
    parser.add_argument("--envelope", type=int, default=100, help="events per message")
    parser.add_argument("--batch-events", type=int, default=5_000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    counts = [int(n) for n in args.workers.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"single", "hash"} or not all(1 <= n <= 64 for n in counts):
        parser.error("--modes takes single and/or hash; --workers counts 1..64")
    if "hash" in modes and max(counts) > HASH_PARTITIONS:
        parser.error(f"--modes hash: at most {HASH_PARTITIONS} workers (one partition each)")
    n_events = args.events or (600 if args.quick else 200_000)
    account_counts = [40] if args.quick else [int(n) for n in str(args.accounts).split(",")]
    accounts = [f"acct-{i:05d}" for i in range(max(account_counts))]
    print(f"preparing: {len(accounts):,} accounts, catalog, template database ...", flush=True)
    snap = prepare_template(accounts)
    now = datetime.now(UTC)
    timeout = 120 if args.quick else 1800

    results: list[ScaleResult] = []
    try:
        for n_accounts in account_counts:
            shape = TrafficShape(accounts=accounts[:n_accounts], window=timedelta(hours=6))
            for mode in modes:
                for workers in counts:
                    print(
                        f"running {mode} x {workers} worker(s), {n_accounts:,} accounts ...",
                        flush=True,
                    )
                    prefix = f"{mode[0]}{workers}"
                    events = list(generate(snap, shape, n_events, seed=42, now=now, prefix=prefix))
                    results.append(
                        run_scenario(
                            mode,
                            workers,
                            n_accounts,
                            events,
                            snap,
                            args.envelope,
                            args.batch_events,
                            timeout,
                        )
                    )
                    print_table(results[-1:])
    finally:
        if args.quick:  # a smoke test leaves nothing behind
            for mode in modes:
                for workers in counts:
                    _drop(f"{DB_PREFIX}_{mode}_w{workers}")
            _drop(f"{DB_PREFIX}_template")
    print()
    print_table(results)
    if args.quick:
        print("(--quick: a correctness smoke test; at this size the timings mean nothing)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=2)
    correct = all(r.audit_ok and r.balances_ok for r in results)
    if not correct:
        print("FAILED: a scenario's books do not match the generator's totals", file=sys.stderr)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
