"""The worst case of an authorization is pure (catalog prices); bad requests name the field."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog import (
    CLASS_ORDER,
    DEFAULT_CATALOG,
    BillableClass,
    Catalog,
    PriceVersion,
    read_catalog_file,
)
from billing.errors import InvalidEvent, Unpriced
from billing.events import Usage
from billing.holds import AuthorizationRequest, decode_request, worst_case
from billing.pricing import price
from billing.service_tier import ServiceTier

CATALOG = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def req(**kw: object) -> AuthorizationRequest:
    fields: dict[str, object] = {
        "account_id": "acme",
        "api_key_id": "k",
        "model": "openai/o4-mini",
        "provider": "openai",
        "input_tokens": 1000,
        "max_tokens": 1000,
    }
    fields.update(kw)
    return AuthorizationRequest(**fields)  # type: ignore[arg-type]


def test_input_at_the_input_rate_and_max_tokens_at_the_output_rate() -> None:
    assert worst_case(req(), CATALOG, NOW) == Decimal("0.0055")  # 1.10 and 4.40 per 1M
    assert worst_case(req(max_tokens=None), CATALOG, NOW) == Decimal("0.0011")  # + ceiling in SQL


# (model, provider) priced now, with images priced (the request may carry images)
PRICED = sorted(
    (m, p)
    for (m, p), history in CATALOG.versions.items()
    if (v := CATALOG.in_force(m, p, NOW)) is not None
    and v.unit_rates[0] is not None
    and v.unit_rates[3] is not None
    and v.unit_rates[4] is not None
)


@given(
    st.sampled_from(PRICED),
    st.integers(0, 10**7),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 50),
)
def test_the_worst_case_bounds_every_usage_within_the_request(
    model_provider: tuple[str, str], input_tokens: int, max_tokens: int, output: int, images: int
) -> None:
    model, provider = model_provider
    """Any usage the request can produce (output <= max_tokens, part of the input read from or
    written to the prompt cache) costs at most the hold."""
    version = CATALOG.in_force(model, provider, NOW)
    assert version is not None
    held = worst_case(
        req(model=model, provider=provider, input_tokens=input_tokens, max_tokens=max_tokens,
            image_count=images),
        CATALOG,
        NOW,
    )  # fmt: skip
    cached = input_tokens // 3
    written = input_tokens // 5 if version.unit_rates[2] is not None else 0
    actual = price(
        Usage(
            input_tokens=input_tokens - cached - written,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=min(output, max_tokens),
            image_count=images,
        ),
        version,
    ).total
    assert actual <= held


LATER = datetime(2026, 12, 2, tzinfo=UTC)  # the catalog's tier sheets are in force
# every (model, provider, tier) priced then
SHEETS = sorted(
    ((m, p, tier) for (m, p) in CATALOG.versions
     if (v := CATALOG.in_force(m, p, LATER)) is not None and v.unit_rates[0] is not None
     for tier in (None, *v.tier_rates)),
    key=str,
)  # fmt: skip
SPLIT = st.integers(0, 4)


@given(
    st.sampled_from(SHEETS),
    st.integers(0, 10**7),
    st.integers(0, 10**6),
    st.lists(SPLIT, min_size=5, max_size=5),
    st.booleans(),
)
def test_the_worst_case_bounds_every_split_across_classes_and_tiers(
    sheet: tuple[str, str, ServiceTier | None],
    input_tokens: int,
    max_tokens: int,
    weights: list[int],
    audio_out: bool,
) -> None:
    """The prompt split over every input-side class the sheet prices (uncached, cached, 5-minute
    and 1-hour cache writes, audio), the completion in text or audio, at the request's tier: the
    hold covers it (guards against holding at standard rates for a priority request)."""
    model, provider, tier = sheet
    version = CATALOG.in_force(model, provider, LATER)
    assert version is not None
    held = worst_case(
        req(model=model, provider=provider, input_tokens=input_tokens, max_tokens=max_tokens,
            service_tier=tier),
        CATALOG,
        LATER,
    )  # fmt: skip
    rates = dict(zip(CLASS_ORDER, _sheet_rates(version, tier), strict=True))
    classes = [
        ("input_tokens", BillableClass.INPUT),
        ("cached_input_tokens", BillableClass.CACHED_INPUT),
        ("cache_write_tokens", BillableClass.CACHE_WRITE),
        ("cache_write_1h_tokens", BillableClass.CACHE_WRITE_1H),
        ("audio_input_tokens", BillableClass.AUDIO_INPUT),
    ]
    priced = [(f, w) for (f, c), w in zip(classes, weights, strict=True) if rates[c] is not None]
    total_weight = sum(w for _, w in priced) or 1
    split = {f: input_tokens * w // total_weight for f, w in priced}
    split["input_tokens"] = split.get("input_tokens", 0) + input_tokens - sum(split.values())
    output_field = (
        "audio_output_tokens"
        if audio_out and rates[BillableClass.AUDIO_OUTPUT] is not None
        else "output_tokens"
    )
    actual = price(Usage(**split, **{output_field: max_tokens}), version, tier).total
    assert actual <= held


def _sheet_rates(version: PriceVersion, tier: ServiceTier | None) -> tuple[Decimal | None, ...]:
    if tier is None or tier is ServiceTier.STANDARD:
        return version.unit_rates
    return version.tier_rates[tier]


def test_a_priority_request_is_held_at_the_priority_rates() -> None:
    standard = worst_case(req(), CATALOG, LATER)
    priority = worst_case(req(service_tier=ServiceTier.PRIORITY), CATALOG, LATER)
    assert priority > standard


def test_unpriced_requests_name_the_field() -> None:
    with pytest.raises(Unpriced) as exc:
        worst_case(req(model="nobody/none"), CATALOG, NOW)
    assert exc.value.field == "$.model"


def test_bad_requests_name_the_field() -> None:
    with pytest.raises(InvalidEvent) as exc:
        decode_request(b'{"account_id": "a", "api_key_id": "k", "model": "m", "provider": "p",'
                       b' "input_tokens": -1}')  # fmt: skip
    assert exc.value.field == "$.input_tokens"
    with pytest.raises(InvalidEvent) as exc:
        decode_request(b'{"account_id": "a"}')
    assert "api_key_id" in exc.value.reason
    with pytest.raises(InvalidEvent):
        decode_request(b"not json")
    ok = decode_request(
        b'{"account_id": "a", "api_key_id": "k", "model": "m", "provider": "p",'
        b' "input_tokens": 5, "max_tokens": 9, "byok": true}'
    )
    assert (ok.input_tokens, ok.max_tokens, ok.byok, ok.hold_id) == (5, 9, True, None)
