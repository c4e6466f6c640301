"""The worst case of an authorization is pure (catalog prices); bad requests name the field."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog import DEFAULT_CATALOG, Catalog, read_catalog_file
from billing.errors import InvalidEvent, Unpriced
from billing.events import Usage
from billing.holds import AuthorizationRequest, decode_request, worst_case
from billing.pricing import price

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
