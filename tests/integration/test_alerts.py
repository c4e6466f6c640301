"""Low-balance alerts on real PostgreSQL: once per crossing, re-armed above, auto top-up flag."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from billing import alerts, db, wallets
from billing.alerts import AutoTopupTrigger
from billing.catalog import snapshot
from billing.db import Queries
from billing.settings import Settings
from billing.topups import set_auto_topup
from billing.usage import price_events, record_isolating

from .helpers import make_event, open_account

D = Decimal


def low_balance_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT payload FROM outbox WHERE routing_key = 'wallet.low_balance' ORDER BY outbox_id"
        )
    ]


def test_a_crossing_publishes_once_not_once_per_request(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "0.05")
    alerts.set_alert(conn, q, "acme", D("0.04"), "tests")
    alerts.set_alert(conn, q, "acme", D("0.01"), "tests")
    snap = snapshot(conn, q)
    start = threading.Barrier(4)

    def requests(w: int) -> None:  # 4 workers x 5 batches of one 0.0033 event: 0.066 in all
        with db.connect(settings) as c:
            start.wait()
            for i in range(5):
                priced, _ = price_events([make_event(f"e-{w}-{i}")], snap)
                record_isolating(c, q, priced, [])

    threads = [threading.Thread(target=requests, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = low_balance_rows(conn)
    assert [p["threshold"] for p in sent] == ["0.04", "0.01"]  # each crossed once, in order
    assert all(p["auto_topup"] is False for p in sent)
    listed = alerts.list_alerts(conn, q, "acme")
    assert [(r["threshold"], r["below"]) for r in listed] == [(D("0.01"), True), (D("0.04"), True)]
    # back above one threshold re-arms it; crossing it again alerts again
    wallets.adjust(conn, q, "acme", D("0.03"), reason="top-up", actor="tests")
    assert len(low_balance_rows(conn)) == 2
    wallets.adjust(conn, q, "acme", D("-0.02"), reason="correction", actor="tests")
    assert [p["threshold"] for p in low_balance_rows(conn)] == ["0.04", "0.01", "0.01"]


def test_a_new_threshold_already_crossed_does_not_alert(
    conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "1")
    alerts.set_alert(conn, q, "acme", D("5"), "tests")
    wallets.adjust(conn, q, "acme", D("-0.5"), reason="x", actor="tests")
    assert low_balance_rows(conn) == []


def test_a_threshold_set_while_a_batch_debits_starts_from_the_committed_balance(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    """A batch holds the wallet and is about to commit a balance under the new threshold: the
    threshold set meanwhile must start "below" (the batch never saw it), not "above" for ever."""
    open_account(conn, q, "acme", "1")
    snap = snapshot(conn, q)
    done = threading.Event()
    with db.connect(settings) as batch, batch.transaction():
        priced, _ = price_events([make_event("big", input_tokens=900_000)], snap)  # $0.99
        record_isolating(batch, q, priced, [])  # its savepoint is released; the lock is held

        def operator() -> None:
            with db.connect(settings) as c:
                alerts.set_alert(c, q, "acme", D("0.50"), "tests")
            done.set()

        thread = threading.Thread(target=operator)
        thread.start()
        assert not done.wait(0.5), "setting a threshold must wait for the batch's commit"
    thread.join(10)
    listed = alerts.list_alerts(conn, q, "acme")
    assert [(r["threshold"], r["below"], r["balance"]) for r in listed] == [
        (D("0.50"), True, D("0.01"))
    ]


def test_with_auto_topup_the_alert_triggers_a_check(
    settings: Settings, conn: psycopg.Connection[Any], q: Queries
) -> None:
    open_account(conn, q, "acme", "10")
    set_auto_topup(conn, q, settings, "acme", threshold=D(5), amount=D(20), payment_method="pm_1")
    alerts.set_alert(conn, q, "acme", D(5), "tests")
    wallets.adjust(conn, q, "acme", D("-6"), reason="usage", actor="tests")
    published: list[tuple[str, dict[str, Any]]] = []
    triggered: list[int] = []

    def publish(key: str, body: bytes, message_id: str) -> None:
        published.append((key, orjson.loads(body)))

    wallets.relay_outbox(conn, q, AutoTopupTrigger(publish, lambda: triggered.append(1)))
    low = [(p["auto_topup"], p["balance"]) for k, p in published if k == "wallet.low_balance"]
    assert low == [(True, "4.00")]
    assert len(published) == 2  # wallet.replenished of the first credit, then the alert
    assert triggered == [1]


def test_cli_alerts(settings: Settings, conn: psycopg.Connection[Any], q: Queries) -> None:
    import json

    from click.testing import CliRunner

    from billing.cli import main

    from .conftest import worker_env

    open_account(conn, q, "acme", "3")
    cli = CliRunner(env=worker_env(settings))

    def run(*args: str, code: int = 0) -> str:
        result = cli.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    run("alerts", "set", "acme", "2.5")
    assert "positive" in run("alerts", "set", "acme", "0", code=2)
    listed = json.loads(run("alerts", "list", "--json"))
    assert [(a["account_id"], a["threshold"], a["below"]) for a in listed] == [
        ("acme", "2.50", False)
    ]
    run("alerts", "remove", "acme", "2.5")
    assert "no alert" in run("alerts", "remove", "acme", "2.5", code=2)
