"""Authorizations per second and latency of ``billing_authorize`` on real PostgreSQL.

Each client thread has its own connection and loops: authorize a request (the measured call:
the catalog is priced in process, then ONE database call), then release the hold (standing in
for the settlement a usage batch does; not measured). Two shapes:

* ``spread``: every call picks one of 1,000 funded wallets (little lock contention);
* ``hot``: every call is on ONE wallet (the row lock serialises them: the worst case of one
  customer bursting).

For each it prints authorizations/s and p50/p99/max latency, then checks the books: the audit
is clean, no hold is left active, and a wallet affording exactly N holds allowed exactly N of
4N concurrent calls (exit 1 otherwise).

    .venv/bin/python -m bench.holds                          # 10 s per point, 1/8/32 clients
    .venv/bin/python -m bench.holds --quick                  # tiny, correctness only
    .venv/bin/python -m bench.holds --clients 16 --seconds 20

``BILLING_BENCH_DATABASE_URL`` chooses the server (default the local one); the database is
``<BILLING_BENCH_DB_PREFIX>_holds``, recreated on each run and dropped after.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from bench.throughput import DB_PREFIX, _drop, _recreate, _url
from billing import catalog, db, holds, wallets
from billing.audit import run_audit
from billing.holds import AuthorizationRequest, Authorizer
from billing.settings import Settings

DATABASE = f"{DB_PREFIX}_holds"
ACCOUNTS = [f"acct-{i:04d}" for i in range(1_000)]
WORST = Decimal("0.0055")  # openai/o4-mini: 1000 input + 1000 max_tokens


@dataclass
class Point:
    shape: str
    clients: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def setup(settings: Settings) -> None:
    _recreate(DATABASE)
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
        for account in [*ACCOUNTS, "hot", "exact"]:
            wallets.create_account(conn, q, account)
            if account != "exact":
                wallets.adjust(conn, q, account, Decimal(1_000_000), reason="bench", actor="bench")
        conn.execute("VACUUM ANALYZE")


def req(account: str, hold_id: str | None = None) -> AuthorizationRequest:
    return AuthorizationRequest(
        account_id=account,
        api_key_id=f"key-{account}",
        model="openai/o4-mini",
        provider="openai",
        input_tokens=1000,
        max_tokens=1000,
        hold_id=hold_id,
    )


def run_point(settings: Settings, shape: str, clients: int, seconds: float) -> Point:
    q = db.queries(settings)
    authorizer = Authorizer(q, settings.hold_ttl)
    with db.connect(settings) as conn:
        authorizer.catalog(conn)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(n: int) -> None:
        rng = random.Random(n)
        mine = latencies[n]
        try:
            with db.connect(settings) as conn:
                start.wait()
                while not stop.is_set():
                    account = "hot" if shape == "hot" else rng.choice(ACCOUNTS)
                    t0 = time.perf_counter()
                    a = authorizer.authorize(conn, req(account), datetime.now(UTC))
                    mine.append(time.perf_counter() - t0)
                    if not a.allowed or a.hold_id is None:
                        raise AssertionError(f"denied: {a}")
                    holds.release(conn, q, a.hold_id, datetime.now(UTC), "bench")
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    every = sorted(x for lat in latencies for x in lat)
    return Point(
        shape,
        clients,
        len(every),
        elapsed,
        1000 * statistics.median(every),
        1000 * every[min(len(every) - 1, int(len(every) * 0.99))],
        1000 * every[-1],
    )


def check_exact(settings: Settings, afford: int) -> bool:
    """A wallet affording ``afford`` holds gets exactly that many of 4x concurrent calls."""
    q = db.queries(settings)
    with db.connect(settings) as conn:
        wallets.adjust(conn, q, "exact", WORST * afford, reason="bench", actor="bench")
    authorizer = Authorizer(q, settings.hold_ttl)
    calls = afford * 4
    start = threading.Barrier(calls)
    allowed: list[bool] = []
    # at most 48 connections: the server's max_connections (100 by default) is shared
    pool = db.make_pool(settings, min_size=min(calls, 48), max_size=min(calls, 48))
    with pool.connection() as conn:
        authorizer.catalog(conn)

    def one(i: int) -> None:
        start.wait()
        with pool.connection() as conn:
            allowed.append(
                authorizer.authorize(conn, req("exact", f"exact-{i}"), datetime.now(UTC)).allowed
            )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    ok = allowed.count(True) == afford
    print(f"exactness: {allowed.count(True)} of {calls} allowed, wallet affords {afford}: "
          f"{'ok' if ok else 'WRONG'}")  # fmt: skip
    return ok


def books_ok(settings: Settings) -> bool:
    q = db.queries(settings)
    with db.connect(settings) as conn:
        report = run_audit(conn, q)
        row = conn.execute(
            "SELECT count(*) FROM holds WHERE status = 'active' AND account_id <> 'exact'"
        ).fetchone()
    for check in report.checks:
        if not check.ok:
            print(f"audit FAILED: {check.name}: {check.violations[:3]}")
    print(f"audit: {'clean' if report.ok else 'FAILED'}; active holds left: {row}")
    return report.ok and row == (0,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, correctness only")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured point")
    parser.add_argument("--clients", type=int, action="append", help="client threads (repeat)")
    args = parser.parse_args(argv)
    clients = args.clients or ([2] if args.quick else [1, 8, 32])
    seconds = 0.5 if args.quick else args.seconds
    settings = replace(Settings.from_env({}), database_url=_url(DATABASE))
    setup(settings)
    try:
        points = [
            run_point(settings, shape, n, seconds) for shape in ("spread", "hot") for n in clients
        ]
        print(f"{'shape':<8}{'clients':>8}{'calls':>9}{'auth/s':>10}{'p50 ms':>9}"
              f"{'p99 ms':>9}{'max ms':>9}")  # fmt: skip
        for p in points:
            print(f"{p.shape:<8}{p.clients:>8}{p.calls:>9}{p.rate:>10.0f}{p.p50_ms:>9.2f}"
                  f"{p.p99_ms:>9.2f}{p.max_ms:>9.2f}")  # fmt: skip
        ok = check_exact(settings, 10 if args.quick else 50) and books_ok(settings)
    finally:
        _drop(DATABASE)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
