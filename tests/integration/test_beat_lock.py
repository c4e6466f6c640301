"""``billing beat``: one scheduler per database, a second one waits and takes over."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from billing.settings import Settings

from .conftest import worker_env
from .helpers import wait_until

pytestmark = pytest.mark.slow


def start_beat(settings: Settings, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [
            sys.executable, "-m", "billing.cli", "beat",
            "--heartbeat-file", str(tmp_path / f"{name}.alive"),
            "--schedule", str(tmp_path / f"{name}.schedule"),
        ],
        env=worker_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_a_second_beat_stands_by_until_the_first_is_gone(
    settings: Settings, tmp_path: Path
) -> None:
    first = start_beat(settings, tmp_path, "a")
    second = None
    try:
        wait_until(lambda: (tmp_path / "a.alive").exists(), timeout=30)
        second = start_beat(settings, tmp_path, "b")
        wait_until(lambda: "standing by" in (tmp_path / "b.log").read_text(), timeout=30)
        assert not (tmp_path / "b.alive").exists()
        assert second.poll() is None
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        wait_until(lambda: (tmp_path / "b.alive").exists(), timeout=30)
        assert "beat lock acquired" in (tmp_path / "b.log").read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
