"""Pricing: a pure function from (usage, price version) to exact per-class amounts.

No I/O, no rounding: ``amount = quantity * unit_price / per`` is exact at 12 decimals for every
price the catalog accepts, and the arithmetic runs in a context that raises rather than round
(``money.EXACT``). ``reasoning_tokens`` are inside ``output_tokens`` and are never billed twice; a
flat ``request`` fee, when the version has one, applies once per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext

from billing.catalog import BillableClass, PriceVersion
from billing.errors import Unpriced
from billing.events import Usage
from billing.money import EXACT, ZERO


@dataclass(frozen=True)
class Line:
    billable_class: BillableClass
    quantity: int
    amount: Decimal


@dataclass(frozen=True)
class Charge:
    """Per-class amounts of one event and their total, at one price version."""

    lines: tuple[Line, ...]
    total: Decimal

    def amount_of(self, billable: BillableClass) -> Decimal:
        return next((line.amount for line in self.lines if line.billable_class is billable), ZERO)


def quantities(usage: Usage) -> dict[BillableClass, int]:
    """The billable quantity of each class for one request."""
    return {
        BillableClass.INPUT: usage.input_tokens,
        BillableClass.CACHED_INPUT: usage.cached_input_tokens,
        BillableClass.CACHE_WRITE: usage.cache_write_tokens,
        BillableClass.OUTPUT: usage.output_tokens,
        BillableClass.IMAGE: usage.image_count,
        BillableClass.WEB_SEARCH: usage.web_search_count,
        BillableClass.REQUEST: 1,
    }


def price(usage: Usage, version: PriceVersion) -> Charge:
    """Price one request. Raises ``Unpriced`` when a used class has no price in ``version``."""
    lines = []
    with localcontext(EXACT):
        total = ZERO
        for billable, quantity in quantities(usage).items():
            component = version.prices.get(billable)
            if component is None:
                if quantity and billable is not BillableClass.REQUEST:
                    raise Unpriced(
                        f"{version.label()} has no price for {billable.value}",
                        field=f"$.usage.{billable.value}",
                    )
                continue
            amount = quantity * component.unit_price / component.per
            lines.append(Line(billable, quantity, amount))
            total += amount
    return Charge(tuple(lines), total)
