"""Celery beat under a PostgreSQL lock: at most one scheduler in the whole fleet.

Kubernetes runs beat as one replica with the ``Recreate`` strategy, but a rollout, a node
partition or an operator's ``docker compose up`` elsewhere can still start a second one. So
``billing beat`` first takes a session-level advisory lock on a dedicated connection and only
then starts the scheduler; a second beat waits as a hot standby. A watchdog thread checks the
lock's connection every few seconds: if it is gone the lock may be held by another beat now, so
the process exits at once (its orchestrator restarts it, and it waits for the lock again). The
watchdog also touches a heartbeat file that the container health check reads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from billing.db import connect
from billing.settings import Settings

log = logging.getLogger("billing.beat")

BEAT_LOCK_KEY = 0x6265_6174_6C6F_636B  # "beatlock"
CHECK_INTERVAL_S = 5.0


def acquire_lock(settings: Settings, poll_s: float = 5.0) -> psycopg.Connection[Any]:
    """Block until this process holds the beat lock; returns the connection that holds it."""
    waited = False
    while True:
        try:
            conn = connect(settings)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (BEAT_LOCK_KEY,)).fetchone()
            if row == (True,):
                log.info("beat lock acquired")
                return conn
            conn.close()
        except psycopg.OperationalError as exc:
            log.warning("database unavailable, retrying for the beat lock: %s", exc)
        if not waited:
            log.info("another beat holds the lock; standing by")
            waited = True
        time.sleep(poll_s)


def watch_lock(conn: psycopg.Connection[Any], heartbeat: Path | None) -> threading.Thread:
    """Exit the process as soon as the lock's connection is lost; touch ``heartbeat`` while held."""

    def check() -> None:
        while True:
            try:
                conn.execute("SELECT 1")
            except Exception:
                log.critical("lost the beat lock's database connection; exiting")
                os._exit(3)
            if heartbeat is not None:
                heartbeat.touch()
            time.sleep(CHECK_INTERVAL_S)

    thread = threading.Thread(target=check, name="beat-lock-watchdog", daemon=True)
    thread.start()
    return thread


def run_beat(settings: Settings, loglevel: str, schedule: Path, heartbeat: Path | None) -> None:
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s] %(message)s")
    conn = acquire_lock(settings)
    watch_lock(conn, heartbeat)
    from workers.app import app

    app.Beat(loglevel=loglevel, schedule=str(schedule)).run()
