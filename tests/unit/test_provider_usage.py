"""Provider usage adapters: real usage objects -> canonical classes -> exact Decimal amounts.

Every expected amount is worked by hand in the case's comment, from the shipped catalog's prices
(``billing/data/catalog.toml``) in force at the event's time. Usage object shapes: OpenAI and
OpenRouter from /work/shared/reference (openai-python v3.3.1 types and spec examples, OpenRouter
openapi.yaml); Anthropic from the Messages API reference ``Usage`` object; Gemini from the
``UsageMetadata`` reference. "verbatim" marks a published example, "constructed" one built on the
published shape.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing import provider_usage as pu
from billing.catalog import (
    CLASS_ORDER,
    DEFAULT_CATALOG,
    BillableClass,
    Catalog,
    PriceComponent,
    PriceVersion,
    read_catalog_file,
)
from billing.errors import Unpriced
from billing.events import Reason, Rejected, Usage, UsageEvent, decode_message, encode_event
from billing.pricing import price
from billing.provider_usage import ProviderFormat, UsageConflict
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier
from tests.unit.test_events import VALIDATOR
from tests.unit.test_events import event as v1_event

CATALOG = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
TIERED_NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)  # the 2026-12-01 versions are in force
SKEW = timedelta(minutes=5)


def event(
    fmt: str,
    raw: dict[str, Any],
    model: str,
    provider: str,
    at: datetime = NOW,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "schema": "usage.v1",
        "event_id": "req-1",
        "occurred_at": (at - timedelta(minutes=1)).isoformat(),
        "account_id": "acme",
        "api_key_id": "key-1",
        "model": model,
        "provider": provider,
        "byok": False,
        "provider_usage_format": fmt,
        "provider_usage": raw,
        **extra,
    }


def decode_one(payload: dict[str, Any], now: datetime = NOW) -> UsageEvent | Rejected:
    [item] = decode_message(json.dumps(payload).encode(), now, SKEW, 1_048_576)
    return item


def charge_of(payload: dict[str, Any], now: datetime = NOW) -> tuple[UsageEvent, Decimal]:
    item = decode_one(payload, now)
    assert isinstance(item, UsageEvent), item
    version = CATALOG.in_force(item.model, item.provider, item.occurred_at)
    assert version is not None
    return item, price(item.usage, version, item.service_tier, item.status).total


O4_MINI = ("openai/o4-mini", "openai")  # 1.10 in / 0.275 cached / 4.40 out per 1M
GPT_4O = ("openai/gpt-4o", "openai")  # 2.50 / 1.25 / 10.00
O3 = ("openai/o3", "openai")  # 2.00 / 0.50 / 8.00 (since 2025-06-10)
GPT_5 = ("openai/gpt-5", "openai")  # 1.25 / 0.125 / 10.00
SONNET = ("anthropic/claude-sonnet-4-5", "anthropic")  # 3 / 0.30 read / 3.75 5m write / 15 out
FLASH = ("google/gemini-2.5-flash", "google")  # 0.30 / 0.03 / 2.50

CASES: list[tuple[str, str, dict[str, Any], tuple[str, str], dict[str, Any], str]] = [
    (
        # The issue's example. 2,000 uncached x 1.10/M = 0.0022; 8,000 cached x 0.275/M = 0.0022;
        # 2,000 completion (1,500 reasoning inside) x 4.40/M = 0.0088. Total 0.0132.
        "o4-mini cached + reasoning (issue example)",
        "openai.chat",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 2_000,
            "total_tokens": 12_000,
            "prompt_tokens_details": {"cached_tokens": 8_000, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 1_500, "audio_tokens": 0},
        },
        O4_MINI,
        {},
        "0.0132",
    ),
    (
        # constructed (reference usage_examples.json): 386 x 1.10/M = 0.0004246;
        # 1,920 x 0.275/M = 0.000528; 1,350 x 4.40/M = 0.00594. Total 0.0068926.
        "o4-mini chat, reference example",
        "openai.chat",
        {
            "prompt_tokens": 2306,
            "completion_tokens": 1350,
            "total_tokens": 3656,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 1024,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        O4_MINI,
        {},
        "0.0068926",
    ),
    (
        # verbatim streamed final chunk (no prompt_tokens_details): 79 x 2.50/M = 0.0001975;
        # 11 x 10/M = 0.00011. Total 0.0003075. A stream is priced like any other request.
        "gpt-4o stream final chunk, sparse details",
        "openai.chat",
        {
            "prompt_tokens": 79,
            "completion_tokens": 11,
            "total_tokens": 90,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        GPT_4O,
        {},
        "0.0003075",
    ),
    (
        # constructed: rejected prediction tokens are inside completion_tokens and billed as
        # output once. 512 x 2.50/M = 0.00128; 180 x 10/M = 0.0018. Total 0.00308.
        "gpt-4o predicted outputs",
        "openai.chat",
        {
            "prompt_tokens": 512,
            "completion_tokens": 180,
            "total_tokens": 692,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 120,
                "rejected_prediction_tokens": 35,
            },
        },
        GPT_4O,
        {},
        "0.00308",
    ),
    (
        # constructed (reference): 6,200 input of which 4,096 cached; the 2,048 written to cache
        # are ordinary input at OpenAI. 2,104 x 2/M = 0.004208; 4,096 x 0.50/M = 0.002048;
        # 900 x 8/M = 0.0072. Total 0.013456.
        "o3 responses with cache write",
        "openai.responses",
        {
            "input_tokens": 6200,
            "input_tokens_details": {"cached_tokens": 4096, "cache_write_tokens": 2048},
            "output_tokens": 900,
            "output_tokens_details": {"reasoning_tokens": 640},
            "total_tokens": 7100,
        },
        O3,
        {},
        "0.013456",
    ),
    (
        # verbatim spec example (o1 response, priced here as o3): 81 x 2/M = 0.000162;
        # 1,035 x 8/M = 0.00828. Total 0.008442.
        "responses spec example",
        "openai.responses",
        {
            "input_tokens": 81,
            "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
            "output_tokens": 1035,
            "output_tokens_details": {"reasoning_tokens": 832},
            "total_tokens": 1116,
        },
        O3,
        {},
        "0.008442",
    ),
    (
        # verbatim batch-object usage (no cache_write_tokens key), priced at standard here:
        # 476 x 1.25/M = 0.000595; 1,024 x 0.125/M = 0.000128; 500 x 10/M = 0.005.
        # Total 0.005723.
        "gpt-5 batch usage shape",
        "openai.responses",
        {
            "input_tokens": 1500,
            "input_tokens_details": {"cached_tokens": 1024},
            "output_tokens": 500,
            "output_tokens_details": {"reasoning_tokens": 300},
            "total_tokens": 2000,
        },
        GPT_5,
        {},
        "0.005723",
    ),
    (
        # constructed on the Messages API Usage shape: input_tokens EXCLUDES cache reads/writes.
        # 2,095 x 3/M = 0.006285; 12,000 read x 0.30/M = 0.0036; 1,024 5m-write x 3.75/M =
        # 0.00384; 503 x 15/M = 0.007545; 2 searches x $10/1K = 0.02. Total 0.04127.
        "claude sonnet 4.5 cache read + 5m write + web search",
        "anthropic.messages",
        {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 1024,
            "cache_read_input_tokens": 12000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1024, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 503,
            "server_tool_use": {"web_search_requests": 2},
            "service_tier": "standard",
        },
        SONNET,
        {},
        "0.04127",
    ),
    (
        # constructed, older response without the cache_creation split (all writes 5-minute):
        # 10 x 3/M = 0.00003; 3,000 x 3.75/M = 0.01125; 250 x 15/M = 0.00375. Total 0.01503.
        "claude sonnet 4.5 write without split",
        "anthropic.messages",
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 0,
            "output_tokens": 250,
        },
        SONNET,
        {},
        "0.01503",
    ),
    (
        # constructed on UsageMetadata: prompt INCLUDES cached, thoughts are separate output.
        # 4,000 uncached x 0.30/M = 0.0012; 8,000 cached x 0.03/M = 0.00024;
        # (400 + 1,200 thoughts) x 2.50/M = 0.004. Total 0.00544.
        "gemini 2.5 flash cached + thinking",
        "gemini",
        {
            "promptTokenCount": 12000,
            "cachedContentTokenCount": 8000,
            "candidatesTokenCount": 400,
            "thoughtsTokenCount": 1200,
            "totalTokenCount": 13600,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12000}],
            "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 8000}],
        },
        FLASH,
        {},
        "0.00544",
    ),
    (
        # constructed: grounding results come back as toolUsePromptTokenCount, billed as input.
        # (100 + 900) x 0.30/M = 0.0003; 50 x 2.50/M = 0.000125. Total 0.000425.
        "gemini 2.5 flash tool-use prompt",
        "gemini",
        {
            "promptTokenCount": 100,
            "toolUsePromptTokenCount": 900,
            "candidatesTokenCount": 50,
            "totalTokenCount": 1050,
        },
        FLASH,
        {},
        "0.000425",
    ),
    (
        # constructed (reference usage_examples.json, OpenRouter o4-mini): the same tokens as
        # the o4-mini chat case, 0.0068926; OpenRouter's own cost is recorded, not billed.
        "openrouter o4-mini with reported cost",
        "openrouter",
        {
            "prompt_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens": 1350,
            "completion_tokens_details": {"reasoning_tokens": 1024},
            "total_tokens": 3656,
            "cost": 0.0068926,
            "is_byok": False,
            "cost_details": {
                "upstream_inference_cost": None,
                "upstream_inference_prompt_cost": 0.0009526,
                "upstream_inference_completions_cost": 0.00594,
            },
        },
        O4_MINI,
        {},
        "0.0068926",
    ),
    (
        # verbatim ChatUsage schema example (its cost 0.0012 is illustrative): 8 x 1.10/M =
        # 0.0000088; 2 x 0.275/M = 0.00000055; 15 x 4.40/M = 0.000066. Total 0.00007535.
        "openrouter ChatUsage schema example",
        "openrouter",
        {
            "completion_tokens": 15,
            "completion_tokens_details": {"reasoning_tokens": 5},
            "cost": 0.0012,
            "cost_details": {
                "upstream_inference_completions_cost": 0.0004,
                "upstream_inference_cost": None,
                "upstream_inference_prompt_cost": 0.0008,
            },
            "is_byok": False,
            "prompt_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 2},
            "server_tool_use_details": {"tool_calls_executed": 2, "tool_calls_requested": 2},
            "total_tokens": 25,
        },
        O4_MINI,
        {},
        "0.00007535",
    ),
    (
        # usage-accounting doc example shape (Anthropic upstream with a cache write):
        # 94 x 3/M = 0.000282; 100 written x 3.75/M = 0.000375; 2 x 15/M = 0.00003.
        # Total 0.000687.
        "openrouter doc example, cache write",
        "openrouter",
        {
            "completion_tokens": 2,
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost": 0.95,
            "cost_details": {"upstream_inference_cost": 19},
            "prompt_tokens": 194,
            "prompt_tokens_details": {
                "cached_tokens": 0,
                "cache_write_tokens": 100,
                "audio_tokens": 0,
            },
            "total_tokens": 196,
        },
        SONNET,
        {},
        "0.000687",
    ),
]

TIERED_CASES: list[tuple[str, str, dict[str, Any], tuple[str, str], dict[str, Any], str]] = [
    (
        # 2026-12-01 Sonnet 4.5 version: 100 x 3/M = 0.0003; 2,000 5m-writes x 3.75/M = 0.0075;
        # 4,000 1h-writes x 6/M = 0.024; 300 x 15/M = 0.0045. Total 0.0363.
        "claude 5m + 1h cache writes",
        "anthropic.messages",
        {
            "input_tokens": 100,
            "cache_creation_input_tokens": 6000,
            "cache_read_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 2000,
                "ephemeral_1h_input_tokens": 4000,
            },
            "output_tokens": 300,
        },
        SONNET,
        {},
        "0.0363",
    ),
    (
        # batch tier (from the usage object): 10,000 x 1.50/M = 0.015; 20,000 read x 0.15/M =
        # 0.003; 4,000 writes x 1.875/M = 0.0075; 1,000 x 7.50/M = 0.0075. Total 0.033.
        "claude batch tier",
        "anthropic.messages",
        {
            "input_tokens": 10000,
            "cache_creation_input_tokens": 4000,
            "cache_read_input_tokens": 20000,
            "output_tokens": 1000,
            "service_tier": "batch",
        },
        SONNET,
        {},
        "0.033",
    ),
    (
        # 2026-12-01 Flash version: 2,000 text x 0.30/M = 0.0006; 3,000 audio x 1.00/M = 0.003;
        # 200 x 2.50/M = 0.0005. Total 0.0041.
        "gemini audio input",
        "gemini",
        {
            "promptTokenCount": 5000,
            "candidatesTokenCount": 200,
            "totalTokenCount": 5200,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": 2000},
                {"modality": "AUDIO", "tokenCount": 3000},
            ],
        },
        FLASH,
        {},
        "0.0041",
    ),
    (
        # the same at flex (the gateway says so): 2,000 x 0.15/M = 0.0003; 3,000 x 0.50/M =
        # 0.0015; 200 x 1.25/M = 0.00025. Total 0.00205.
        "gemini audio input, flex tier",
        "gemini",
        {
            "promptTokenCount": 5000,
            "candidatesTokenCount": 200,
            "totalTokenCount": 5200,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": 2000},
                {"modality": "AUDIO", "tokenCount": 3000},
            ],
        },
        FLASH,
        {"service_tier": "flex"},
        "0.00205",
    ),
    (
        # o4-mini priority: 2,000 x 2/M = 0.004; 8,000 x 0.50/M = 0.004; 2,000 x 8/M = 0.016.
        # Total 0.024.
        "o4-mini priority tier",
        "openai.chat",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 2_000,
            "prompt_tokens_details": {"cached_tokens": 8_000},
            "completion_tokens_details": {"reasoning_tokens": 1_500},
        },
        O4_MINI,
        {"service_tier": "priority"},
        "0.024",
    ),
]


@pytest.mark.parametrize(
    ("name", "fmt", "raw", "model", "extra", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_real_usage_objects_price_exactly(
    name: str,
    fmt: str,
    raw: dict[str, Any],
    model: tuple[str, str],
    extra: dict[str, Any],
    expected: str,
) -> None:
    item, total = charge_of(event(fmt, raw, *model, **extra))
    assert total == Decimal(expected), name
    assert item.provider_usage_format == ProviderFormat(fmt)


@pytest.mark.parametrize(
    ("name", "fmt", "raw", "model", "extra", "expected"),
    TIERED_CASES,
    ids=[c[0] for c in TIERED_CASES],
)
def test_tiers_and_new_classes_price_exactly(
    name: str,
    fmt: str,
    raw: dict[str, Any],
    model: tuple[str, str],
    extra: dict[str, Any],
    expected: str,
) -> None:
    _, total = charge_of(event(fmt, raw, *model, at=TIERED_NOW, **extra), TIERED_NOW)
    assert total == Decimal(expected), name


def test_the_issue_example_lands_in_disjoint_classes() -> None:
    item, _ = charge_of(event(*CASES[0][1:3], *O4_MINI))
    u = item.usage
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (
        2_000,
        8_000,
        2_000,
        1_500,
    )


def test_openrouter_reported_cost_is_kept_exactly_and_never_billed() -> None:
    raw = CASES[-3][2]
    item, total = charge_of(event("openrouter", raw, *O4_MINI))
    assert pu.reported_cost(item.provider_usage_format, item.provider_usage) == Decimal("0.0068926")
    doc = CASES[-1][2]
    item, total = charge_of(event("openrouter", doc, *SONNET))
    assert pu.reported_cost(item.provider_usage_format, item.provider_usage) == Decimal("0.95")
    assert total == Decimal("0.000687")  # our price, not OpenRouter's 0.95


def test_a_decoded_provider_event_round_trips() -> None:
    """A parked provider event is replayed from its encoded form: it must decode the same."""
    item = decode_one(event(*CASES[-3][1:3], *O4_MINI))
    assert isinstance(item, UsageEvent)
    [again] = decode_message(encode_event(item), NOW, SKEW, 1_048_576)
    assert again == item


def test_canonical_usage_beside_provider_usage_must_agree() -> None:
    raw = CASES[0][2]
    agreeing = {"input_tokens": 2000, "cached_input_tokens": 8000, "output_tokens": 2000}
    agreeing |= {"reasoning_tokens": 1500, "web_search_count": 3}
    item = decode_one(event("openai.chat", raw, *O4_MINI, usage=agreeing))
    assert isinstance(item, UsageEvent)
    assert item.usage.web_search_count == 3  # OpenAI Chat does not report searches: from usage
    assert item.usage.input_tokens == 2000


CONFLICTS: list[tuple[str, dict[str, Any], Reason, str]] = [
    *(
        (
            f"openrouter cost {cost}",
            event(
                "openrouter", {"prompt_tokens": 10, "completion_tokens": 5, "cost": cost}, *O4_MINI
            ),
            Reason.PROVIDER_USAGE_CONFLICT,
            "$.provider_usage.cost",
        )
        for cost in (-0.5, 1e30, 0.0000000000001)  # negative, too large, past 12 decimals
    ),
    (
        "cached larger than prompt",
        event(
            "openai.chat",
            {
                "prompt_tokens": 100,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 101},
            },
            *O4_MINI,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.prompt_tokens_details.cached_tokens",
    ),
    (
        "reasoning larger than completion",
        event(
            "openai.responses",
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "output_tokens_details": {"reasoning_tokens": 6},
            },
            *O3,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.output_tokens_details.reasoning_tokens",
    ),
    (
        "total disagrees with its parts",
        event(
            "openai.chat",
            {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 106},
            *O4_MINI,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.total_tokens",
    ),
    (
        "canonical input counted the cached tokens again",
        event("openai.chat", CASES[0][2], *O4_MINI, usage={"input_tokens": 10_000}),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.usage.input_tokens",
    ),
    (
        "images billed per image and as tokens",
        event(
            "openai.chat",
            {"prompt_tokens": 900, "completion_tokens": 5},
            *O4_MINI,
            usage={"input_tokens": 900, "output_tokens": 5, "image_count": 1},
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.usage.image_count",
    ),
    (
        "anthropic split disagrees with the write total",
        event(
            "anthropic.messages",
            {
                "input_tokens": 1,
                "output_tokens": 1,
                "cache_creation_input_tokens": 100,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 60,
                    "ephemeral_1h_input_tokens": 50,
                },
            },
            *SONNET,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.cache_creation_input_tokens",
    ),
    (
        "service tier disagrees with the provider's",
        event(
            "anthropic.messages",
            {"input_tokens": 1, "output_tokens": 1, "service_tier": "batch"},
            *SONNET,
            service_tier="standard",
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.service_tier",
    ),
    (
        "openrouter says BYOK, the event does not",
        event(
            "openrouter",
            {"prompt_tokens": 1, "completion_tokens": 1, "is_byok": True},
            *O4_MINI,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.byok",
    ),
    (
        "gemini cached larger than prompt",
        event(
            "gemini",
            {"promptTokenCount": 10, "cachedContentTokenCount": 11, "candidatesTokenCount": 1},
            *FLASH,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.cachedContentTokenCount",
    ),
    (
        "gemini cached audio has no class",
        event(
            "gemini",
            {
                "promptTokenCount": 10,
                "cachedContentTokenCount": 5,
                "candidatesTokenCount": 1,
                "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 5}],
            },
            *FLASH,
        ),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage.cacheTokensDetails",
    ),
    (
        "completed stream without usage",
        event("openai.chat", {"prompt_tokens": 0, "completion_tokens": 0}, *O4_MINI),
        Reason.PROVIDER_USAGE_CONFLICT,
        "$.provider_usage",
    ),
    (
        "unknown format",
        event("mistral.chat", {"prompt_tokens": 1}, *O4_MINI),
        Reason.INVALID_EVENT,
        "$.provider_usage_format",
    ),
    (
        "unknown counter (maybe a new billable class)",
        event(
            "openai.chat",
            {
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "prompt_tokens_details": {"video_tokens": 1},
            },
            *O4_MINI,
        ),
        Reason.INVALID_EVENT,
        "$.provider_usage.prompt_tokens_details.video_tokens",
    ),
    (
        "negative count",
        event("openai.chat", {"prompt_tokens": -1, "completion_tokens": 1}, *O4_MINI),
        Reason.INVALID_EVENT,
        "$.provider_usage.prompt_tokens",
    ),
    (
        "missing whole",
        event("anthropic.messages", {"input_tokens": 1}, *SONNET),
        Reason.INVALID_EVENT,
        "$.provider_usage",
    ),
    (
        "format without object",
        {k: v for k, v in event("gemini", {}, *FLASH).items() if k != "provider_usage"},
        Reason.INVALID_EVENT,
        "$.provider_usage",
    ),
    (
        "object without format",
        {k: v for k, v in event("gemini", {}, *FLASH).items() if k != "provider_usage_format"},
        Reason.INVALID_EVENT,
        "$.provider_usage_format",
    ),
    (
        "neither usage nor provider usage",
        {
            k: v
            for k, v in event("gemini", {}, *FLASH).items()
            if k not in ("provider_usage", "provider_usage_format")
        },
        Reason.INVALID_EVENT,
        "$",
    ),
]


@pytest.mark.parametrize(
    ("name", "payload", "code", "field"), CONFLICTS, ids=[c[0] for c in CONFLICTS]
)
def test_conflicts_are_parked_naming_the_field(
    name: str, payload: dict[str, Any], code: Reason, field: str
) -> None:
    item = decode_one(payload)
    assert isinstance(item, Rejected), (name, item)
    assert (item.reason_code, item.field) == (code, field), item.reason
    assert item.event_id == "req-1" and item.reason


def test_a_parked_provider_payload_keeps_numbers_and_drops_text() -> None:
    raw = {"prompt_tokens": 1, "completion_tokens": 1, "secret": "sk-live-123", "n": [1, "x"]}
    item = decode_one(event("openrouter", raw, *O4_MINI))
    assert isinstance(item, Rejected)
    stored = json.loads(item.payload)
    assert "sk-live" not in item.payload.decode() and '"x"' not in item.payload.decode()
    assert stored["provider_usage"]["prompt_tokens"] == 1
    assert "provider_usage.secret" in stored["_redacted_fields"]


def test_one_hour_writes_before_their_price_exists_are_unpriced_not_guessed() -> None:
    raw = TIERED_CASES[0][2]
    item = decode_one(event("anthropic.messages", raw, *SONNET))
    assert isinstance(item, UsageEvent)
    version = CATALOG.in_force(*SONNET, item.occurred_at)
    assert version is not None
    with pytest.raises(Unpriced) as info:
        price(item.usage, version)
    assert info.value.field == "$.usage.cache_write_1h_tokens"


def test_a_tier_the_version_does_not_price_is_unpriced() -> None:
    item = decode_one(event(*CASES[6][1:3], *GPT_5, service_tier="batch"))
    assert isinstance(item, UsageEvent)
    version = CATALOG.in_force(*GPT_5, item.occurred_at)
    assert version is not None
    with pytest.raises(Unpriced) as info:
        price(item.usage, version, item.service_tier)
    assert info.value.field == "$.service_tier"


def test_a_class_missing_from_a_tier_sheet_is_unpriced_in_that_tier() -> None:
    # o4-mini's batch sheet has no cached-input price: not billed at the standard one.
    payload = event(*CASES[0][1:3], *O4_MINI, at=TIERED_NOW, service_tier="batch")
    item = decode_one(payload, TIERED_NOW)
    assert isinstance(item, UsageEvent)
    version = CATALOG.in_force(*O4_MINI, item.occurred_at)
    assert version is not None
    with pytest.raises(Unpriced) as info:
        price(item.usage, version, item.service_tier)
    assert info.value.field == "$.usage.cached_input_tokens"


# ---- status policy -------------------------------------------------------------------------
SONAR = ("perplexity/sonar", "perplexity")  # 1 in / 1 out per 1M + $0.005 per request


@pytest.mark.parametrize(
    ("status", "raw", "expected"),
    [
        # 1,000 x 1/M + 500 x 1/M + 0.005 = 0.0065
        ("completed", {"prompt_tokens": 1000, "completion_tokens": 500}, "0.0065"),
        # cancelled mid-stream: what the provider reports as consumed, fee included:
        # 1,000 x 1/M + 120 x 1/M + 0.005 = 0.00612
        ("cancelled", {"prompt_tokens": 1000, "completion_tokens": 120}, "0.00612"),
        # failed after the prompt was processed: the reported input, no request fee: 0.001
        ("failed", {"prompt_tokens": 1000, "completion_tokens": 0}, "0.001"),
        # failed before anything happened: nothing
        ("failed", {"prompt_tokens": 0, "completion_tokens": 0}, "0"),
        # cancelled before the first token: the fee only (the request was served)
        ("cancelled", {"prompt_tokens": 0, "completion_tokens": 0}, "0.005"),
    ],
)
def test_cancelled_and_failed_requests_follow_the_one_policy(
    status: str, raw: dict[str, Any], expected: str
) -> None:
    item, total = charge_of(event("openai.chat", raw, *SONAR, status=status))
    assert item.status is RequestStatus(status)
    assert total == Decimal(expected)


# ---- properties: per adapter, never above every token at its side's highest rate, and every
# token of the provider's wholes lands in exactly one class (subsets are never billed twice) ---
counts = st.integers(min_value=0, max_value=10**9)
rates = st.decimals(min_value=0, max_value=100, places=3)


def _version(input_rates: list[Decimal], output_rates: list[Decimal], search: Decimal) -> Any:
    ins = [
        BillableClass.INPUT,
        BillableClass.CACHED_INPUT,
        BillableClass.CACHE_WRITE,
        BillableClass.CACHE_WRITE_1H,
        BillableClass.AUDIO_INPUT,
    ]
    outs = [BillableClass.OUTPUT, BillableClass.AUDIO_OUTPUT]
    prices = {c: PriceComponent(r, 1_000_000) for c, r in zip(ins, input_rates, strict=True)}
    prices |= {c: PriceComponent(r, 1_000_000) for c, r in zip(outs, output_rates, strict=True)}
    prices[BillableClass.WEB_SEARCH] = PriceComponent(search, 1_000)
    prices[BillableClass.REQUEST] = PriceComponent(Decimal("0.01"), 1)
    prices[BillableClass.IMAGE] = PriceComponent(Decimal("1"), 1_000)
    assert set(prices) == set(CLASS_ORDER)
    return PriceVersion("m", "p", NOW, prices, "test")


sheet = st.tuples(
    st.lists(rates, min_size=5, max_size=5), st.lists(rates, min_size=2, max_size=2), rates
)


def _check(
    fmt: ProviderFormat,
    raw: dict[str, Any],
    wholes: tuple[int, int],
    searches: int,
    prices: tuple[list[Decimal], list[Decimal], Decimal],
) -> None:
    derived = pu.derive(fmt, raw, RequestStatus.COMPLETED)
    c = derived.counts
    assert all(v >= 0 for v in c.values())
    inputs = (
        c["input_tokens"]
        + c["cached_input_tokens"]
        + c["cache_write_tokens"]
        + c["cache_write_1h_tokens"]
        + c["audio_input_tokens"]
    )
    outputs = c["output_tokens"] + c["audio_output_tokens"]
    assert (inputs, outputs) == wholes  # each token in exactly one class
    assert c.get("reasoning_tokens", 0) <= c["output_tokens"]
    usage = Usage(**c)
    version = _version(*prices)
    total = price(usage, version).total
    in_max, out_max, search = max(prices[0]), max(prices[1]), prices[2]
    bound = (
        wholes[0] * in_max / 1_000_000
        + wholes[1] * out_max / 1_000_000
        + searches * search / 1_000
        + Decimal("0.01")
    )
    assert total <= bound


@settings(max_examples=150, deadline=None)
@given(
    prompt=counts,
    cached_share=st.floats(0, 1),
    audio_share=st.floats(0, 1),
    write_share=st.floats(0, 1),
    completion=counts,
    reasoning_share=st.floats(0, 1),
    audio_out_share=st.floats(0, 1),
    prices=sheet,
)
def test_property_openai_chat(
    prompt: int,
    cached_share: float,
    audio_share: float,
    write_share: float,
    completion: int,
    reasoning_share: float,
    audio_out_share: float,
    prices: tuple[list[Decimal], list[Decimal], Decimal],
) -> None:
    cached = int(prompt * cached_share)
    audio = int((prompt - cached) * audio_share)
    write = int((prompt - cached - audio) * write_share)
    audio_out = int(completion * audio_out_share)
    reasoning = int((completion - audio_out) * reasoning_share)
    raw = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": cached,
            "audio_tokens": audio,
            "cache_write_tokens": write,
        },
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": audio_out},
    }
    if prompt + completion == 0:
        with pytest.raises(UsageConflict):
            pu.derive(ProviderFormat.OPENAI_CHAT, raw, RequestStatus.COMPLETED)
        return
    _check(ProviderFormat.OPENAI_CHAT, raw, (prompt, completion), 0, prices)
    _check(ProviderFormat.OPENROUTER, raw, (prompt, completion), 0, prices)


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.integers(1, 10**9),
    cached_share=st.floats(0, 1),
    write_share=st.floats(0, 1),
    completion=counts,
    reasoning_share=st.floats(0, 1),
    prices=sheet,
)
def test_property_openai_responses(
    prompt: int,
    cached_share: float,
    write_share: float,
    completion: int,
    reasoning_share: float,
    prices: tuple[list[Decimal], list[Decimal], Decimal],
) -> None:
    cached = int(prompt * cached_share)
    write = int((prompt - cached) * write_share)
    raw = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": write},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(completion * reasoning_share)},
        "total_tokens": prompt + completion,
    }
    _check(ProviderFormat.OPENAI_RESPONSES, raw, (prompt, completion), 0, prices)


@settings(max_examples=150, deadline=None)
@given(
    uncached=st.integers(1, 10**9),
    read=counts,
    short=counts,
    long=counts,
    output=counts,
    searches=st.integers(0, 1000),
    prices=sheet,
)
def test_property_anthropic(
    uncached: int,
    read: int,
    short: int,
    long: int,
    output: int,
    searches: int,
    prices: tuple[list[Decimal], list[Decimal], Decimal],
) -> None:
    raw = {
        "input_tokens": uncached,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": short + long,
        "cache_creation": {"ephemeral_5m_input_tokens": short, "ephemeral_1h_input_tokens": long},
        "output_tokens": output,
        "server_tool_use": {"web_search_requests": searches},
    }
    # Anthropic's whole input is the sum of its three disjoint counters.
    _check(
        ProviderFormat.ANTHROPIC_MESSAGES,
        raw,
        (uncached + read + short + long, output),
        searches,
        prices,
    )


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.integers(1, 10**9),
    cached_share=st.floats(0, 1),
    audio_share=st.floats(0, 1),
    tool=counts,
    candidates=counts,
    audio_out_share=st.floats(0, 1),
    thoughts=counts,
    prices=sheet,
)
def test_property_gemini(
    prompt: int,
    cached_share: float,
    audio_share: float,
    tool: int,
    candidates: int,
    audio_out_share: float,
    thoughts: int,
    prices: tuple[list[Decimal], list[Decimal], Decimal],
) -> None:
    cached = int(prompt * cached_share)
    audio = int((prompt - cached) * audio_share)
    audio_out = int(candidates * audio_out_share)
    raw = {
        "promptTokenCount": prompt,
        "cachedContentTokenCount": cached,
        "toolUsePromptTokenCount": tool,
        "candidatesTokenCount": candidates,
        "thoughtsTokenCount": thoughts,
        "totalTokenCount": prompt + tool + candidates + thoughts,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": prompt - audio},
            {"modality": "AUDIO", "tokenCount": audio},
        ],
        "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": audio_out}],
    }
    _check(ProviderFormat.GEMINI, raw, (prompt + tool, candidates + thoughts), 0, prices)


@settings(max_examples=100, deadline=None)
@given(whole=counts, excess=st.integers(1, 10**6), fmt=st.sampled_from(list(ProviderFormat)))
def test_property_a_subset_larger_than_its_whole_is_never_priced(
    whole: int, excess: int, fmt: ProviderFormat
) -> None:
    raws: dict[ProviderFormat, dict[str, Any]] = {
        ProviderFormat.OPENAI_CHAT: {
            "prompt_tokens": whole,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": whole + excess},
        },
        ProviderFormat.OPENROUTER: {
            "prompt_tokens": whole,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": whole + excess},
        },
        ProviderFormat.OPENAI_RESPONSES: {
            "input_tokens": 1,
            "output_tokens": whole,
            "output_tokens_details": {"reasoning_tokens": whole + excess},
        },
        ProviderFormat.ANTHROPIC_MESSAGES: {
            "input_tokens": 1,
            "output_tokens": 1,
            "cache_creation_input_tokens": whole,
            "cache_creation": {"ephemeral_5m_input_tokens": whole + excess},
        },
        ProviderFormat.GEMINI: {
            "promptTokenCount": whole,
            "cachedContentTokenCount": whole + excess,
            "candidatesTokenCount": 1,
        },
    }
    raw = raws[fmt]
    with pytest.raises(UsageConflict):
        pu.derive(fmt, raw, RequestStatus.COMPLETED)


def test_every_format_has_an_adapter_and_a_case() -> None:
    assert set(pu.ADAPTERS) == set(ProviderFormat)
    assert {ProviderFormat(c[1]) for c in CASES} == set(ProviderFormat)
    assert ServiceTier.STANDARD not in {t for v in CATALOG.all_versions() for t in v.tiers}


# ---- the published JSON Schema agrees with the decoder on provider usage (1.1) ---------------
@pytest.mark.parametrize("case", CASES + TIERED_CASES, ids=[c[0] for c in CASES + TIERED_CASES])
def test_schema_accepts_provider_events_the_decoder_accepts(case: Any) -> None:
    payload = event(case[1], case[2], *case[3], **case[4])
    VALIDATOR.validate(payload)


@pytest.mark.parametrize(
    ("name", "payload", "code", "field"),
    [c for c in CONFLICTS if c[2] is Reason.INVALID_EVENT],
    ids=[c[0] for c in CONFLICTS if c[2] is Reason.INVALID_EVENT],
)
def test_schema_rejects_provider_shapes_the_decoder_rejects(
    name: str, payload: dict[str, Any], code: Reason, field: str
) -> None:
    # (conflicts between fields - subsets, totals, canonical vs provider - are cross-field rules
    # the decoder checks; the schema documents them)
    assert not VALIDATOR.is_valid(payload), name


def test_schema_accepts_a_1_0_event_and_the_new_optional_fields() -> None:
    VALIDATOR.validate(v1_event())
    VALIDATOR.validate(
        v1_event(
            usage={"audio_input_tokens": 3, "cache_write_1h_tokens": 2, "audio_output_tokens": 1},
            service_tier="batch",
            status="cancelled",
        )
    )
    assert not VALIDATOR.is_valid(v1_event(service_tier="turbo"))
    assert not VALIDATOR.is_valid(v1_event(status="aborted"))
    for bad in (v1_event(service_tier="turbo"), v1_event(status="aborted")):
        [item] = decode_message(json.dumps(bad).encode(), NOW, SKEW, 1_048_576)
        assert isinstance(item, Rejected)


def test_the_provider_usage_bench_quick_run_is_exact(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.provider_usage import main

    main(["--quick"])
    assert "derived the canonical classes and totals exactly" in capsys.readouterr().out
