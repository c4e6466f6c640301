"""Where a batch's time goes: each step of the batch transaction timed, per event.

One process, in-process (no broker), against real PostgreSQL: decode and price, then the
statements of ``billing.usage.record_batch`` one by one, in batches of 5,000 events from
envelopes of 100, for 1,000 accounts. Prints microseconds of wall time per event for each step.

    .venv/bin/python -m bench.batch_steps [--events 50000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from bench.throughput import TEMPLATE, _recreate, _url, prepare_template
from billing import catalog, db
from billing.events import encode_envelope
from billing.ledger import PostingKind, SystemAccount, post_wallet_movement
from billing.money import EXACT, ZERO
from billing.settings import Settings
from billing.spend_controls import BatchControls, after_debit
from billing.synthetic import TrafficShape, generate
from billing.usage import claim_event_keys, copy_line, decode_and_price
from billing.wallets import record_crossings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--batch", type=int, default=5_000, help="events per batch (a multiple of 100)"
    )
    args = parser.parse_args()
    accounts = [f"acct-{i:05d}" for i in range(1_000)]
    prepare_template(accounts)
    _recreate("billing_bench_steps", TEMPLATE)
    settings = replace(Settings.from_env({}), database_url=_url("billing_bench_steps"))
    q = db.queries(settings)
    with db.connect(settings) as conn:
        snap = catalog.snapshot(conn, q)
        events = list(
            generate(
                snap,
                TrafficShape(accounts=accounts, duplicate_share=0),
                args.events,
                seed=5,
                now=datetime.now(UTC),
                prefix="steps",
            )
        )
        bodies = [encode_envelope(events[i : i + 100]) for i in range(0, len(events), 100)]
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # as the usage consumer does
        spent: dict[str, float] = {}

        def timed(step: str, start: float) -> None:
            spent[step] = spent.get(step, 0.0) + time.perf_counter() - start

        per_batch = max(args.batch // 100, 1)  # envelopes of 100 events
        for b in range(0, len(bodies), per_batch):
            t = time.perf_counter()
            priced, _ = decode_and_price(
                bodies[b : b + per_batch], snap, settings, datetime.now(UTC)
            )
            timed("decode + price", t)
            with conn.transaction():
                t = time.perf_counter()
                controls = BatchControls.read(
                    conn, q, sorted({p.event.account_id for p in priced})
                )  # payers and the spend controls that apply
                posting_id = conn.execute(q["next_posting_id"]).fetchone()[0]  # type: ignore[index]
                timed("accounts check, posting id", t)
                t = time.perf_counter()
                ids = sorted({p.event.event_id for p in priced})
                claimed = claim_event_keys(conn, q, ids)
                new = sorted(
                    (p for p in priced if p.event.event_id in claimed),
                    key=lambda p: p.event.event_id,
                )
                timed("claim of idempotency keys", t)
                t = time.perf_counter()
                data = "".join([copy_line(p, posting_id) for p in new]).encode()
                timed("COPY line formatting", t)
                t = time.perf_counter()
                with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                    copy.write(data)
                timed("COPY into usage_events", t)
                t = time.perf_counter()
                deltas: dict[str, Decimal] = defaultdict(lambda: ZERO)
                for p in new:
                    if not p.event.byok:
                        account = p.event.account_id
                        deltas[account] = EXACT.subtract(deltas[account], p.charge.total)
                changes = post_wallet_movement(
                    conn, q, posting_id=posting_id, kind=PostingKind.USAGE, wallet_deltas=deltas,
                    counterparty=SystemAccount.USAGE_REVENUE, reference=f"steps:{posting_id}",
                )  # fmt: skip
                timed("wallet locks, balances, ledger entries", t)
                t = time.perf_counter()
                record_crossings(conn, q, changes, check_alerts=False)
                after_debit(conn, q, posting_id, deltas, controls, new, changes)
                timed("crossings, spend controls", t)
                t = time.perf_counter()
            timed("commit", t)
    for step, seconds in spent.items():
        print(f"{step:>36}: {1e6 * seconds / len(events):6.1f} us/event")


if __name__ == "__main__":
    main()
