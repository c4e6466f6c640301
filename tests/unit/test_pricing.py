"""Pricing is a pure function: exact per-class amounts, linear, never negative."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog import (
    DEFAULT_CATALOG,
    BillableClass,
    Catalog,
    PriceComponent,
    PriceVersion,
    read_catalog_file,
)
from billing.errors import Unpriced
from billing.events import Usage
from billing.pricing import price

CATALOG = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
NOW = datetime(2026, 11, 1, tzinfo=UTC)
O4_MINI = CATALOG.in_force("openai/o4-mini", "openai", NOW)

counts = st.integers(min_value=0, max_value=10**9)
usages = st.builds(
    Usage,
    input_tokens=counts,
    cached_input_tokens=counts,
    cache_write_tokens=counts,
    output_tokens=counts,
    image_count=st.integers(0, 1000),
    web_search_count=st.integers(0, 1000),
)
# Every version of the shipped catalog, with the classes a usage may use limited to its prices.
versions = st.sampled_from(CATALOG.all_versions())


def _fit(usage: Usage, version: PriceVersion) -> Usage:
    """Zero the classes this version does not price (they would be Unpriced)."""
    fields = {
        c.value: getattr(usage, c.value) if c in version.prices else 0
        for c in BillableClass
        if c is not BillableClass.REQUEST
    }
    return Usage(**fields)


def test_o4_mini_with_cached_reasoning_and_image_is_exact() -> None:
    assert O4_MINI is not None
    usage = Usage(
        input_tokens=12_345,  # uncached
        cached_input_tokens=4_096,
        output_tokens=2_048,
        reasoning_tokens=1_536,  # inside output_tokens: billed once, at the output price
        image_count=1,
    )
    charge = price(usage, O4_MINI)
    assert charge.amount_of(BillableClass.INPUT) == Decimal("0.0135795")  # 12345 * 1.10 / 1M
    assert charge.amount_of(BillableClass.CACHED_INPUT) == Decimal("0.0011264")  # 4096 * 0.275 / 1M
    assert charge.amount_of(BillableClass.OUTPUT) == Decimal("0.0090112")  # 2048 * 4.40 / 1M
    assert charge.amount_of(BillableClass.IMAGE) == Decimal("0.000842")  # 1 * 0.842 / 1K
    assert charge.total == Decimal("0.0245591")


def test_reasoning_tokens_are_never_billed_twice() -> None:
    assert O4_MINI is not None
    plain = price(Usage(output_tokens=1000), O4_MINI)
    with_reasoning = price(Usage(output_tokens=1000, reasoning_tokens=900), O4_MINI)
    assert plain == with_reasoning


def test_every_class_and_unit() -> None:
    version = PriceVersion(
        "x/model",
        "p",
        NOW,
        {
            BillableClass.INPUT: PriceComponent(Decimal("3"), 1_000_000),
            BillableClass.CACHED_INPUT: PriceComponent(Decimal("0.3"), 1_000_000),
            BillableClass.CACHE_WRITE: PriceComponent(Decimal("3.75"), 1_000_000),
            BillableClass.OUTPUT: PriceComponent(Decimal("15"), 1_000_000),
            BillableClass.IMAGE: PriceComponent(Decimal("7.225"), 1_000),
            BillableClass.WEB_SEARCH: PriceComponent(Decimal("10"), 1_000),
            BillableClass.REQUEST: PriceComponent(Decimal("0.005"), 1),
        },
    )
    charge = price(Usage(1, 1, 1, 1, 0, 1, 1), version)
    assert {line.billable_class: line.amount for line in charge.lines} == {
        BillableClass.INPUT: Decimal("0.000003"),
        BillableClass.CACHED_INPUT: Decimal("0.0000003"),
        BillableClass.CACHE_WRITE: Decimal("0.00000375"),
        BillableClass.OUTPUT: Decimal("0.000015"),
        BillableClass.IMAGE: Decimal("0.007225"),
        BillableClass.WEB_SEARCH: Decimal("0.01"),
        BillableClass.REQUEST: Decimal("0.005"),
    }
    assert charge.total == Decimal("0.02224705")


def test_a_used_class_without_a_price_is_unpriced_not_free() -> None:
    assert O4_MINI is not None
    with pytest.raises(Unpriced) as info:
        price(Usage(input_tokens=1, web_search_count=1), O4_MINI)
    assert info.value.field == "$.usage.web_search_count"
    # A class that is not used needs no price.
    assert price(Usage(input_tokens=1), O4_MINI).total == Decimal("0.0000011")


def test_a_price_not_exact_per_unit_is_refused() -> None:
    from billing.errors import CatalogError

    with pytest.raises(CatalogError):
        PriceComponent(Decimal("0.0000001"), 1_000_000)  # 1e-13 per token


@given(a=usages, b=usages, version=versions)
def test_amount_is_linear_in_counts(a: Usage, b: Usage, version: PriceVersion) -> None:
    a, b = _fit(a, version), _fit(b, version)
    both = Usage(**{f: getattr(a, f) + getattr(b, f) for f in Usage.__struct_fields__})
    per_request = version.prices.get(BillableClass.REQUEST)
    fee = per_request.unit_price if per_request else Decimal(0)
    # Every class is linear; the flat request fee is charged once per request.
    assert price(both, version).total + fee == price(a, version).total + price(b, version).total


@given(usage=usages, version=versions)
def test_never_negative_and_total_is_sum_of_classes(usage: Usage, version: PriceVersion) -> None:
    charge = price(_fit(usage, version), version)
    assert all(line.amount >= 0 for line in charge.lines)
    assert charge.total == sum((line.amount for line in charge.lines), Decimal(0))
    assert charge.total >= 0


@given(usage=usages, version=versions)
def test_amounts_fit_the_storage_scale_exactly(usage: Usage, version: PriceVersion) -> None:
    from billing.money import is_exact_at_scale

    charge = price(_fit(usage, version), version)
    assert all(is_exact_at_scale(line.amount) for line in charge.lines)
