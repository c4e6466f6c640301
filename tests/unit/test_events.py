"""The usage.v1 wire format: validation names the field; the JSON Schema says the same thing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from billing.events import Reason, Rejected, UsageEvent, decode_message

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
