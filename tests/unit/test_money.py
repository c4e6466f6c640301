from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.money import CentsAllocator, exact, format_usd, to_cents


def test_to_cents_rounds_half_even() -> None:
    assert to_cents(Decimal("0.005")) == 0
    assert to_cents(Decimal("0.015")) == 2
    assert to_cents(Decimal("0.025")) == 2
    assert to_cents(Decimal("0.0250000001")) == 3
    assert to_cents(Decimal("-0.015")) == -2
    assert to_cents(Decimal("105.00")) == 10500


def test_exact_refuses_more_than_twelve_places() -> None:
    assert exact("0.000000000001") == Decimal("1E-12")
    with pytest.raises(ValueError):
        exact("0.0000000000001")
    with pytest.raises(ValueError):
        exact("NaN")


def test_format_usd_is_plain_and_exact() -> None:
    assert format_usd(Decimal("10")) == "10.00"
    assert format_usd(Decimal("0.025592000000")) == "0.025592"
    assert format_usd(Decimal("-63.40782259")) == "-63.40782259"
    assert format_usd(Decimal("1E-12")) == "0.000000000001"


amounts = st.decimals(min_value=-1000, max_value=1000, places=12, allow_nan=False)


@given(st.lists(amounts, max_size=50))
def test_allocated_cents_sum_to_the_rounded_total(lines: list[Decimal]) -> None:
    allocator = CentsAllocator()
    cents = allocator.lines(lines)
    assert sum(cents) == to_cents(sum(lines, Decimal(0)))
    # no line is more than a cent away from its own rounding
    assert all(abs(c - to_cents(a)) <= 1 for c, a in zip(cents, lines, strict=True))
