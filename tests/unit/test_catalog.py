from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.catalog import (
    DEFAULT_CATALOG,
    BillableClass,
    Catalog,
    parse_catalog,
    read_catalog_file,
)
from billing.errors import CatalogError


def test_default_catalog_has_o4_mini_on_openai_and_azure_at_list_price() -> None:
    catalog = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
    for provider in ("openai", "azure"):
        version = catalog.in_force("openai/o4-mini", provider, datetime(2026, 11, 1, tzinfo=UTC))
        assert version is not None
        prices = {c: (p.unit_price, p.per) for c, p in version.prices.items()}
        assert prices[BillableClass.INPUT] == (Decimal("1.10"), 1_000_000)
        assert prices[BillableClass.CACHED_INPUT] == (Decimal("0.275"), 1_000_000)
        assert prices[BillableClass.OUTPUT] == (Decimal("4.40"), 1_000_000)
        assert prices[BillableClass.IMAGE] == (Decimal("0.842"), 1_000)
    assert len({v.model for v in catalog.all_versions()}) >= 13


TWO_VERSIONS = """
[[version]]
model = "m/x"
provider = "p"
effective_from = 2026-01-01T00:00:00Z
source = "test"
[version.prices]
input_tokens = { usd = 1.00, per = 1_000_000 }

[[version]]
model = "m/x"
provider = "p"
effective_from = 2026-06-01T00:00:00Z
source = "test"
[version.prices]
input_tokens = { usd = 0.50, per = 1_000_000 }
"""


def test_the_version_in_force_is_the_latest_not_after_the_time() -> None:
    catalog = Catalog.of(parse_catalog(TWO_VERSIONS))
    at = lambda *args: catalog.in_force("m/x", "p", datetime(*args, tzinfo=UTC))  # noqa: E731
    assert at(2025, 12, 31) is None
    assert at(2026, 1, 1).prices[BillableClass.INPUT].unit_price == Decimal("1.00")  # type: ignore[union-attr]
    assert at(2026, 5, 31, 23, 59).prices[BillableClass.INPUT].unit_price == Decimal("1.00")  # type: ignore[union-attr]
    assert at(2026, 6, 1).prices[BillableClass.INPUT].unit_price == Decimal("0.50")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[version]]\nmodel='a'", r"version\[0\]\.provider"),
        (TWO_VERSIONS.replace("input_tokens", "inputs", 1), "prices.inputs: unknown class"),
        (TWO_VERSIONS.replace("per = 1_000_000", "per = 7", 1), "per must be one of"),
        (TWO_VERSIONS.replace("usd = 1.00", "usd = 0.0000001", 1), "not exact at 12 decimals"),
        (TWO_VERSIONS.replace("usd = 1.00", 'usd = "1.00"', 1), "usd: must be a number"),
        (TWO_VERSIONS.replace("2026-06-01T00:00:00Z", "2026-01-01T00:00:00Z"), "appears twice"),
        (TWO_VERSIONS.replace("2026-01-01T00:00:00Z", "2026-01-01T00:00:00"), "effective_from"),
    ],
)
def test_malformed_catalogs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(text)


def test_prices_are_read_as_exact_decimals_never_float() -> None:
    [version, _] = parse_catalog(TWO_VERSIONS.replace("usd = 1.00", "usd = 0.1", 1))
    assert version.prices[BillableClass.INPUT].unit_price == Decimal("0.1")
