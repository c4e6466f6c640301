"""The worker's HTTP side: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

Served on ``BILLING_METRICS_PORT`` (default 9808, 0 = off) by every ``billing worker`` process,
on a daemon thread with the standard library's HTTP server (no framework, no Celery):

* ``/healthz`` (liveness): 200 while the process's loops are alive: each registered loop (the
  usage consumer) has beaten within ``stale_after`` seconds. A wedged consumer answers 503, and
  an orchestrator restarts the process; its unacknowledged messages are redelivered.
* ``/readyz`` (readiness): 200 when every readiness check passes (the consumer is consuming, the
  broker connection is up, the database answers ``SELECT 1`` within a second); 503 otherwise,
  with one ``name: ok|failed (detail)`` line per check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("billing.health")

Check = Callable[[], "tuple[bool, str]"]


class Health:
    """Liveness heartbeats and readiness checks, shared by the worker's threads."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.stale_after = stale_after
        self._beats: dict[str, float] = {}
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        self._beats[loop] = time.monotonic()  # a dict store: atomic under the GIL

    def forget(self, loop: str) -> None:
        with self._lock:
            self._beats.pop(loop, None)

    def add_check(self, name: str, check: Check) -> None:
        with self._lock:
            self._checks[name] = check

    def live(self) -> tuple[bool, list[str]]:
        now = time.monotonic()
        lines = []
        ok = True
        for loop, at in sorted(self._beats.items()):
            age = now - at
            fresh = age <= self.stale_after
            ok = ok and fresh
            lines.append(f"{loop}: {'ok' if fresh else 'stale'} (last beat {age:.1f}s ago)")
        return ok, lines

    def ready(self) -> tuple[bool, list[str]]:
        with self._lock:
            checks = sorted(self._checks.items())
        ok = True
        lines = []
        for name, check in checks:
            try:
                passed, detail = check()
            except Exception as exc:  # a probe must answer, whatever the check did
                passed, detail = False, f"{type(exc).__name__}: {exc}"
            ok = ok and passed
            suffix = f" ({detail})" if detail else ""
            lines.append(f"{name}: {'ok' if passed else 'failed'}{suffix}")
        return ok, lines


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, lines = self.health.live() if path == "/healthz" else self.health.ready()
            body = ("ok\n" if ok else "unavailable\n") + "".join(f"{line}\n" for line in lines)
            self._send(200 if ok else 503, body.encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the worker's log


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a daemon thread; ``close`` to stop."""

    def __init__(self, health: Health, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
        handler = type("Handler", (_Handler,), {"health": health})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="metrics-http", daemon=True
        )
        self.thread.start()
        log.info("metrics and health on :%d (/metrics /healthz /readyz)", self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
