"""The usage.v1 wire format: validation names the field; the JSON Schema says the same thing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from billing.events import (
    BILLED_CONTENT_FIELDS,
    MAX_STORED_DEPTH,
    Reason,
    Rejected,
    Usage,
    UsageEvent,
    billed_content,
    content_conflict,
    decode_message,
    redact,
)
from billing.provider_usage import ProviderFormat
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
SCHEMA = json.loads((Path(__file__).parents[2] / "schemas" / "usage.v1.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema": "usage.v1",
        "event_id": "req-1",
        "occurred_at": "2026-11-21T11:59:00Z",
        "account_id": "acme",
        "api_key_id": "key-1",
        "model": "openai/o4-mini",
        "provider": "openai",
        "byok": False,
        "usage": {
            "input_tokens": 100,
            "cached_input_tokens": 20,
            "output_tokens": 50,
            "reasoning_tokens": 10,
            "image_count": 1,
        },
        "latency_ms": 900,
        "ttft_ms": 120,
    }
    base.update(overrides)
    return base


def decode(obj: Any) -> list[UsageEvent | Rejected]:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return decode_message(body, NOW, SKEW, 1_048_576)


def only_rejection(obj: Any) -> Rejected:
    [item] = decode(obj)
    assert isinstance(item, Rejected), item
    return item


def test_a_valid_event_decodes() -> None:
    [item] = decode(event())
    assert isinstance(item, UsageEvent)
    assert item.usage.cached_input_tokens == 20
    assert item.occurred_at == datetime(2026, 11, 21, 11, 59, tzinfo=UTC)


BAD_CASES = [
    (b'{"schema": "usage.v1", "event_id": ', Reason.MALFORMED_JSON, "$"),
    (b"[1, 2]", Reason.INVALID_EVENT, "$"),
    (event(usage={"input_tokens": -5}), Reason.INVALID_EVENT, "$.usage.input_tokens"),
    (event(usage={"input_tokens": "5"}), Reason.INVALID_EVENT, "$.usage.input_tokens"),
    (
        event(usage={"output_tokens": 5, "reasoning_tokens": 6}),
        Reason.INVALID_EVENT,
        "$.usage.reasoning_tokens",
    ),
    (event(schema="usage.v2"), Reason.UNKNOWN_SCHEMA, "$.schema"),
    (event(occurred_at="2026-11-21T13:00:00Z"), Reason.FUTURE_TIMESTAMP, "$.occurred_at"),
    (event(occurred_at="2026-11-21T11:00:00"), Reason.INVALID_EVENT, "$.occurred_at"),
    (event(occurred_at="yesterday"), Reason.INVALID_EVENT, "$.occurred_at"),
    (event(byok="no"), Reason.INVALID_EVENT, "$.byok"),
    (event(event_id=""), Reason.INVALID_EVENT, "$.event_id"),
    (event(prompt="tell me a secret"), Reason.INVALID_EVENT, "$.prompt"),
    (
        event(usage={"input_tokens": 1, "completion": "text"}),
        Reason.INVALID_EVENT,
        "$.usage.completion",
    ),
    ({k: v for k, v in event().items() if k != "account_id"}, Reason.INVALID_EVENT, "$"),
]


@pytest.mark.parametrize(("payload", "code", "field"), BAD_CASES)
def test_bad_input_is_rejected_naming_the_field(payload: Any, code: Reason, field: str) -> None:
    rejected = only_rejection(payload)
    assert (rejected.reason_code, rejected.field) == (code, field)
    assert rejected.reason
    if isinstance(payload, dict) and payload.get("event_id"):
        assert rejected.event_id == payload["event_id"]
        assert rejected.dedup_key == payload["event_id"]


def test_missing_field_is_named_in_the_reason() -> None:
    rejected = only_rejection({k: v for k, v in event().items() if k != "account_id"})
    assert "account_id" in rejected.reason


def test_content_is_never_stored() -> None:
    rejected = only_rejection(
        event(prompt="tell me a secret", usage={"input_tokens": 1, "completion": "hi"})
    )
    stored = json.loads(rejected.payload)
    assert "secret" not in rejected.payload.decode()
    assert "hi" not in json.dumps(stored["usage"])
    assert stored["_redacted_fields"] == ["prompt", "usage.completion"]


def test_envelope_items_stand_or_fall_alone() -> None:
    envelope = {
        "schema": "usage.batch.v1",
        "events": [
            event(event_id="a"),
            event(event_id="b", usage={"input_tokens": -1}),
            event(event_id="c"),
        ],
    }
    items = decode(envelope)
    assert [type(i).__name__ for i in items] == ["UsageEvent", "Rejected", "UsageEvent"]
    bad = items[1]
    assert isinstance(bad, Rejected)
    assert bad.field == "$.events[1].usage.input_tokens"
    assert bad.event_id == "b"


def test_an_envelope_event_breaking_a_rule_beyond_the_schema_is_rejected_alone() -> None:
    """The one-pass decode of a valid envelope falls back to item by item: the rejection names
    its event's index and keeps that event's own payload."""
    future = event(event_id="late", occurred_at="2026-11-21T13:00:00Z")
    envelope = {"schema": "usage.batch.v1", "events": [event(event_id="a"), future]}
    good, bad = decode(envelope)
    assert isinstance(good, UsageEvent) and good.event_id == "a"
    assert isinstance(bad, Rejected)
    assert (bad.reason_code, bad.field, bad.event_id) == (
        Reason.FUTURE_TIMESTAMP,
        "$.events[1].occurred_at",
        "late",
    )
    assert json.loads(bad.payload)["event_id"] == "late"


def test_a_valid_envelope_decodes_to_the_events_decoded_one_by_one() -> None:
    events = [event(event_id=f"e{i}", usage={"input_tokens": i + 1}) for i in range(5)]
    one_pass = decode({"schema": "usage.batch.v1", "events": events})
    assert one_pass == [item for e in events for item in decode(e)]


def test_oversized_message_is_rejected_and_truncated() -> None:
    body = json.dumps(event(api_key_id="k" * 100)).encode() + b" " * 2_000_000
    [item] = decode_message(body, NOW, SKEW, 1_048_576)
    assert isinstance(item, Rejected) and item.reason_code is Reason.TOO_LARGE
    assert len(item.payload) <= 4096 and item.payload_bytes == len(body)


def test_malformed_payloads_are_deduplicated_by_content() -> None:
    a = only_rejection(b"not json")
    b = only_rejection(b"not json")
    c = only_rejection(b"not json either")
    assert a.dedup_key == b.dedup_key != c.dedup_key


# The published JSON Schema and the decoder agree -------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        event(),
        {"schema": "usage.batch.v1", "events": [event(), event(event_id="2")]},
        event(latency_ms=None, ttft_ms=None),
        event(usage={}),
    ],
)
def test_schema_accepts_what_the_decoder_accepts(payload: Any) -> None:
    VALIDATOR.validate(payload)
    assert all(isinstance(i, UsageEvent) for i in decode(payload))


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        case
        for case in BAD_CASES
        if isinstance(case[0], dict)
        and case[1] not in (Reason.FUTURE_TIMESTAMP,)
        and case[2] != "$.usage.reasoning_tokens"
    ],
)
def test_schema_rejects_what_the_decoder_rejects(payload: Any, code: Reason, field: str) -> None:
    # (future timestamps and reasoning <= output are cross-field rules a JSON Schema cannot state;
    # the schema documents them in descriptions)
    assert not VALIDATOR.is_valid(payload)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_a_message_nested_deeper_than_the_decoder_goes_is_refused_not_raised() -> None:
    """Past Python's recursion limit msgspec raises RecursionError, which escaped decode_message
    and killed the worker's consumer thread for every worker the message was redelivered to."""
    deep = json.dumps(event())[:-1] + f',"provider_usage":{nested(5_000)}}}'
    for body in (deep, f'{{"schema":"usage.batch.v1","events":[{deep}]}}'):
        [item] = decode(body.encode())
        assert isinstance(item, Rejected), item
        assert (item.reason_code, item.field) == (Reason.MALFORMED_JSON, "$")
        assert "nested too deeply" in item.reason


def test_a_deeply_nested_event_in_an_envelope_is_parked_alone_and_stored_shallow() -> None:
    """300 levels decode, but orjson cannot encode them (its limit is 254) and storing the
    rejected event raised TypeError; what is stored stops at MAX_STORED_DEPTH."""
    deep = json.dumps(event(event_id="deep"))[:-1] + f',"provider_usage":{nested(300)}}}'
    good = json.dumps(event(event_id="good"))
    body = f'{{"schema":"usage.batch.v1","events":[{good},{deep}]}}'.encode()
    accepted, bad = decode(body)
    assert isinstance(accepted, UsageEvent) and accepted.event_id == "good"
    assert isinstance(bad, Rejected) and bad.event_id == "deep"
    stored = json.loads(bad.payload)
    dropped = [f for f in stored["_redacted_fields"] if "nested deeper than" in f]
    assert dropped == [
        "provider_usage" + ".a" * MAX_STORED_DEPTH + " (nested deeper than 16 levels)"
    ]


def test_redacting_a_stored_payload_again_gives_the_same_bytes() -> None:
    """Replay re-decodes the stored (redacted) payload: it must be stored the same, or the
    dropped fields' names are lost and an event without an id is parked under a new key."""
    for payload in (
        event(prompt="secret", usage={"input_tokens": -1, "completion": "hi"}),
        {k: v for k, v in event(prompt="secret").items() if k != "event_id"} | {"x": nested(40)},
        event(provider_usage=json.loads(nested(30)), provider_usage_format="openai.chat"),
        event(**{"x" * 300: 1, "tab\there": 2, "new\nline": 3}),  # names the sender chose
        event(_redacted_fields=["the prompt, smuggled " * 20] * 500),
    ):
        stored = redact(json.dumps(payload).encode())
        assert redact(stored) == stored
    smuggled = json.loads(redact(json.dumps(event(_redacted_fields=["p " * 200] * 500)).encode()))
    assert len(smuggled["_redacted_fields"]) == 100
    assert all(len(name) <= 80 for name in smuggled["_redacted_fields"])
    first = only_rejection({k: v for k, v in event(prompt="s").items() if k != "event_id"})
    again = only_rejection(first.payload)
    assert json.loads(again.payload)["_redacted_fields"] == ["prompt"]
    assert again.payload == first.payload


_BASE = UsageEvent(
    schema="usage.v1",
    event_id="req-1",
    occurred_at=datetime(2026, 11, 21, 12, 0, 0, 123000, tzinfo=UTC),
    account_id="acme",
    api_key_id="key-1",
    model="openai/o4-mini",
    provider="openai",
    byok=False,
    usage=Usage(input_tokens=1000, output_tokens=500),
)
_CHANGES: dict[str, dict[str, Any]] = {
    "$.occurred_at": {"occurred_at": _BASE.occurred_at + timedelta(microseconds=1)},
    "$.account_id": {"account_id": "globex"},
    "$.api_key_id": {"api_key_id": "key-2"},
    "$.model": {"model": "openai/o3"},
    "$.provider": {"provider": "azure"},
    "$.byok": {"byok": True},
    "$.service_tier": {"service_tier": ServiceTier.FLEX},
    "$.status": {"status": RequestStatus.FAILED},
    "$.provider_usage_format": {"provider_usage_format": ProviderFormat.OPENAI_CHAT},
}


@pytest.mark.parametrize("path", BILLED_CONTENT_FIELDS)
def test_a_resend_differing_in_one_billed_field_names_that_field(path: str) -> None:
    if path.startswith("$.usage."):
        name = path.removeprefix("$.usage.")
        usage = msgspec.structs.replace(_BASE.usage, **{name: getattr(_BASE.usage, name) + 1})
        resent = msgspec.structs.replace(_BASE, usage=usage)
    else:
        resent = msgspec.structs.replace(_BASE, **_CHANGES[path])
    conflict = content_conflict(billed_content(_BASE), resent)
    assert conflict is not None
    assert conflict[0] == path
    assert "'req-1' is already recorded" in conflict[1]


def test_a_resend_is_the_same_event_whatever_its_reporting_fields_and_zone() -> None:
    resent = msgspec.structs.replace(
        _BASE,
        occurred_at=_BASE.occurred_at.astimezone(timezone(timedelta(hours=-5))),
        latency_ms=1200,
        ttft_ms=90,
        hold_id="hold-9",
        service_tier=ServiceTier.STANDARD,  # as sent explicitly; None means standard
    )
    assert content_conflict(billed_content(_BASE), resent) is None
    assert content_conflict(billed_content(_BASE), _BASE) is None
