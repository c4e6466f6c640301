"""Service tiers in the catalog: explicit sheets, parsed strictly, priced only from their sheet."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog import BillableClass, Catalog, parse_catalog
from billing.errors import CatalogError, Unpriced
from billing.events import Usage
from billing.pricing import price
from billing.request_status import RequestStatus
from billing.service_tier import ServiceTier

TIERED = """
[[version]]
model = "m/x"
provider = "p"
effective_from = 2026-01-01T00:00:00Z
source = "test"
[version.prices]
input_tokens = { usd = 2.00, per = 1_000_000 }
output_tokens = { usd = 8.00, per = 1_000_000 }
request = { usd = 0.01, per = 1 }
[version.tiers.batch]
input_tokens = { usd = 1.00, per = 1_000_000 }
output_tokens = { usd = 4.00, per = 1_000_000 }
request = { usd = 0.005, per = 1 }
[version.tiers.priority]
input_tokens = { usd = 3.50, per = 1_000_000 }
output_tokens = { usd = 14.00, per = 1_000_000 }
request = { usd = 0.01, per = 1 }
"""
[VERSION] = parse_catalog(TIERED)


def test_tier_sheets_are_parsed_exactly() -> None:
    assert set(VERSION.tiers) == {ServiceTier.BATCH, ServiceTier.PRIORITY}
    assert VERSION.tiers[ServiceTier.BATCH][BillableClass.INPUT].unit_price == Decimal("1.00")
    assert set(VERSION.sheets()) == {ServiceTier.STANDARD, ServiceTier.BATCH, ServiceTier.PRIORITY}


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        # 1M x 2/M + 100k x 8/M + 0.01 = 2.81
        (None, "2.81"),
        (ServiceTier.STANDARD, "2.81"),
        # 1M x 1/M + 100k x 4/M + 0.005 = 1.405
        (ServiceTier.BATCH, "1.405"),
        # 1M x 3.5/M + 100k x 14/M + 0.01 = 4.91
        (ServiceTier.PRIORITY, "4.91"),
    ],
)
def test_each_tier_is_priced_from_its_own_sheet(tier: ServiceTier | None, expected: str) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    assert price(usage, VERSION, tier).total == Decimal(expected)


def test_a_tier_without_a_sheet_is_unpriced_not_standard() -> None:
    with pytest.raises(Unpriced) as info:
        price(Usage(input_tokens=1), VERSION, ServiceTier.FLEX)
    assert info.value.field == "$.service_tier"


def test_a_failed_request_pays_no_request_fee_in_any_tier() -> None:
    usage = Usage(input_tokens=1_000_000)
    assert price(usage, VERSION, ServiceTier.BATCH, RequestStatus.FAILED).total == Decimal("1")
    assert price(usage, VERSION, None, RequestStatus.CANCELLED).total == Decimal("2.01")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TIERED.replace("tiers.priority", "tiers.turbo"), "tiers.turbo: unknown tier"),
        (TIERED.replace("tiers.priority", "tiers.standard"), "the standard sheet is `prices`"),
        (
            TIERED.replace("request = { usd = 0.005, per = 1 }\n", ""),
            r"tiers.batch.request: required",
        ),
        (TIERED.replace("usd = 1.00", "usd = 0.0000001"), r"tiers.batch.input_tokens: .*exact"),
        (
            TIERED.replace("[version.tiers.batch]\ninput", "[version.tiers.batch]\ninputs"),
            "unknown class",
        ),
    ],
)
def test_malformed_tier_sheets_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(text)


counts = st.integers(0, 10**9)


@given(inp=counts, out=counts)
def test_property_batch_never_costs_more_than_standard_here(inp: int, out: int) -> None:
    # (true of this sheet, whose batch prices are all lower: a tier is data, not a formula)
    usage = Usage(input_tokens=inp, output_tokens=out)
    assert price(usage, VERSION, ServiceTier.BATCH).total <= price(usage, VERSION).total


def test_versions_without_tiers_are_unchanged() -> None:
    catalog = Catalog.of(parse_catalog(TIERED.split("[version.tiers.batch]")[0]))
    version = catalog.in_force("m/x", "p", datetime(2026, 2, 1, tzinfo=UTC))
    assert version is not None and not version.tiers
    assert price(Usage(input_tokens=1_000_000), version).total == Decimal("2.01")
