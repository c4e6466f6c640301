"""The scale-out benchmark's --quick mode: two workers on hash partitions leave exact books.

Timings at this size mean nothing and are not asserted. The full run (1, 2, 4 workers x single,
hash) is the lead's measurement: docs/capacity.md gives the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ADMIN_URL, BROKER_URL

pytestmark = pytest.mark.slow


def test_quick_scaleout_is_correct_with_hash_partitions(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_BENCH_DATABASE_URL": ADMIN_URL,
            "BILLING_BENCH_BROKER_URL": BROKER_URL,
            "BILLING_BENCH_DB_PREFIX": f"billing_scaleq_{os.getpid()}",
        }
    )
    out = tmp_path / "scaleout.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench.scaleout", "--quick", "--workers", "2",
            "--modes", "hash", "--json", str(out),
        ],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [result] = json.loads(out.read_text())
    assert (result["mode"], result["workers"]) == ("hash", 2)
    assert result["audit_ok"] and result["balances_ok"]
    assert result["events"] > 500
