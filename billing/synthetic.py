"""Seeded synthetic gateway traffic: realistic enough to exercise every billable class.

Many accounts with a Zipf-like hot set, the catalog's models and providers weighted towards the
cheap ones, cached input, reasoning for reasoning models, images where the model prices them,
web searches where priced, 5% BYOK and an optional share of exact duplicates (gateway retries).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from billing.catalog import BillableClass, Catalog, PriceVersion
from billing.events import Usage, UsageEvent
from billing.money import EXACT, ZERO
from billing.pricing import price

REASONING_MODELS = ("o3", "o4-mini", "gpt-5", "gemini-2.5-pro")


@dataclass(frozen=True)
class TrafficShape:
    accounts: list[str]
    byok_share: float = 0.05
    duplicate_share: float = 0.01
    window: timedelta = timedelta(hours=1)


def _weights(n: int, skew: float = 1.1) -> list[float]:
    return [1 / (rank**skew) for rank in range(1, n + 1)]


def generate(
    catalog: Catalog, shape: TrafficShape, count: int, *, seed: int, now: datetime, prefix: str
) -> Iterator[UsageEvent]:
    """``count`` events (duplicates included) priced by versions in force during the window."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test traffic, not security
    start = now - shape.window
    offers: list[PriceVersion] = []
    for history in catalog.versions.values():
        current = [v for v in history if v.effective_from <= start]
        if current:
            offers.append(current[-1])
    if not offers:
        raise ValueError("the catalog has no version in force for the traffic window")
    # Cheaper models get more traffic, as on a real gateway.
    offers.sort(key=lambda v: (_input_price(v), v.model, v.provider))
    offer_weights = _weights(len(offers), 0.6)
    account_weights = _weights(len(shape.accounts))
    emitted: list[UsageEvent] = []
    for n in range(count):
        if emitted and rng.random() < shape.duplicate_share:
            event = rng.choice(emitted)
        else:
            version = rng.choices(offers, offer_weights)[0]
            event = UsageEvent(
                schema="usage.v1",
                event_id=f"{prefix}-{n:08d}",
                occurred_at=start + timedelta(seconds=rng.uniform(0, shape.window.total_seconds())),
                account_id=rng.choices(shape.accounts, account_weights)[0],
                api_key_id=f"key-{rng.randrange(3)}",
                model=version.model,
                provider=version.provider,
                byok=rng.random() < shape.byok_share,
                usage=_usage(rng, version),
                latency_ms=rng.randrange(150, 20_000),
                ttft_ms=rng.randrange(80, 2_000),
            )
            emitted.append(event)
        yield event


def _usage(rng: random.Random, version: PriceVersion) -> Usage:
    prices = version.prices
    prompt = int(rng.lognormvariate(7, 1.2)) + 1
    cached = (
        int(prompt * rng.uniform(0.2, 0.9))
        if (BillableClass.CACHED_INPUT in prices and rng.random() < 0.4)
        else 0
    )
    cache_write = (
        int(prompt * 0.3) if (BillableClass.CACHE_WRITE in prices and rng.random() < 0.1) else 0
    )
    output = int(rng.lognormvariate(5.5, 1.0)) + 1
    reasoning = 0
    if any(version.model.endswith(name) for name in REASONING_MODELS):
        reasoning = int(rng.lognormvariate(6, 1.0))
        output += reasoning
    images = rng.randrange(1, 4) if (BillableClass.IMAGE in prices and rng.random() < 0.05) else 0
    searches = (
        rng.randrange(1, 3) if (BillableClass.WEB_SEARCH in prices and rng.random() < 0.05) else 0
    )
    return Usage(
        input_tokens=max(prompt - cached - cache_write, 0),
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        output_tokens=output,
        reasoning_tokens=reasoning,
        image_count=images,
        web_search_count=searches,
    )


def _input_price(version: PriceVersion) -> Decimal:
    component = version.prices.get(BillableClass.INPUT)
    return component.unit_price if component else Decimal(0)


def expected_debits(events: Iterable[UsageEvent], catalog: Catalog) -> dict[str, Decimal]:
    """What each wallet must have been debited: distinct, non-BYOK events priced one by one.

    An independent expectation for tests and benchmarks (no database, no batching).
    """
    totals: dict[str, Decimal] = {}
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen or event.byok:
            continue
        seen.add(event.event_id)
        version = catalog.in_force(event.model, event.provider, event.occurred_at)
        if version is None:
            raise ValueError(f"no price for {event.model}@{event.provider}")
        amount = price(event.usage, version).total
        totals[event.account_id] = EXACT.add(totals.get(event.account_id, ZERO), amount)
    return totals
