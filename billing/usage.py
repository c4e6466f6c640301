"""Turning queue messages into debited wallets: ONE transaction per batch.

``process_batch`` decodes a batch of message bodies, prices each event at the version in force
when it happened, and records everything in one transaction:

1. claim the idempotency key of every event of the batch in ``usage_event_keys`` (one
   ``INSERT .. ON CONFLICT (event_id) DO NOTHING RETURNING``, keys in ``event_id`` order): only
   the keys of events never recorded come back, so redeliveries, gateway retries and replays
   debit nothing. A key another worker has claimed but not committed makes the claim wait for
   that worker's commit, then skip it (the exactly-once step). A copy whose billed content
   differs from the recorded one is not a retry: it is parked as ``conflicting_duplicate``;
2. COPY the claimed events straight into ``usage_events`` (partitioned by month); its insert
   trigger finds each row's key already claimed at the same ``recorded_at``;
3. park rejected items (bad input, unknown account, no price, a charge over the per-event cap
   ``BILLING_MAX_EVENT_CHARGE``) as dead letters, and resolve parked ones whose event is now
   recorded;
4. write the balanced ledger entries (wallets against usage revenue) as one posting that every
   new event references, then debit each wallet once by the sum of its new events, locking
   wallets in account order (no deadlock between workers). Last, because those row locks are
   held until the commit and a hot wallet is in every worker's batches;
5. settle holds, limits, grants and member attribution (``billing.spend_controls``, prepared
   before the locks), and write outbox rows for wallets that crossed zero.

The caller acknowledges the messages only after this returns (the transaction has committed). A
batch that the database refuses for a data reason is split in halves until the bad item is
isolated and parked; the rest go on. Transient failures raise ``Transient`` for the caller to retry.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec
import psycopg

from billing.catalog import CLASS_ORDER, BillableClass, Catalog, PriceVersion
from billing.db import Queries, map_error, text_array
from billing.errors import BillingError, DatabaseRejected, Transient, Unpriced
from billing.events import (
    Reason,
    Rejected,
    UsageEvent,
    billed_content,
    conflict_dedup_key,
    content_conflict,
    decode_message,
    dedup_key_for,
    encode_event,
)
from billing.ledger import PostingKind, SystemAccount, next_posting_id, post_wallet_movement
from billing.money import EXACT, ZERO, sum_exact
from billing.pricing import Charge, price
from billing.provider_usage import reported_cost
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier
from billing.settings import Settings
from billing.spend_controls import BatchControls, SpendPlan, after_debit
from billing.wallets import record_crossings


class PricedEvent(NamedTuple):
    """An event with the version in force at its time and its charge (hot path: a NamedTuple)."""

    event: UsageEvent
    version: PriceVersion
    charge: Charge


@dataclass
class BatchResult:
    """What one batch did. ``debited`` + ``byok`` + ``duplicates`` + ``parked`` = items."""

    items: int = 0
    debited: int = 0
    byok: int = 0
    duplicates: int = 0
    parked: int = 0
    amount_debited: Decimal = ZERO
    crossings: int = 0
    parked_reasons: dict[str, int] = field(default_factory=dict)

    def merge(self, other: BatchResult) -> BatchResult:
        reasons = dict(self.parked_reasons)
        for code, n in other.parked_reasons.items():
            reasons[code] = reasons.get(code, 0) + n
        return BatchResult(
            items=self.items + other.items,
            debited=self.debited + other.debited,
            byok=self.byok + other.byok,
            duplicates=self.duplicates + other.duplicates,
            parked=self.parked + other.parked,
            amount_debited=EXACT.add(self.amount_debited, other.amount_debited),
            crossings=self.crossings + other.crossings,
            parked_reasons=reasons,
        )


def price_events(
    events: Iterable[UsageEvent], catalog: Catalog
) -> tuple[list[PricedEvent], list[Rejected]]:
    """Pure: price each event at the version in force at its ``occurred_at``."""
    priced: list[PricedEvent] = []
    unpriced: list[Rejected] = []
    for event in events:
        version = catalog.in_force(event.model, event.provider, event.occurred_at)
        try:
            if version is None:
                raise Unpriced(
                    f"no price for {event.model} on {event.provider} at "
                    f"{event.occurred_at.isoformat()}",
                    field="$.model",
                )
            charge = price(event.usage, version, event.service_tier, event.status)
            priced.append(PricedEvent(event, version, charge))
        except Unpriced as exc:
            unpriced.append(rejection_of(event, Reason.UNPRICED, exc.field, str(exc)))
    return priced, unpriced


def rejection_of(event: UsageEvent, code: Reason, field_path: str, reason: str) -> Rejected:
    payload = encode_event(event)
    return Rejected(
        code,
        field_path,
        reason,
        payload,
        event.event_id,
        event.event_id,
        event.account_id,
        len(payload),
    )


class DecodedBatch:
    """Accepted events and rejected items of the messages seen so far (filled as they arrive)."""

    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self.rejected: list[Rejected] = []

    def add(self, body: bytes, settings: Settings, now: datetime) -> None:
        for item in decode_message(body, now, settings.max_clock_skew, settings.max_message_bytes):
            if isinstance(item, Rejected):
                self.rejected.append(item)
            else:
                self.events.append(item)

    def __len__(self) -> int:
        return len(self.events) + len(self.rejected)


def decode_and_price(
    bodies: Sequence[bytes], catalog: Catalog, settings: Settings, now: datetime
) -> tuple[list[PricedEvent], list[Rejected]]:
    batch = DecodedBatch()
    for body in bodies:
        batch.add(body, settings, now)
    priced, unpriced = price_events(batch.events, catalog)
    return priced, batch.rejected + unpriced


def staging_row(p: PricedEvent, posting_id: int) -> tuple[Any, ...]:
    """One usage_events row as values, in the column order of ``copy_usage_events``."""
    e, u, c = p.event, p.event.usage, p.charge
    debited = ZERO if e.byok else c.total
    return (
        e.event_id, e.occurred_at, e.account_id, e.api_key_id, e.model, e.provider, e.byok,
        p.version.effective_from,
        u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
        u.reasoning_tokens, u.image_count, u.web_search_count,
        *c.amounts[:7],  # input, cached input, cache write, output, image, web search, request
        c.total, debited, posting_id if debited > 0 else None, e.latency_ms, e.ttft_ms,
        *extension_values(p),
    )  # fmt: skip


# Columns added by migration 0004 (provider usage adapters), last in the COPY column list. They
# are NULL in the common case (NULL = 0 / standard / completed / none), so an event with only the
# 1.0 classes costs one constant string here.
_NO_EXTENSION = "\t\\N" * 10
_STANDARD, _COMPLETED = ServiceTier.STANDARD, RequestStatus.COMPLETED


def _has_extension(e: UsageEvent) -> bool:
    u = e.usage
    return bool(
        u.cache_write_1h_tokens
        or u.audio_input_tokens
        or u.audio_output_tokens
        or e.provider_usage_format is not None
        or (e.service_tier is not None and e.service_tier is not _STANDARD)
        or e.status is not _COMPLETED
    )


def extension_values(p: PricedEvent) -> tuple[Any, ...]:
    """Values of the 0004 columns, in COPY order (None = NULL)."""
    e, u, a = p.event, p.event.usage, p.charge.amounts
    counts = (u.cache_write_1h_tokens, u.audio_input_tokens, u.audio_output_tokens)
    return (
        *(n or None for n in counts),
        *(amount if n else None for n, amount in zip(counts, a[7:10], strict=True)),
        None if e.service_tier is None or e.service_tier is _STANDARD else e.service_tier.value,
        None if e.status is _COMPLETED else e.status.value,
        None if e.provider_usage_format is None else e.provider_usage_format.value,
        reported_cost(e.provider_usage_format, e.provider_usage),
    )


def extension_text(p: PricedEvent) -> str:
    if not _has_extension(p.event):
        return _NO_EXTENSION
    return "".join("\t\\N" if v is None else f"\t{v!s}" for v in extension_values(p))


def _timestamp(value: datetime) -> str:
    """ISO 8601 with its offset (``Z`` for UTC), by msgspec's encoder: a quarter of the time of
    ``datetime.isoformat`` here (docs/performance.md). The JSON string's quotes are cut off."""
    return _encode_json(value)[1:-1].decode("ascii")


_encode_json = msgspec.json.Encoder().encode


def copy_line(p: PricedEvent, posting_id: int) -> str:
    """``staging_row`` as one line of COPY text, written directly.

    The hot path: a line built by one f-string costs a third of what psycopg's per-value
    adaptation of 27 values does (measured in docs/performance.md). Decimals print exactly with
    ``str``; timestamps as ISO 8601 with their offset; None as ``\\N``. Identifiers are
    validated visible ASCII (no tab, no newline): only a backslash needs escaping, checked once
    for the five of them.
    """
    e, u, c = p.event, p.event.usage, p.charge
    a = c.amounts
    total = str(c.total)
    charged = not e.byok and c.total > 0
    head = (
        f"{e.event_id}\t{_timestamp(e.occurred_at)}\t{e.account_id}\t{e.api_key_id}\t"
        f"{e.model}\t{e.provider}\t"
    )
    if "\\" in head:  # the timestamp has none
        head = head.replace("\\", "\\\\")
    return (
        f"{head}"
        f"{'t' if e.byok else 'f'}\t{p.version.effective_from_text}\t"
        f"{u.input_tokens}\t{u.cached_input_tokens}\t{u.cache_write_tokens}\t"
        f"{u.output_tokens}\t{u.reasoning_tokens}\t{u.image_count}\t{u.web_search_count}\t"
        f"{a[0]!s}\t{a[1]!s}\t{a[2]!s}\t{a[3]!s}\t{a[4]!s}\t{a[5]!s}\t{a[6]!s}\t{total}\t"
        f"{'0' if e.byok else total}\t{posting_id if charged else _NULL}\t"
        f"{_NULL if e.latency_ms is None else e.latency_ms}\t"
        f"{_NULL if e.ttft_ms is None else e.ttft_ms}{extension_text(p)}\n"
    )


_NULL = "\\N"


def record_batch(
    conn: psycopg.Connection[Any],
    q: Queries,
    priced: Sequence[PricedEvent],
    rejected: Sequence[Rejected],
    *,
    resolution: str = "recorded",
    max_charge: Decimal | None = None,
) -> BatchResult:
    """Record one batch. Call inside a transaction; see the module docstring for the steps.

    ``max_charge`` is the per-event cap (``Settings.max_event_charge``; None = none): an event
    priced over it is parked as ``charge_over_cap`` (``over_cap``), BYOK ones too."""
    result = BatchResult(items=len(priced) + len(rejected))
    rejected = list(rejected)

    # Unknown accounts are parked, not guessed.
    accounts = sorted({p.event.account_id for p in priced})
    # account -> the wallet that pays: its own, or its organisation's (sub-accounts)
    controls = BatchControls.read(conn, q, accounts)
    known = controls.payers
    unique: dict[str, PricedEvent] = {}
    repeats: list[PricedEvent] = []
    over: list[PricedEvent] = []
    for p in priced:
        if p.event.account_id not in known:
            rejected.append(
                rejection_of(
                    p.event,
                    Reason.UNKNOWN_ACCOUNT,
                    "$.account_id",
                    f"no account {p.event.account_id!r}",
                )
            )
        elif max_charge is not None and p.charge.total > max_charge:  # the one Decimal comparison
            over.append(p)
        elif p.event.event_id in unique:
            repeats.append(p)  # the same event_id twice in one batch
        else:
            unique[p.event.event_id] = p
    if over:
        assert max_charge is not None
        rejected += over_cap(conn, q, over, max_charge, result)

    if unique:
        posting_id = next_posting_id(conn, q)
        ids = sorted(unique)
        claimed = claim_event_keys(conn, q, ids)
        new = [unique[event_id] for event_id in ids if event_id in claimed]
        copies = [unique[event_id] for event_id in ids if event_id not in claimed] + repeats
        if copies:
            conflicts = resend_conflicts(conn, q, copies, unique, claimed)
            result.duplicates += len(copies) - len(conflicts)
            rejected += conflicts
        if new:
            data = "".join([copy_line(p, posting_id) for p in new]).encode()
            with conn.cursor() as cur, cur.copy(q["copy_usage_events"]) as copy:
                copy.write(data)

        deltas: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for p in new:
            if p.event.byok:
                result.byok += 1
            else:
                result.debited += 1
                payer = known[p.event.account_id]
                deltas[payer] = EXACT.subtract(deltas[payer], p.charge.total)
        result.amount_debited = EXACT.minus(sum_exact(deltas.values()))
        plan = SpendPlan.of(posting_id, deltas, controls, new)
        # Parked dead letters whose event is now recorded are resolved; skipped (one cheap
        # EXISTS) in the common case where nothing is parked.
        if conn.execute(q["any_parked"]).fetchone() != (False,):
            conn.execute(q["resolve_recorded"], {"event_ids": ids, "resolution": resolution})

    if rejected:
        park(conn, q, rejected, result)

    if unique:
        # The wallets last: their row locks are held until the commit, and another worker's batch
        # with the same hot wallet waits for them. Everything that does not need them came first
        # (the posting's entries too, in post_wallet_movement).
        changes = post_wallet_movement(
            conn,
            q,
            posting_id=posting_id,
            kind=PostingKind.USAGE,
            wallet_deltas=deltas,
            counterparty=SystemAccount.USAGE_REVENUE,
            reference=f"batch:{uuid.uuid4()}",
        )
        result.crossings = record_crossings(conn, q, changes, check_alerts=False)
        # holds, grants, member attribution; low-balance alerts are relayed like crossings
        result.crossings += after_debit(conn, q, plan, changes)[2]
    return result


def over_cap(
    conn: psycopg.Connection[Any],
    q: Queries,
    over: Sequence[PricedEvent],
    cap: Decimal,
    result: BatchResult,
) -> list[Rejected]:
    """The dead letters of events priced over the cap. BYOK events too: they debit nothing, but
    a price that high says the counts are wrong (a gateway bug), and recorded they would reach
    statements, exports and key spend all the same; an operator reviews and replays them.

    Unlike an unknown account or a missing price, the cap is a setting: an event recorded under
    a higher cap (a replay with ``BILLING_MAX_EVENT_CHARGE=0``) may be sent again. A copy of the
    same billed content is then a duplicate, not a dead letter; one that differs is a
    ``conflicting_duplicate``. Only batches with events over the cap pay for this query."""
    recorded = recorded_event_ids(conn, q, {p.event.event_id for p in over})
    items = [charge_over_cap(p, cap) for p in over if p.event.event_id not in recorded]
    copies = [p for p in over if p.event.event_id in recorded]
    if copies:
        conflicts = resend_conflicts(conn, q, copies, {}, set())
        result.duplicates += len(copies) - len(conflicts)
        items += conflicts
    return items


def charge_over_cap(p: PricedEvent, cap: Decimal) -> Rejected:
    """The dead letter of ``p``, priced over ``cap``: the amount, the cap and its largest class."""
    amount, quantity, billable = max(
        zip(p.charge.amounts, p.charge.quantities, CLASS_ORDER, strict=True),
        key=lambda line: line[0],
    )
    field_path = "$" if billable is BillableClass.REQUEST else f"$.usage.{billable.value}"
    return rejection_of(
        p.event,
        Reason.CHARGE_OVER_CAP,
        field_path,
        f"priced at {p.charge.total} USD, over the cap of {cap} USD per event "
        f"(BILLING_MAX_EVENT_CHARGE); largest class: {billable.value} {quantity} = {amount} USD. "
        "If it is genuine, replay it with a higher cap (0 = none)",
    )


def resend_conflicts(
    conn: psycopg.Connection[Any],
    q: Queries,
    copies: Sequence[PricedEvent],
    unique: Mapping[str, PricedEvent],
    claimed: Set[str],
) -> list[Rejected]:
    """Of ``copies`` (events whose id is recorded already, or by this batch: ``claimed``, the
    copy in ``unique``), those whose billed content differs from the recorded copy's: a gateway
    that reused an id, or changed an event before resending it. Dropped as duplicates, they
    would be lost without a trace; they are parked. The recorded copies are read only for a
    batch that has such copies, in one query."""
    earlier = sorted({p.event.event_id for p in copies} - claimed)
    recorded: dict[str, tuple[Any, ...]] = {}
    if earlier:
        rows = conn.execute(q["recorded_billed_content"], {"event_ids": earlier})
        recorded = {row[0]: tuple(row[1:]) for row in rows}
    conflicts = []
    for p in copies:
        event_id = p.event.event_id
        if event_id in claimed:
            content: tuple[Any, ...] | None = billed_content(unique[event_id].event)
        else:
            content = recorded.get(event_id)  # None: its row is not found (compare nothing)
        conflict = None if content is None else content_conflict(content, p.event)
        if conflict is not None:
            conflicts.append(conflicting_duplicate(p.event, conflict))
    return conflicts


def conflicting_duplicate(event: UsageEvent, conflict: tuple[str, str]) -> Rejected:
    item = rejection_of(event, Reason.CONFLICTING_DUPLICATE, *conflict)
    return replace(item, dedup_key=conflict_dedup_key(event.event_id, item.payload))


def refused_copy(item: Rejected, event_id: str) -> Rejected:
    """``item`` (refused as unknown_account, unpriced, invalid...) under a recorded event_id."""
    return replace(
        item,
        reason_code=Reason.CONFLICTING_DUPLICATE,
        reason=(
            f"event_id {event_id!r} is already recorded; this copy is not it sent again, since "
            f"it was refused ({item.reason_code.value}: {item.reason}). The recorded copy "
            "stands: discard this one, or have the gateway send it under a new event_id"
        ),
        dedup_key=conflict_dedup_key(event_id, item.payload),
    )


def recorded_event_ids(conn: psycopg.Connection[Any], q: Queries, ids: set[str]) -> set[str]:
    """Which of ``ids`` are recorded events (no query for none)."""
    if not ids:
        return set()
    return {row[0] for row in conn.execute(q["recorded_event_ids"], {"event_ids": sorted(ids)})}


def claim_event_keys(conn: psycopg.Connection[Any], q: Queries, event_ids: list[str]) -> set[str]:
    """Claim the idempotency keys of ``event_ids`` (sorted); the ids of those never claimed."""
    cursor = conn.execute(q["claim_event_keys"], {"event_ids": text_array(event_ids)})
    return {row[0] for row in cursor}


def park(
    conn: psycopg.Connection[Any], q: Queries, rejected: Sequence[Rejected], result: BatchResult
) -> None:
    """Write dead letters. An item whose event_id is recorded is a copy of another content: the
    recorded copy passed every check this one failed (accounts are never deleted, price versions
    never backdated), so it is parked as ``conflicting_duplicate``, never counted a duplicate."""
    rejected = [_storable(r) for r in rejected]
    recorded = recorded_event_ids(conn, q, {r.event_id for r in rejected if r.event_id is not None})
    by_key: dict[str, Rejected] = {}
    for item in rejected:
        event_id = item.event_id
        if event_id in recorded and item.reason_code is not Reason.CONFLICTING_DUPLICATE:
            assert event_id is not None
            item = refused_copy(item, event_id)
        result.parked += 1
        result.parked_reasons[item.reason_code] = result.parked_reasons.get(item.reason_code, 0) + 1
        by_key.setdefault(item.dedup_key, item)
    if not by_key:
        return
    with conn.cursor() as cur:
        cur.executemany(
            q["park"],
            [
                {
                    "dedup_key": key,
                    "event_id": r.event_id,
                    "account_id": r.account_id,
                    "reason_code": r.reason_code.value,
                    "field": r.field,
                    "reason": r.reason,
                    "payload": r.payload,
                    "payload_bytes": r.payload_bytes,
                }
                for key, r in sorted(by_key.items())
            ],
        )


def _storable(item: Rejected) -> Rejected:
    """``item`` with its texts storable: PostgreSQL's text refuses NUL, which a rejected
    payload's ids, unknown field names or the decoder's message may carry. Each is written as
    the six characters \\u0000 (the stored payload, bytea, keeps the original)."""
    texts = (item.dedup_key, item.event_id, item.account_id, item.field, item.reason)
    if not any(t is not None and "\x00" in t for t in texts):
        return item
    return replace(
        item,
        dedup_key=_no_nul(item.dedup_key),
        event_id=None if item.event_id is None else _no_nul(item.event_id),
        account_id=None if item.account_id is None else _no_nul(item.account_id),
        field=_no_nul(item.field),
        reason=_no_nul(item.reason),
    )


_BARE = "stored bare"


def _bare(item: Rejected, refused: BillingError) -> Rejected:
    """A dead letter the database refused, reduced to what it cannot refuse: the reason code,
    why it is bare, and the payload (bytea), keyed by the payload's hash. Without it the batch
    would be retried, and refused, for ever, its good events with it."""
    return Rejected(
        item.reason_code,
        "$",
        f"{_BARE} (the database refused this dead letter: {_no_nul(str(refused))[:500]})",
        item.payload,
        dedup_key_for(None, item.payload),
        payload_bytes=item.payload_bytes,
    )


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\\u0000")


def record_isolating(
    conn: psycopg.Connection[Any],
    q: Queries,
    priced: Sequence[PricedEvent],
    rejected: Sequence[Rejected],
    *,
    resolution: str = "recorded",
    max_charge: Decimal | None = None,
) -> BatchResult:
    """``record_batch`` in its own transaction; isolate and park items the database refuses."""
    try:
        with conn.transaction():
            return record_batch(
                conn, q, priced, rejected, resolution=resolution, max_charge=max_charge
            )
    except psycopg.Error as exc:
        return _split_or_raise(conn, q, priced, rejected, resolution, max_charge, exc)


def _split_or_raise(
    conn: psycopg.Connection[Any],
    q: Queries,
    priced: Sequence[PricedEvent],
    rejected: Sequence[Rejected],
    resolution: str,
    max_charge: Decimal | None,
    exc: psycopg.Error,
) -> BatchResult:
    """A failed batch: raise if transient, else split it until the refused item is parked."""
    mapped = map_error(exc)
    if isinstance(mapped, Transient) or conn.closed or conn.broken:
        raise mapped from exc
    assert isinstance(mapped, DatabaseRejected)
    if priced and rejected:  # the dead letters on their own first: the refusal may be theirs
        first = record_isolating(
            conn, q, [], rejected, resolution=resolution, max_charge=max_charge
        )
        return first.merge(
            record_isolating(conn, q, priced, [], resolution=resolution, max_charge=max_charge)
        )
    if len(priced) <= 1:
        if not priced:  # dead letters alone were refused: find which, and park it bare
            if len(rejected) > 1:
                half = len(rejected) // 2
                first = record_isolating(
                    conn, q, [], rejected[:half], resolution=resolution, max_charge=max_charge
                )
                return first.merge(
                    record_isolating(
                        conn, q, [], rejected[half:], resolution=resolution, max_charge=max_charge
                    )
                )
            if rejected[0].reason.startswith(_BARE):
                raise mapped from exc  # refused even so: retried as the batch's error
            bare = [_bare(rejected[0], mapped)]
            return record_isolating(conn, q, [], bare, resolution=resolution, max_charge=max_charge)
        bad = rejection_of(priced[0].event, Reason.DATABASE_REJECTED, "$", str(mapped)[:1000])
        return record_isolating(
            conn, q, [], [*rejected, bad], resolution=resolution, max_charge=max_charge
        )
    half = len(priced) // 2
    first = record_isolating(
        conn, q, priced[:half], rejected, resolution=resolution, max_charge=max_charge
    )
    return first.merge(
        record_isolating(conn, q, priced[half:], [], resolution=resolution, max_charge=max_charge)
    )


def process_batch(
    conn: psycopg.Connection[Any],
    q: Queries,
    catalog: Catalog,
    bodies: Sequence[bytes],
    settings: Settings,
    now: datetime,
) -> BatchResult:
    """Decode, price and record one batch of queue message bodies."""
    priced, rejected = decode_and_price(bodies, catalog, settings, now)
    return record_isolating(conn, q, priced, rejected, max_charge=settings.max_event_charge)


def process_decoded(
    conn: psycopg.Connection[Any],
    q: Queries,
    catalog: Catalog,
    batch: DecodedBatch,
    *,
    max_charge: Decimal | None,
) -> BatchResult:
    """Price and record a batch decoded as its messages arrived (the worker's one call);
    ``max_charge``: ``Settings.max_event_charge``."""
    priced, unpriced = price_events(batch.events, catalog)
    return record_isolating(conn, q, priced, batch.rejected + unpriced, max_charge=max_charge)
