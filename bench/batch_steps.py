"""Where a batch's time goes: each step of the batch transaction timed, per event.

One process, in-process (no broker), against real PostgreSQL: decode and price, then the
statements of ``billing.usage.record_batch`` one by one, in batches of 5,000 events from
envelopes of 100, for 1,000 accounts. Prints microseconds of wall time per event for each step,
and the wallets a batch debits. ``--accounts 1000,10000`` prints one column per account count.

    .venv/bin/python -m bench.batch_steps [--events 50000] [--batch 5000] [--accounts 1000,10000]
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
from billing.spend_controls import BatchControls, SpendPlan, after_debit
from billing.synthetic import TrafficShape, generate
from billing.usage import claim_event_keys, copy_line, decode_and_price
from billing.wallets import record_crossings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--batch", type=int, default=5_000, help="events per batch (a multiple of 100)"
    )
    parser.add_argument(
        "--accounts", default="1000", help="accounts; several (1000,10000): one column each"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.accounts.split(",")]
    everyone = [f"acct-{i:05d}" for i in range(max(counts))]
    prepare_template(everyone)
    columns = {n: steps(everyone[:n], args.events, args.batch) for n in counts}
    wallets = {n: columns[n].pop("wallets per batch") for n in counts}
    print(f"{'us/event, accounts:':>48}" + "".join(f"{n:>9,}" for n in counts))
    for step in columns[counts[0]]:
        print(f"{step:>48}" + "".join(f"{columns[n][step]:>9.1f}" for n in counts))
    print(f"{'wallets per batch':>48}" + "".join(f"{wallets[n]:>9,.0f}" for n in counts))


def steps(accounts: list[str], n_events: int, batch: int) -> dict[str, float]:
    """Microseconds of wall time per event of each step, for traffic over ``accounts``."""
    _recreate("billing_bench_steps", TEMPLATE)
    settings = replace(Settings.from_env({}), database_url=_url("billing_bench_steps"))
    q = db.queries(settings)
    with db.connect(settings) as conn:
        snap = catalog.snapshot(conn, q)
        events = list(
            generate(
                snap,
                TrafficShape(accounts=accounts, duplicate_share=0),
                n_events,
                seed=5,
                now=datetime.now(UTC),
                prefix="steps",
            )
        )
        bodies = [encode_envelope(events[i : i + 100]) for i in range(0, len(events), 100)]
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # as the usage consumer does
        spent: dict[str, float] = {}
        wallets: list[int] = []

        def timed(step: str, start: float) -> None:
            spent[step] = spent.get(step, 0.0) + time.perf_counter() - start

        per_batch = max(batch // 100, 1)  # envelopes of 100 events
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
                wallets.append(len(deltas))
                changes = post_wallet_movement(
                    conn, q, posting_id=posting_id, kind=PostingKind.USAGE, wallet_deltas=deltas,
                    counterparty=SystemAccount.USAGE_REVENUE, reference=f"steps:{posting_id}",
                )  # fmt: skip
                timed("posting, ledger entries, wallet locks, balances", t)
                t = time.perf_counter()
                record_crossings(conn, q, changes, check_alerts=False)
                after_debit(conn, q, SpendPlan.of(posting_id, deltas, controls, new), changes)
                timed("crossings, spend controls", t)
                t = time.perf_counter()
            timed("commit", t)
    gc.unfreeze()
    result = {step: 1e6 * seconds / len(events) for step, seconds in spent.items()}
    result["wallets per batch"] = sum(wallets) / len(wallets)
    return result


if __name__ == "__main__":
    main()
