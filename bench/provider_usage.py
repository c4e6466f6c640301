"""Decode + price cost of a canonical usage.v1 event vs. the same request sent as a provider usage
object (``openai.chat``), in one process, no database or broker.

The same synthetic requests (shipped catalog, realistic mix) are encoded twice: with canonical
``usage`` classes (the 1.0 hot path) and as an OpenAI Chat ``CompletionUsage`` object (prompt =
input + cached, completion = output). Both go through ``billing.usage.decode_and_price`` in
batches of 5,000 events from envelopes of 100, as the consumer does. Exits 1 unless every
provider event derives exactly the canonical classes and the same total.

    .venv/bin/python -m bench.provider_usage [--events 100000] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import UTC, datetime

import msgspec

from billing.catalog import DEFAULT_CATALOG, Catalog, read_catalog_file
from billing.events import SCHEMA_BATCH_V1, UsageEvent, encode_envelope
from billing.settings import Settings
from billing.synthetic import TrafficShape, generate
from billing.usage import PricedEvent, decode_and_price


def as_openai_chat(event: UsageEvent) -> dict[str, object]:
    u = event.usage
    return {
        "schema": "usage.v1",
        "event_id": event.event_id,
        "occurred_at": event.occurred_at,
        "account_id": event.account_id,
        "api_key_id": event.api_key_id,
        "model": event.model,
        "provider": event.provider,
        "byok": event.byok,
        "provider_usage_format": "openai.chat",
        "provider_usage": {
            "prompt_tokens": u.input_tokens + u.cached_input_tokens,
            "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.cached_input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        },
    }


def measure(
    label: str, bodies: list[bytes], catalog: Catalog, settings: Settings, n: int
) -> list[PricedEvent]:
    gc.collect()
    priced_all: list[PricedEvent] = []
    start = time.perf_counter()
    for b in range(0, len(bodies), 50):
        priced, rejected = decode_and_price(
            bodies[b : b + 50], catalog, settings, datetime.now(UTC)
        )
        if rejected:
            print(f"{label}: {len(rejected)} rejected, e.g. {rejected[0]}")
            sys.exit(1)
        priced_all.extend(priced)
    seconds = time.perf_counter() - start
    print(f"  {label:<40} {1e6 * seconds / n:7.2f} us per event")
    return priced_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="tiny run, correctness only")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else args.events
    catalog = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
    settings = Settings.from_env({})
    events = [
        e
        for e in generate(
            catalog,
            TrafficShape(accounts=[f"acct-{i:05d}" for i in range(1_000)], duplicate_share=0),
            n * 2,
            seed=11,
            now=datetime.now(UTC),
            prefix="pu",
        )
        # requests an OpenAI Chat object can express exactly (no cache writes, images, searches)
        if not (e.usage.cache_write_tokens or e.usage.image_count or e.usage.web_search_count)
    ][:n]
    n = len(events)
    canonical = [encode_envelope(events[i : i + 100]) for i in range(0, n, 100)]
    provider = [
        msgspec.json.encode(
            {"schema": SCHEMA_BATCH_V1, "events": [as_openai_chat(e) for e in events[i : i + 100]]}
        )
        for i in range(0, n, 100)
    ]
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)  # as the usage consumer does
    print(f"decode + price, {n:,} events, envelopes of 100:")
    plain = measure("canonical usage (usage.v1 1.0)", canonical, catalog, settings, n)
    converted = measure("provider_usage openai.chat (1.1)", provider, catalog, settings, n)
    for a, b in zip(plain, converted, strict=True):
        if a.event.usage != b.event.usage or a.charge.total != b.charge.total:
            print(f"MISMATCH {a.event.event_id}: {a.event.usage} vs {b.event.usage}")
            sys.exit(1)
    print(f"  all {n:,} provider events derived the canonical classes and totals exactly")


if __name__ == "__main__":
    main()
