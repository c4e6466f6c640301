"""Usage events, wire format ``usage.v1`` (see ``schemas/usage.v1.schema.json``).

A message on the usage queue is UTF-8 JSON holding either one event (``"schema": "usage.v1"``) or
an envelope (``"schema": "usage.batch.v1"``, ``"events": [...]``) so a busy gateway can amortise
broker overhead. Each event in an envelope stands or falls on its own.

``decode_message`` turns the raw bytes into accepted ``UsageEvent`` values and ``Rejected`` items
(with a reason code, the JSON path of the offending field and a human reason). No prompt or
response content is ever accepted: unknown fields are an error, and a rejected payload is stored
with unknown fields redacted.

Minor version 1.1 (backward compatible: every 1.0 event decodes and prices identically) adds the
classes ``cache_write_1h_tokens``, ``audio_input_tokens`` and ``audio_output_tokens``, the
optional ``service_tier`` and ``status`` (see ``billing.request_status`` for the policy on
cancelled and failed requests), and ``provider_usage`` + ``provider_usage_format``: the
provider's own usage object, converted here by ``billing.provider_usage`` into the canonical
classes, so the rest of the pipeline never sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
import orjson

from billing import provider_usage as pu
from billing.provider_usage import ProviderFormat
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier

SCHEMA_V1 = "usage.v1"
SCHEMA_BATCH_V1 = "usage.batch.v1"
MAX_ENVELOPE_EVENTS = 10_000
MAX_COUNT = 10**12

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
# Identifiers: 1-200 visible ASCII characters. The character rule is checked after decoding
# (``_bad_identifier``): a msgspec regex costs ~7 us per event, a str check ~0.2 us.
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Name = Ident
_IDENT_FIELDS = ("event_id", "account_id", "api_key_id", "model", "provider")


class Reason(StrEnum):
    """Why an accepted message was parked instead of debited."""

    MALFORMED_JSON = "malformed_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_SCHEMA = "unknown_schema"
    FUTURE_TIMESTAMP = "future_timestamp"
    TOO_LARGE = "too_large"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNPRICED = "unpriced"
    DATABASE_REJECTED = "database_rejected"
    PROVIDER_USAGE_CONFLICT = "provider_usage_conflict"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    CHARGE_OVER_CAP = "charge_over_cap"  # priced over BILLING_MAX_EVENT_CHARGE


class Usage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Disjoint billable classes: no token is counted in two of them.

    ``reasoning_tokens`` is a subset of ``output_tokens``, reported for analysis, never billed on
    its own. ``cache_write_tokens`` are short-TTL (Anthropic 5-minute) cache writes,
    ``cache_write_1h_tokens`` 1-hour ones; audio tokens are not in the text classes.
    """

    input_tokens: Count = 0
    cached_input_tokens: Count = 0
    cache_write_tokens: Count = 0
    output_tokens: Count = 0
    reasoning_tokens: Count = 0
    image_count: Count = 0
    web_search_count: Count = 0
    cache_write_1h_tokens: Count = 0
    audio_input_tokens: Count = 0
    audio_output_tokens: Count = 0


NO_USAGE = Usage()  # the default of UsageEvent.usage: "not sent" (identity-checked)


class UsageEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One request's usage. Encoded without the fields left at their defaults (1.0 stays 1.0)."""

    schema: Literal["usage.v1"]
    event_id: Ident
    occurred_at: datetime
    account_id: Ident
    api_key_id: Ident
    model: Name
    provider: Name
    byok: bool
    usage: Usage = NO_USAGE
    latency_ms: Count | None = None
    ttft_ms: Count | None = None
    hold_id: Ident | None = None  # the hold the gateway authorized this request with (optional)
    service_tier: ServiceTier | None = None  # None: standard, unless provider_usage says
    status: RequestStatus = RequestStatus.COMPLETED
    provider_usage_format: ProviderFormat | None = None
    provider_usage: dict[str, Any] | None = None


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: Literal["usage.batch.v1"]
    events: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_ENVELOPE_EVENTS)]


class _TypedEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The fast path: an envelope whose every event is valid decodes in one pass."""

    schema: Literal["usage.batch.v1"]
    events: Annotated[list[UsageEvent], msgspec.Meta(min_length=1, max_length=MAX_ENVELOPE_EVENTS)]


class _Probe(msgspec.Struct, frozen=True):
    schema: str | None = None


# What an event_id stands for: who pays, for what, when. A resend of an event_id (a gateway
# retry, a redelivery) must carry the same; one that differs in any of these is parked as
# ``conflicting_duplicate`` rather than dropped as a duplicate. Reporting-only fields (latency,
# ttft, hold_id, the provider's own cost) are not compared. The order is that of the query
# ``recorded_billed_content``.
BILLED_CONTENT_FIELDS = (
    "$.occurred_at", "$.account_id", "$.api_key_id", "$.model", "$.provider", "$.byok",
    "$.usage.input_tokens", "$.usage.cached_input_tokens", "$.usage.cache_write_tokens",
    "$.usage.output_tokens", "$.usage.reasoning_tokens", "$.usage.image_count",
    "$.usage.web_search_count", "$.usage.cache_write_1h_tokens", "$.usage.audio_input_tokens",
    "$.usage.audio_output_tokens", "$.service_tier", "$.status", "$.provider_usage_format",
)  # fmt: skip


def billed_content(event: UsageEvent) -> tuple[Any, ...]:
    """The values of ``BILLED_CONTENT_FIELDS`` (after any provider usage object is converted)."""
    e, u = event, event.usage
    return (
        e.occurred_at, e.account_id, e.api_key_id, e.model, e.provider, e.byok,
        u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens,
        u.reasoning_tokens, u.image_count, u.web_search_count, u.cache_write_1h_tokens,
        u.audio_input_tokens, u.audio_output_tokens,
        (e.service_tier or ServiceTier.STANDARD).value, e.status.value,
        None if e.provider_usage_format is None else e.provider_usage_format.value,
    )  # fmt: skip


def content_conflict(recorded: tuple[Any, ...], event: UsageEvent) -> tuple[str, str] | None:
    """The first billed field in which ``event`` differs from the ``recorded`` content of its
    event_id, as (JSON path, reason); None when it is the same event sent again."""
    for path, was, now in zip(BILLED_CONTENT_FIELDS, recorded, billed_content(event), strict=True):
        if was != now:
            return path, (
                f"event_id {event.event_id!r} is already recorded with {path} = {_shown(was)}; "
                f"this copy has {_shown(now)}. The recorded copy stands: discard this one, or "
                "have the gateway send it under a new event_id"
            )
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def conflict_dedup_key(event_id: str, payload: bytes) -> str:
    """One parked row per conflicting content of an event_id (its redeliveries bump it). Never
    the event_id itself: parked rows keyed by an event_id are resolved once it is recorded."""
    return f"conflict:{hashlib.sha256(payload).hexdigest()[:32]}:{event_id}"


@dataclass(frozen=True)
class Rejected:
    """An item that will be parked as a dead letter, with the field and the reason."""

    reason_code: Reason
    field: str
    reason: str
    payload: bytes
    dedup_key: str
    event_id: str | None = None
    account_id: str | None = None
    payload_bytes: int = 0


def dedup_key_for(event_id: str | None, original_payload: bytes) -> str:
    """One parked row per event_id; one per original payload when it carries none."""
    if event_id is not None:
        return event_id
    return "sha256:" + hashlib.sha256(original_payload).hexdigest()


# float_hook: numbers inside provider_usage (OpenRouter's cost) are read as exact Decimals.
_decode_event = msgspec.json.Decoder(UsageEvent, float_hook=Decimal).decode
_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_decode_typed_envelope = msgspec.json.Decoder(_TypedEnvelope, float_hook=Decimal).decode
_decode_probe = msgspec.json.Decoder(_Probe).decode
_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`")
_KNOWN_EVENT_FIELDS = frozenset(UsageEvent.__struct_fields__)
_KNOWN_USAGE_FIELDS = frozenset(Usage.__struct_fields__)
_STORED_RAW_LIMIT = 4096


def _field_of(error: msgspec.ValidationError) -> tuple[str, str]:
    text = str(error)
    match = _PATH.search(text)
    path = match[1] if match else "$"
    reason = text[: match.start()] if match else text
    unknown = _UNKNOWN_FIELD.match(reason)
    if unknown:
        path = f"{path}.{unknown[1]}"
        reason = "unknown field (no prompt or response content is accepted)"
    return path, reason


def redact(payload: bytes) -> bytes:
    """What we store of a rejected payload: known fields only, unknown ones named, not kept.

    A payload that is not a JSON object is kept as its first 4 KiB (it may be anything).
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:_STORED_RAW_LIMIT]
    if not isinstance(obj, dict):
        return payload[:_STORED_RAW_LIMIT]
    # A payload parked before and now replayed names what was dropped then: keep that list, so
    # that redacting twice gives the same bytes (replay finds the row it was parked under).
    earlier = obj.pop(_REDACTED, None)
    dropped: list[str] = []
    if isinstance(earlier, list):
        dropped = [f for f in earlier if isinstance(f, str)]
    dropped += sorted(k for k in obj if k not in _KNOWN_EVENT_FIELDS)
    kept: dict[str, Any] = {
        k: None if k in ("usage", "provider_usage") else _shallow(v, k, dropped)  # below
        for k, v in obj.items()
        if k in _KNOWN_EVENT_FIELDS
    }
    usage = obj.get("usage")
    if "usage" in obj and not isinstance(usage, dict):
        kept["usage"] = _shallow(usage, "usage", dropped)
    if isinstance(usage, dict):
        kept["usage"] = {
            k: _shallow(v, f"usage.{k}", dropped)
            for k, v in usage.items()
            if k in _KNOWN_USAGE_FIELDS
        }
        dropped += sorted(f"usage.{k}" for k in usage if k not in _KNOWN_USAGE_FIELDS)
    if "provider_usage" in obj:
        kept["provider_usage"] = _numbers_only(obj["provider_usage"], "provider_usage", dropped)
    if dropped:
        kept[_REDACTED] = [_name(f) for f in dropped[:_MAX_NAMED]]
    return orjson.dumps(kept)


_MAX_NAMED = 100  # dropped fields named at most (names are the sender's text: keep them short)


def _name(field: str) -> str:
    """A dropped field's name as stored: printable, at most 80 characters (the same again when
    redacted twice)."""
    return "".join(c if c.isprintable() else "?" for c in field[:80])


_REDACTED = "_redacted_fields"
# Objects and lists nested deeper than this are not stored (JSON encoders and Python's stack
# have limits; a usage event needs three levels, a provider usage object a few more).
MAX_STORED_DEPTH = 16


def _shallow(value: Any, path: str, dropped: list[str], depth: int = 1) -> Any:
    """``value`` as stored, with anything nested deeper than ``MAX_STORED_DEPTH`` left out."""
    if isinstance(value, dict | list) and depth > MAX_STORED_DEPTH:
        dropped.append(f"{path} (nested deeper than {MAX_STORED_DEPTH} levels)")
        return None
    if isinstance(value, dict):
        return {k: _shallow(v, f"{path}.{k}", dropped, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_shallow(v, f"{path}[{i}]", dropped, depth + 1) for i, v in enumerate(value)]
    return value


_ENUM_KEYS = frozenset({"service_tier", "modality", "trafficType"})


def _numbers_only(value: Any, path: str, dropped: list[str], depth: int = 1) -> Any:
    """A provider usage object as stored when parked: numbers, booleans and nulls, nested objects
    and lists of them; strings only under the few enumeration keys (no text can leak)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict | list) and depth > MAX_STORED_DEPTH:
        dropped.append(f"{path} (nested deeper than {MAX_STORED_DEPTH} levels)")
        return None
    if isinstance(value, dict):
        kept = {}
        for k, v in value.items():
            if isinstance(v, str) and not (k in _ENUM_KEYS and len(v) <= 40):
                dropped.append(f"{path}.{k}")
                continue
            kept[k] = _numbers_only(v, f"{path}.{k}", dropped, depth + 1)
        return kept
    if isinstance(value, list):
        return [_numbers_only(v, f"{path}[{i}]", dropped, depth + 1) for i, v in enumerate(value)]
    dropped.append(path)
    return None


def _ids_of(payload: bytes) -> tuple[str | None, str | None]:
    """Best effort: the event_id and account_id of a payload that failed validation."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    event_id, account_id = obj.get("event_id"), obj.get("account_id")
    return (
        event_id if isinstance(event_id, str) and 0 < len(event_id) <= 200 else None,
        account_id if isinstance(account_id, str) and 0 < len(account_id) <= 200 else None,
    )


def _reject(code: Reason, field: str, reason: str, payload: bytes) -> Rejected:
    event_id, account_id = _ids_of(payload)
    return Rejected(
        code,
        field,
        reason,
        redact(payload),
        dedup_key_for(event_id, payload),
        event_id,
        account_id,
        len(payload),
    )


def is_identifier(value: str) -> bool:
    """Visible ASCII, no space: what an id, a model or a provider may be (on every edge)."""
    return value.isascii() and value.isprintable() and " " not in value


def _bad_identifier(event: UsageEvent) -> str | None:
    joined = "".join(
        (event.event_id, event.account_id, event.api_key_id, event.model, event.provider)
    )
    if joined.isascii() and joined.isprintable() and " " not in joined:
        return None  # the common case: one pass over all five
    for name in _IDENT_FIELDS:
        if not is_identifier(getattr(event, name)):
            return name
    return None


def decode_event(payload: bytes, now: datetime, max_skew: timedelta) -> UsageEvent | Rejected:
    """One ``usage.v1`` event from its JSON bytes, validated, or the reason it is rejected."""
    try:
        event = _decode_event(payload)
    except msgspec.ValidationError as error:
        field, reason = _field_of(error)
        code = Reason.INVALID_EVENT
        if field == "$.schema":
            code, reason = Reason.UNKNOWN_SCHEMA, f"unknown schema version (expected {SCHEMA_V1!r})"
        return _reject(code, field, reason, payload)
    except msgspec.DecodeError as error:
        return _reject(Reason.MALFORMED_JSON, "$", f"malformed JSON: {error}", payload)
    except RecursionError:
        return _reject(Reason.MALFORMED_JSON, "$", _TOO_DEEP, payload)
    return checked(event, payload, now, max_skew)


# msgspec decodes nested values recursively, up to Python's recursion limit; a document nested
# deeper (a few KiB of brackets suffice) is refused like malformed JSON, not left to crash a worker
_TOO_DEEP = "malformed JSON: nested too deeply to decode"


def checked(
    event: UsageEvent, payload: bytes, now: datetime, max_skew: timedelta
) -> UsageEvent | Rejected:
    """The rules a schema cannot say: identifiers, the timestamp, provider usage, reasoning."""
    bad = _bad_identifier(event)
    if bad is not None:
        return _reject(
            Reason.INVALID_EVENT, f"$.{bad}", "must be visible ASCII characters only", payload
        )
    if event.occurred_at.tzinfo is None or event.occurred_at.utcoffset() is None:
        return _reject(
            Reason.INVALID_EVENT, "$.occurred_at", "must be RFC 3339 with a UTC offset", payload
        )
    if event.occurred_at > now + max_skew:
        return _reject(
            Reason.FUTURE_TIMESTAMP,
            "$.occurred_at",
            f"is more than {int(max_skew.total_seconds())}s in the future",
            payload,
        )
    if event.provider_usage is not None or event.provider_usage_format is not None:
        converted = _with_provider_usage(event)
        if isinstance(converted, tuple):
            return _reject(*converted, payload)
        event = converted
    elif event.usage is NO_USAGE:
        return _reject(
            Reason.INVALID_EVENT,
            "$",
            "Object missing required field `usage` (or `provider_usage` with its format)",
            payload,
        )
    if event.usage.reasoning_tokens > event.usage.output_tokens:
        return _reject(
            Reason.INVALID_EVENT,
            "$.usage.reasoning_tokens",
            "must not exceed usage.output_tokens (reasoning is a subset of output)",
            payload,
        )
    return event


def _with_provider_usage(event: UsageEvent) -> UsageEvent | tuple[Reason, str, str]:
    """The event with its canonical ``usage`` derived from ``provider_usage``, or why not.

    A canonical ``usage`` sent beside the provider's object must agree with it on every class
    the format determines; the classes it cannot determine (e.g. web searches in OpenAI Chat)
    come from ``usage``. Images are in the provider's token counts, so ``image_count`` must be 0.
    """
    fmt, raw = event.provider_usage_format, event.provider_usage
    if fmt is None:
        return (Reason.INVALID_EVENT, "$.provider_usage_format", "required with provider_usage")
    if raw is None:
        return (Reason.INVALID_EVENT, "$.provider_usage", f"required with format {fmt.value!r}")
    try:
        derived = pu.derive(fmt, raw, event.status)
    except msgspec.ValidationError as error:
        field, reason = _field_of(error)
        return (Reason.INVALID_EVENT, "$.provider_usage" + field[1:], f"{fmt.value}: {reason}")
    except pu.UsageConflict as conflict:
        return (Reason.PROVIDER_USAGE_CONFLICT, conflict.field, f"{fmt.value}: {conflict.reason}")
    given = event.usage
    if pu.IMAGES_IN_TOKENS and given.image_count:
        return (
            Reason.PROVIDER_USAGE_CONFLICT,
            "$.usage.image_count",
            f"{fmt.value} counts input images in its prompt tokens; a per-image count beside "
            "it would bill them twice",
        )
    if given is not NO_USAGE:
        for name, count in derived.counts.items():
            if getattr(given, name) != count:
                return (
                    Reason.PROVIDER_USAGE_CONFLICT,
                    f"$.usage.{name}",
                    f"is {getattr(given, name)} but {fmt.value} provider_usage gives {count}",
                )
    tier = event.service_tier
    if derived.service_tier is not None:
        if tier is not None and tier is not derived.service_tier:
            return (
                Reason.PROVIDER_USAGE_CONFLICT,
                "$.service_tier",
                f"is {tier.value!r} but provider_usage.service_tier is "
                f"{derived.service_tier.value!r}",
            )
        tier = derived.service_tier
    if derived.byok is not None and derived.byok != event.byok:
        return (
            Reason.PROVIDER_USAGE_CONFLICT,
            "$.byok",
            f"is {event.byok} but provider_usage.is_byok is {derived.byok}",
        )
    usage = msgspec.structs.replace(given, **derived.counts)
    return msgspec.structs.replace(event, usage=usage, service_tier=tier)


def decode_message(
    body: bytes, now: datetime, max_skew: timedelta, max_bytes: int
) -> list[UsageEvent | Rejected]:
    """All items of one queue message, in order: accepted events and rejected items."""
    if len(body) > max_bytes:
        return [
            Rejected(
                Reason.TOO_LARGE,
                "$",
                f"message of {len(body)} bytes exceeds the {max_bytes}-byte limit",
                body[:_STORED_RAW_LIMIT],
                dedup_key_for(None, body),
                payload_bytes=len(body),
            )
        ]
    try:
        probe = _decode_probe(body)
    except msgspec.ValidationError as error:  # valid JSON, but not an object with a str schema
        field, reason = _field_of(error)
        return [_reject(Reason.INVALID_EVENT, field, reason, body)]
    except msgspec.DecodeError as error:  # (ValidationError is a DecodeError: keep this second)
        return [_reject(Reason.MALFORMED_JSON, "$", f"malformed JSON: {error}", body)]
    except RecursionError:
        return [_reject(Reason.MALFORMED_JSON, "$", _TOO_DEEP, body)]
    if probe.schema != SCHEMA_BATCH_V1:
        return [decode_event(body, now, max_skew)]
    # The common case in one pass: every event of the envelope valid. Otherwise (an event the
    # schema or the rules reject) item by item, so that each rejection names its event and keeps
    # its own payload.
    with contextlib.suppress(msgspec.ValidationError, RecursionError):
        fast = [checked(e, b"", now, max_skew) for e in _decode_typed_envelope(body).events]
        if not any(isinstance(item, Rejected) for item in fast):
            return fast
    return envelope_items(body, now, max_skew)


def envelope_items(body: bytes, now: datetime, max_skew: timedelta) -> list[UsageEvent | Rejected]:
    """An envelope's items one by one: each event decoded from its own bytes."""
    try:
        envelope = _decode_envelope(body)
    except msgspec.ValidationError as error:
        field, reason = _field_of(error)
        return [_reject(Reason.INVALID_EVENT, field, f"envelope: {reason}", body)]
    except RecursionError:
        return [_reject(Reason.MALFORMED_JSON, "$", _TOO_DEEP, body)]
    items: list[UsageEvent | Rejected] = []
    for index, raw in enumerate(envelope.events):
        item = decode_event(bytes(raw), now, max_skew)
        if isinstance(item, Rejected) and item.field.startswith("$"):
            item = replace(item, field=f"$.events[{index}]{item.field[1:]}")
        items.append(item)
    return items


_encode = msgspec.json.Encoder(decimal_format="number").encode


def encode_event(event: UsageEvent) -> bytes:
    return _encode(event)


def encode_envelope(events: list[UsageEvent]) -> bytes:
    return _encode({"schema": SCHEMA_BATCH_V1, "events": events})
