"""Two checkouts' usage workers on the same traffic, alternating, in one run.

A code change to the worker or its SQL cannot be compared with a ``--variant`` setting. This runs
``bench.throughput``'s ``envelope100`` scenario (the same events, 2 workers, one queue) with the
workers of another checkout (``billing worker`` started in that folder, so it imports that
folder's ``billing`` and reads its ``sql/``) and with this one's, alternating ``--rounds`` times,
so that neither always runs in the faster minutes of the VM; which of the two runs first
alternates too (round 1 before/after, round 2 after/before), since the first of a pair ran faster
in both orders (docs/performance.md, run AM).

    git worktree add /tmp/before HEAD~1
    .venv/bin/python -m bench.compare_checkouts /tmp/before [--rounds 2] [--accounts 10000]

One template database, migrated by this checkout, serves both: the other checkout's statements
must run on this schema (its migrations a prefix of these, as for an older commit whose queries a
later migration did not break; a change of migrations is then measured only in its statements).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bench.throughput as throughput
from billing.synthetic import TrafficShape, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    args = parser.parse_args()
    accounts = [f"acct-{i:05d}" for i in range(args.accounts)]
    snap = throughput.prepare_template(accounts)
    now = datetime.now(UTC)
    shape = TrafficShape(accounts=accounts, window=timedelta(hours=6))
    events = list(generate(snap, shape, args.events, seed=42, now=now, prefix="env"))
    latency = list(generate(snap, shape, 50_000, seed=42, now=now, prefix="elat"))
    this = throughput.ROOT
    results = []
    pair = [("before", args.before.resolve()), ("after", this)]
    for round_ in range(args.rounds):
        # which runs first alternates: the first of a pair ran faster in both orders (run AM)
        for label, root in pair if round_ % 2 == 0 else pair[::-1]:
            throughput.ROOT = root  # where the workers start, hence which billing they import
            env = {"BILLING_BATCH_EVENTS": "5000"}
            result = throughput.run_fleet(
                f"envelope100[{label}]", events, latency, snap, 100, 2, env
            )
            results.append(result)
            throughput.print_table([result])
    throughput.ROOT = this
    print()
    throughput.print_table(results)


if __name__ == "__main__":
    main()
