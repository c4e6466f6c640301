"""Pricing: a pure function from (usage, price version) to exact per-class amounts.

No I/O, no rounding: ``amount = quantity * (unit_price / per)`` is exact at 12 decimals for every
price the catalog accepts (the per-unit rate is exact by construction), and each multiplication
runs in ``money.EXACT``, which raises rather than round. ``reasoning_tokens`` are inside
``output_tokens`` and are never billed twice; a flat ``request`` fee, when the version has one,
applies once per event (not on a failed request: ``billing.request_status``).

A version prices the standard service tier in ``prices`` and may price other tiers explicitly;
an event in a tier its version does not price is ``Unpriced`` (field ``$.service_tier``), never
billed at another tier's price.

This is on the hot path (every event), so a version's per-unit rates are computed once
(``PriceVersion.unit_rates``) and amounts are a fixed-order tuple, not a mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

from billing.catalog import CLASS_ORDER, BillableClass, PriceVersion
from billing.errors import Unpriced
from billing.events import Usage
from billing.money import EXACT, ZERO
from billing.request_status import RequestStatus, request_fee_applies
from billing.service_tier import ServiceTier

_INDEX = {billable: i for i, billable in enumerate(CLASS_ORDER)}
_REQUEST = _INDEX[BillableClass.REQUEST]
_ZEROS = (ZERO,) * len(CLASS_ORDER)
_multiply = EXACT.multiply
_add = EXACT.add


@dataclass(frozen=True)
class Line:
    billable_class: BillableClass
    quantity: int
    amount: Decimal


class Charge(NamedTuple):
    """Per-class quantities and amounts of one event (in ``CLASS_ORDER``) and their total.

    A NamedTuple rather than a frozen dataclass: it is built once per event on the hot path.
    """

    quantities: tuple[int, ...]
    amounts: tuple[Decimal, ...]
    total: Decimal

    def amount_of(self, billable: BillableClass) -> Decimal:
        return self.amounts[_INDEX[billable]]

    @property
    def lines(self) -> tuple[Line, ...]:
        """The classes this event was charged for (a priced class, even at quantity 0)."""
        return tuple(
            Line(c, q, a)
            for c, q, a in zip(CLASS_ORDER, self.quantities, self.amounts, strict=True)
            if q or a
        )


def quantities(usage: Usage, requests: int = 1) -> tuple[int, ...]:
    """The billable quantity of each class in ``CLASS_ORDER`` for one request."""
    return (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
        usage.image_count,
        usage.web_search_count,
        requests,  # one request (0: its fee is not charged)
        usage.cache_write_1h_tokens,
        usage.audio_input_tokens,
        usage.audio_output_tokens,
    )


def price(
    usage: Usage,
    version: PriceVersion,
    tier: ServiceTier | None = None,
    status: RequestStatus = RequestStatus.COMPLETED,
) -> Charge:
    """Price one request. Raises ``Unpriced`` when a used class has no price in ``version``
    (at ``tier``, when given and not standard)."""
    if tier is None or tier is ServiceTier.STANDARD:
        rates = version.unit_rates
        sheet = ""
    else:
        found = version.tier_rates.get(tier)
        if found is None:
            raise Unpriced(
                f"{version.label()} has no {tier.value} tier prices", field="$.service_tier"
            )
        rates, sheet = found, f" in the {tier.value} tier"
    counts = quantities(usage, 1 if request_fee_applies(status) else 0)
    amounts = list(_ZEROS)
    total = ZERO
    for index, quantity in enumerate(counts):
        if not quantity:
            continue  # most classes of most requests: nothing to price
        rate = rates[index]
        if rate is None:
            if index == _REQUEST:
                continue  # no per-request fee in this version
            billable = CLASS_ORDER[index]
            raise Unpriced(
                f"{version.label()} has no price for {billable.value}{sheet}",
                field=f"$.usage.{billable.value}",
            )
        amount = amounts[index] = _multiply(rate, quantity)
        total = _add(total, amount)
    return Charge(counts, tuple(amounts), total)
