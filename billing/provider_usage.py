"""Provider usage adapters: the usage object a provider returned -> canonical disjoint classes.

A gateway may forward, instead of (or beside) the canonical ``usage`` classes, the provider's
own usage object (``provider_usage``) and name its format (``provider_usage_format``). Each
format has ONE pure adapter here, with the provider's semantics written beside it. The adapters
run while the event is decoded (``billing.events.decode_event``), so pricing, the ledger and the
exports only ever see canonical classes in which no token is counted twice.

Rules common to every adapter:

* A subset is subtracted from its whole exactly once (``cached_tokens`` out of ``prompt_tokens``
  in OpenAI; never in Anthropic, where ``input_tokens`` already excludes cache reads and writes).
* Nothing is guessed. A subset larger than its whole, a negative derived count, a reported total
  that disagrees with its parts, a split that disagrees with its sum, or a counter that has no
  billable class (Gemini cached audio) raises ``UsageConflict``
  naming the field path (``$.provider_usage.prompt_tokens_details.cached_tokens``); the event is
  parked as ``provider_usage_conflict``. A field the adapter does not know is an error too
  (``invalid_event``): it may be a new billable counter, and billing it at zero would be a guess.
* Images are billed inside the prompt tokens by all four providers' token counts, so an event
  with ``provider_usage`` must not also carry a per-image ``image_count`` (``IMAGES_IN_TOKENS``).
* A completed request that reports no token at all is parked (``request_status``): that is what a
  stream read without usage looks like, and pricing it at zero would lose the revenue.

Sources (field names and meanings): openai/openai-python ``types/completion_usage.py`` and
``types/responses/response_usage.py`` (v3.3.1, see /work/shared/reference/openai); Anthropic
Messages API reference, ``Usage`` object (docs.anthropic.com/en/api/messages: input_tokens,
cache_creation_input_tokens, cache_read_input_tokens, cache_creation.ephemeral_5m_input_tokens /
ephemeral_1h_input_tokens, server_tool_use.web_search_requests, service_tier) and the prompt
caching guide ("total input tokens = input_tokens + cache_creation_input_tokens +
cache_read_input_tokens"); Gemini API reference ``GenerateContentResponse.UsageMetadata``
(ai.google.dev/api/generate-content#UsageMetadata: promptTokenCount includes
cachedContentTokenCount; candidatesTokenCount, thoughtsTokenCount and toolUsePromptTokenCount are
separate; per-modality ``ModalityTokenCount`` lists); OpenRouter ``ChatUsage`` (OpenRouterTeam/docs
openapi.yaml, see /work/shared/reference/openrouter).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from billing.request_status import RequestStatus, must_report_tokens
from billing.service_tier import ServiceTier

MAX_COUNT = 10**12
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
# SDKs type most detail counters Optional and send null: null is 0.
Opt = Count | None
Enum = Annotated[str, msgspec.Meta(max_length=40)]  # an enumeration value (e.g. "AUDIO")
Cost = Decimal  # exact as sent (the event decoder reads JSON numbers here as Decimal)


class ProviderFormat(StrEnum):
    OPENAI_CHAT = "openai.chat"
    OPENAI_RESPONSES = "openai.responses"
    ANTHROPIC_MESSAGES = "anthropic.messages"
    GEMINI = "gemini"
    OPENROUTER = "openrouter"


class UsageConflict(Exception):
    """The provider's usage object contradicts itself or the event; ``field`` is its JSON path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Derived(NamedTuple):
    """What one usage object determines.

    ``counts`` maps canonical ``events.Usage`` field names to counts: every class the format
    determines, zeros included (a canonical ``usage`` sent beside it must agree on each). Classes
    the format cannot know (e.g. ``web_search_count`` for OpenAI Chat, which does not report tool
    calls) are absent and come from the canonical ``usage``.
    """

    counts: dict[str, int]
    service_tier: ServiceTier | None = None
    byok: bool | None = None
    reported_cost: Decimal | None = None


ROOT = "$.provider_usage"
IMAGES_IN_TOKENS = True  # every supported format counts input images as prompt tokens


def _n(value: int | None) -> int:
    return 0 if value is None else value


def _subset(parts: dict[str, int], whole: int, whole_path: str) -> int:
    """``whole - sum(parts)``, or a conflict naming the part that made it negative."""
    rest = whole
    for path, count in parts.items():
        rest -= count
        if rest < 0:
            raise UsageConflict(
                f"{ROOT}.{path}",
                f"subsets ({', '.join(f'{p}={c}' for p, c in parts.items())}) exceed "
                f"{whole_path}={whole}",
            )
    return rest


def _total(reported: int | None, computed: int, path: str, formula: str) -> None:
    if reported is not None and reported != computed:
        raise UsageConflict(
            f"{ROOT}.{path}",
            f"is {reported} but {formula} = {computed}; the object is inconsistent",
        )


def _nonempty(counts: dict[str, int], status: RequestStatus) -> None:
    if must_report_tokens(status) and not any(
        v for k, v in counts.items() if k.endswith("_tokens")
    ):
        raise UsageConflict(
            ROOT,
            "a completed request reports no tokens (a stream read without usage?); "
            "refusing to price it at zero",
        )


# ---- openai.chat ---------------------------------------------------------------------------
# Chat Completions ``usage`` (CompletionUsage):
# * prompt_tokens is ALL input. prompt_tokens_details.cached_tokens (cache reads) and
#   .audio_tokens (audio input) are SUBSETS of it, disjoint from each other: uncached text input
#   = prompt - cached - audio.
# * .cache_write_tokens (written to the cache, since SDK 2.45) is a subset of the UNCACHED input
#   and stays in input_tokens: OpenAI has no cache-write price (its price list has input and
#   "cached input" only), written tokens are ordinary input. It is checked, not re-classed.
#   (.text_tokens / .image_tokens are a modality breakdown, informational: images are input
#   tokens at the input price.)
# * completion_tokens is ALL output. completion_tokens_details.reasoning_tokens (billed as
#   output, reported) and .audio_tokens (audio output, its own price) are subsets;
#   accepted/rejected_prediction_tokens are inside it too and billed as output ("still counted in
#   the total completion tokens for purposes of billing").
# * total_tokens, when present, = prompt_tokens + completion_tokens.
class _ChatPromptDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cached_tokens: Opt = None
    audio_tokens: Opt = None
    cache_write_tokens: Opt = None
    text_tokens: Opt = None
    image_tokens: Opt = None


class _ChatCompletionDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reasoning_tokens: Opt = None
    audio_tokens: Opt = None
    accepted_prediction_tokens: Opt = None
    rejected_prediction_tokens: Opt = None
    text_tokens: Opt = None


class OpenAIChatUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Opt = None
    prompt_tokens_details: _ChatPromptDetails | None = None
    completion_tokens_details: _ChatCompletionDetails | None = None


def _chat_counts(
    prompt: int,
    completion: int,
    total: int | None,
    pd: _ChatPromptDetails | None,
    cd: _ChatCompletionDetails | None,
    *,
    writes_priced: bool,
) -> dict[str, int]:
    """The shared core of the CompletionUsage shape (OpenAI Chat and OpenRouter).

    ``writes_priced``: cache writes are their own class (OpenRouter, whose upstreams such as
    Anthropic price them) or ordinary input (OpenAI).
    """
    cached = _n(pd.cached_tokens) if pd else 0
    audio_in = _n(pd.audio_tokens) if pd else 0
    written = _n(pd.cache_write_tokens) if pd else 0
    uncached = _subset(
        {
            "prompt_tokens_details.cached_tokens": cached,
            "prompt_tokens_details.audio_tokens": audio_in,
            "prompt_tokens_details.cache_write_tokens": written,
        },
        prompt,
        "prompt_tokens",
    )
    write = written if writes_priced else 0
    if not writes_priced:
        uncached += written
    reasoning = _n(cd.reasoning_tokens) if cd else 0
    audio_out = _n(cd.audio_tokens) if cd else 0
    _subset(
        {
            "completion_tokens_details.reasoning_tokens": reasoning,
            "completion_tokens_details.audio_tokens": audio_out,
        },
        completion,
        "completion_tokens",
    )
    if cd:
        _subset(
            {
                "completion_tokens_details.accepted_prediction_tokens": _n(
                    cd.accepted_prediction_tokens
                ),
                "completion_tokens_details.rejected_prediction_tokens": _n(
                    cd.rejected_prediction_tokens
                ),
            },
            completion,
            "completion_tokens",
        )
    _total(total, prompt + completion, "total_tokens", "prompt_tokens + completion_tokens")
    return {
        "input_tokens": uncached,
        "cached_input_tokens": cached,
        "cache_write_tokens": write,
        "cache_write_1h_tokens": 0,
        "audio_input_tokens": audio_in,
        "output_tokens": completion - audio_out,
        "reasoning_tokens": reasoning,
        "audio_output_tokens": audio_out,
    }


def openai_chat(usage: OpenAIChatUsage, status: RequestStatus) -> Derived:
    counts = _chat_counts(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.prompt_tokens_details,
        usage.completion_tokens_details,
        writes_priced=False,
    )
    _nonempty(counts, status)
    return Derived(counts)


# ---- openai.responses ----------------------------------------------------------------------
# Responses API ``usage`` (ResponseUsage), also the Batch object's usage (no cache_write_tokens):
# * input_tokens is ALL input; input_tokens_details.cached_tokens is a subset (cache reads).
#   .cache_write_tokens is a subset of the uncached rest and stays ordinary input (OpenAI has no
#   cache-write price, as in openai.chat); its cache_write_tokens_details {ttl_30m_tokens,
#   ttl_12h_tokens}, when present, must add up to it.
# * output_tokens is ALL output; output_tokens_details.reasoning_tokens is a subset (billed as
#   output). No audio in this API.
# * total_tokens = input_tokens + output_tokens.
class _CacheWriteTTL(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttl_30m_tokens: Opt = None
    ttl_12h_tokens: Opt = None


class _RespInputDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cached_tokens: Opt = None
    cache_write_tokens: Opt = None
    cache_write_tokens_details: _CacheWriteTTL | None = None


class _RespOutputDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reasoning_tokens: Opt = None


class OpenAIResponsesUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input_tokens: Count
    output_tokens: Count
    total_tokens: Opt = None
    input_tokens_details: _RespInputDetails | None = None
    output_tokens_details: _RespOutputDetails | None = None


def openai_responses(usage: OpenAIResponsesUsage, status: RequestStatus) -> Derived:
    d = usage.input_tokens_details
    cached = _n(d.cached_tokens) if d else 0
    write = _n(d.cache_write_tokens) if d else 0
    ttl = d.cache_write_tokens_details if d else None
    if ttl is not None:
        short, long = _n(ttl.ttl_30m_tokens), _n(ttl.ttl_12h_tokens)
        _total(
            write,
            short + long,
            "input_tokens_details.cache_write_tokens",
            "ttl_30m_tokens + ttl_12h_tokens",
        )
    uncached = _subset(
        {
            "input_tokens_details.cached_tokens": cached,
            "input_tokens_details.cache_write_tokens": write,
        },
        usage.input_tokens,
        "input_tokens",
    )
    uncached += write  # written tokens are ordinary input at OpenAI
    o = usage.output_tokens_details
    reasoning = _n(o.reasoning_tokens) if o else 0
    _subset({"output_tokens_details.reasoning_tokens": reasoning}, usage.output_tokens, "output")
    _total(
        usage.total_tokens,
        usage.input_tokens + usage.output_tokens,
        "total_tokens",
        "input_tokens + output_tokens",
    )
    counts = {
        "input_tokens": uncached,
        "cached_input_tokens": cached,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "audio_input_tokens": 0,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": reasoning,
        "audio_output_tokens": 0,
    }
    _nonempty(counts, status)
    return Derived(counts)


# ---- anthropic.messages --------------------------------------------------------------------
# Messages API ``usage``:
# * input_tokens EXCLUDES cache reads and cache writes: it is the uncached input alone (total
#   input = input_tokens + cache_creation_input_tokens + cache_read_input_tokens). Nothing is
#   subtracted.
# * cache_read_input_tokens: cache reads. cache_creation_input_tokens: cache writes, split by TTL
#   in cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens} (5-minute writes at
#   1.25x input, 1-hour at 2x); the split must add up to cache_creation_input_tokens. Without
#   the split object all writes are 5-minute (the API's default TTL).
# * output_tokens: all output, extended thinking included (not reported separately).
# * server_tool_use.web_search_requests: searches actually executed (billed per search);
#   web_fetch_requests cost nothing beyond their tokens.
# * service_tier: "standard" | "priority" | "batch" as Anthropic billed it.
class _CacheCreation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ephemeral_5m_input_tokens: Opt = None
    ephemeral_1h_input_tokens: Opt = None


class _ServerToolUse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    web_search_requests: Opt = None
    web_fetch_requests: Opt = None


class AnthropicUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input_tokens: Count
    output_tokens: Count
    cache_creation_input_tokens: Opt = None
    cache_read_input_tokens: Opt = None
    cache_creation: _CacheCreation | None = None
    server_tool_use: _ServerToolUse | None = None
    service_tier: Literal["standard", "priority", "batch"] | None = None


def anthropic_messages(usage: AnthropicUsage, status: RequestStatus) -> Derived:
    writes = _n(usage.cache_creation_input_tokens)
    split = usage.cache_creation
    if split is None:
        short, long = writes, 0
    else:
        short, long = _n(split.ephemeral_5m_input_tokens), _n(split.ephemeral_1h_input_tokens)
        _total(
            usage.cache_creation_input_tokens,
            short + long,
            "cache_creation_input_tokens",
            "cache_creation.ephemeral_5m_input_tokens + ephemeral_1h_input_tokens",
        )
    counts = {
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": _n(usage.cache_read_input_tokens),
        "cache_write_tokens": short,
        "cache_write_1h_tokens": long,
        "audio_input_tokens": 0,
        "output_tokens": usage.output_tokens,
        "audio_output_tokens": 0,
        "web_search_count": _n(usage.server_tool_use.web_search_requests)
        if usage.server_tool_use
        else 0,
    }
    _nonempty(counts, status)
    tier = None if usage.service_tier is None else ServiceTier(usage.service_tier)
    return Derived(counts, service_tier=tier)


# ---- gemini --------------------------------------------------------------------------------
# generateContent ``usageMetadata`` (zero counters are omitted from the JSON):
# * promptTokenCount is ALL prompt input and INCLUDES cachedContentTokenCount (cache reads).
# * toolUsePromptTokenCount: input produced by tool use (e.g. search results fed back), billed
#   as input, NOT included in promptTokenCount.
# * candidatesTokenCount: response tokens, EXCLUDING thoughtsTokenCount; thinking is billed at the
#   output price, so output = candidates + thoughts, and reasoning = thoughts.
# * totalTokenCount = prompt + toolUsePrompt + candidates + thoughts.
# * The *TokensDetails lists break counts down by modality; AUDIO input/output has its own price.
#   Cached AUDIO (cacheTokensDetails) has a price of its own that the catalog has no class for:
#   parked, not priced as cached text.
class _Modality(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    modality: Enum = "MODALITY_UNSPECIFIED"
    token_count: Opt = None


class GeminiUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    prompt_token_count: Opt = None
    cached_content_token_count: Opt = None
    candidates_token_count: Opt = None
    thoughts_token_count: Opt = None
    tool_use_prompt_token_count: Opt = None
    total_token_count: Opt = None
    prompt_tokens_details: list[_Modality] | None = None
    cache_tokens_details: list[_Modality] | None = None
    candidates_tokens_details: list[_Modality] | None = None
    tool_use_prompt_tokens_details: list[_Modality] | None = None
    traffic_type: Enum | None = None


def _audio(details: list[_Modality] | None) -> int:
    return sum(_n(d.token_count) for d in details or () if d.modality == "AUDIO")


def gemini(usage: GeminiUsage, status: RequestStatus) -> Derived:
    prompt = _n(usage.prompt_token_count)
    cached = _n(usage.cached_content_token_count)
    tool = _n(usage.tool_use_prompt_token_count)
    candidates = _n(usage.candidates_token_count)
    thoughts = _n(usage.thoughts_token_count)
    if _audio(usage.cache_tokens_details):
        raise UsageConflict(
            f"{ROOT}.cacheTokensDetails",
            "cached AUDIO tokens have no billable class in the catalog; not guessed",
        )
    prompt_audio = _audio(usage.prompt_tokens_details)
    tool_audio = _audio(usage.tool_use_prompt_tokens_details)
    text_prompt = _subset(
        {"cachedContentTokenCount": cached, "promptTokensDetails[AUDIO]": prompt_audio},
        prompt,
        "promptTokenCount",
    )
    text_tool = _subset(
        {"toolUsePromptTokensDetails[AUDIO]": tool_audio}, tool, "toolUsePromptTokenCount"
    )
    audio_out = _audio(usage.candidates_tokens_details)
    text_candidates = _subset(
        {"candidatesTokensDetails[AUDIO]": audio_out}, candidates, "candidatesTokenCount"
    )
    _total(
        usage.total_token_count,
        prompt + tool + candidates + thoughts,
        "totalTokenCount",
        "promptTokenCount + toolUsePromptTokenCount + candidatesTokenCount + thoughtsTokenCount",
    )
    counts = {
        "input_tokens": text_prompt + text_tool,
        "cached_input_tokens": cached,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "audio_input_tokens": prompt_audio + tool_audio,
        "output_tokens": text_candidates + thoughts,
        "reasoning_tokens": thoughts,
        "audio_output_tokens": audio_out,
    }
    _nonempty(counts, status)
    return Derived(counts)


# ---- openrouter ----------------------------------------------------------------------------
# OpenRouter Chat ``usage`` (ChatUsage): the CompletionUsage shape and semantics of openai.chat
# (prompt_tokens includes cached_tokens, cache_write_tokens and audio_tokens; video_tokens are
# inside it too and billed as input; completion_tokens includes reasoning and audio), normalised
# by OpenRouter for every upstream, plus:
# * cost: what OpenRouter charged for the request (credits = USD). RECORDED for comparison with
#   our own price (``billing usage provider-costs``), NEVER billed: it includes OpenRouter's own
#   pricing decisions, and on BYOK requests it is only OpenRouter's fee.
# * is_byok: must agree with the event's ``byok``.
# * cost_details / server_tool_use_details: informational (tool calls are generic, not web
#   searches; a gateway that runs OpenRouter's web search reports web_search_count in ``usage``).
# cache_write_tokens are 5-minute writes (OpenRouter prices `input_cache_write` at the 5-minute
# rate; 1-hour writes are not reported separately).
class _ORPromptDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cached_tokens: Opt = None
    cache_write_tokens: Opt = None
    audio_tokens: Opt = None
    video_tokens: Opt = None


class _ORCostDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    upstream_inference_cost: Cost | None = None
    upstream_inference_prompt_cost: Cost | None = None
    upstream_inference_completions_cost: Cost | None = None
    upstream_inference_input_cost: Cost | None = None
    upstream_inference_output_cost: Cost | None = None
    server_tool_cost: Cost | None = None


class _ORServerTools(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tool_calls_requested: Opt = None
    tool_calls_executed: Opt = None


class OpenRouterUsage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Opt = None
    prompt_tokens_details: _ORPromptDetails | None = None
    completion_tokens_details: _ChatCompletionDetails | None = None
    cost: Cost | None = None
    is_byok: bool | None = None
    cost_details: _ORCostDetails | None = None
    server_tool_use_details: _ORServerTools | None = None


def openrouter(usage: OpenRouterUsage, status: RequestStatus) -> Derived:
    pd = usage.prompt_tokens_details
    as_chat = (
        None
        if pd is None
        else _ChatPromptDetails(
            cached_tokens=pd.cached_tokens,
            audio_tokens=pd.audio_tokens,
            cache_write_tokens=pd.cache_write_tokens,
        )
    )
    counts = _chat_counts(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        as_chat,
        usage.completion_tokens_details,
        writes_priced=True,
    )
    _nonempty(counts, status)
    if usage.cost is not None and (
        not usage.cost.is_finite() or usage.cost < 0 or usage.cost >= MAX_REPORTED_COST
    ):
        raise UsageConflict(
            f"{ROOT}.cost", f"must be a number from 0 to {MAX_REPORTED_COST}, got {usage.cost}"
        )
    if usage.cost is not None and usage.cost != usage.cost.quantize(COST_QUANTUM, ROUND_DOWN):
        raise UsageConflict(f"{ROOT}.cost", f"more than 12 decimal places: {usage.cost}")
    return Derived(counts, byok=usage.is_byok, reported_cost=usage.cost)


# The reported cost is stored beside ours in NUMERIC(38, 12): bounded, and exact as given.
MAX_REPORTED_COST = Decimal(10) ** 9
COST_QUANTUM = Decimal("1e-12")


# ---- dispatch ------------------------------------------------------------------------------
class _Adapter(NamedTuple):
    shape: type[msgspec.Struct]
    derive: Callable[[Any, RequestStatus], Derived]


ADAPTERS: dict[ProviderFormat, _Adapter] = {
    ProviderFormat.OPENAI_CHAT: _Adapter(OpenAIChatUsage, openai_chat),
    ProviderFormat.OPENAI_RESPONSES: _Adapter(OpenAIResponsesUsage, openai_responses),
    ProviderFormat.ANTHROPIC_MESSAGES: _Adapter(AnthropicUsage, anthropic_messages),
    ProviderFormat.GEMINI: _Adapter(GeminiUsage, gemini),
    ProviderFormat.OPENROUTER: _Adapter(OpenRouterUsage, openrouter),
}


def derive(fmt: ProviderFormat, raw: dict[str, Any], status: RequestStatus) -> Derived:
    """Parse and convert one usage object.

    Raises ``msgspec.ValidationError`` (path relative to the object) or ``UsageConflict``.
    """
    adapter = ADAPTERS[fmt]
    return adapter.derive(msgspec.convert(raw, adapter.shape), status)


def reported_cost(fmt: ProviderFormat | None, raw: dict[str, Any] | None) -> Decimal | None:
    """The provider's own cost figure (OpenRouter's ``cost``), for the usage_events row."""
    if fmt is not ProviderFormat.OPENROUTER or raw is None:
        return None
    cost = raw.get("cost")
    if cost is None:
        return None
    return msgspec.convert(cost, Cost)
