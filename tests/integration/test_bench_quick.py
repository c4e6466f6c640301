"""The throughput benchmark's --quick mode: every scenario runs and its books are exact.

Timings at this size mean nothing and are not asserted; what is asserted is that the baseline,
the fleet (single events and envelopes) and the raw SQL path each leave an audit-clean ledger whose
balances equal the generator's independently computed totals (the benchmark exits 1 otherwise),
the events of a --load-curve's extra latency phase included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ADMIN_URL, BROKER_URL

pytestmark = pytest.mark.slow


def test_quick_benchmark_is_correct_in_every_scenario() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_BENCH_DATABASE_URL": ADMIN_URL,
            "BILLING_BENCH_BROKER_URL": BROKER_URL,
            "BILLING_BENCH_DB_PREFIX": f"billing_benchq_{os.getpid()}",
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--quick", "--load-curve", "0.25"],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    curve = run.stdout.split("load curve:")[1].split("\n\n")[0]
    assert any(line.startswith("single") and "25% (" in line for line in curve.splitlines())
    table = run.stdout.split("\n\n")[-1]
    for scenario in ("baseline", "single", "envelope100", "sql"):
        assert any(
            line.startswith(scenario) and line.endswith("yes") for line in table.splitlines()
        ), table
