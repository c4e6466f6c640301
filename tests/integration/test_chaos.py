"""The chaos runner's short mode: faults under load on private servers, books exact.

``python -m bench.chaos --short`` starts its own PostgreSQL cluster and RabbitMQ node (never the
shared ones), drives ~40 s of load through two real workers while it SIGKILLs workers mid-batch,
SIGTERMs one, restarts the broker and the database, runs a lock/statement timeout storm, floods
duplicates and a redelivery burst and mixes in poison; then it drains and exits 1 unless every
distinct event was recorded once, every poison item parked with its reason, the audit is clean
and every balance equals the independent expected total to the last decimal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # needs PostgreSQL 15 binaries and rabbitmq-server locally


def test_short_chaos_run_loses_nothing_and_charges_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--json", str(out)],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["audit_ok"] and result["lost"] == 0
    assert result["faults"]["sigkill"] >= 1
    assert result["faults"]["broker_restart"] >= 1
    assert result["faults"]["pg_restart"] >= 1
    assert result["faults"]["timeout_storm"] >= 1
    assert result["duplicates_injected"] > 0
    assert result["events_recorded"] == result["distinct_good_events"]
    assert result["balances_wrong"] == {}
    assert result["parked"] == result["expected_parked"]
    assert set(result["poison_injected"]) >= {"malformed_json", "too_large", "wrong_types"}
    assert result["sigterm_exit_codes"] and set(result["sigterm_exit_codes"]) == {0}
