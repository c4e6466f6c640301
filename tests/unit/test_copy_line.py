"""The hand-written COPY line carries exactly the values of ``staging_row``."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.catalog import DEFAULT_CATALOG, Catalog, read_catalog_file
from billing.events import Usage, UsageEvent
from billing.synthetic import TrafficShape, generate
from billing.usage import copy_line, price_events, staging_row

CATALOG = Catalog.of(read_catalog_file(DEFAULT_CATALOG))


def reference(value: Any) -> str:
    """COPY text of one value, the slow generic way."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str):
        return value.replace("\\", "\\\\")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def test_copy_line_matches_staging_row_for_realistic_traffic() -> None:
    events = list(
        generate(
            CATALOG,
            TrafficShape(accounts=["a", "b\\c"]),
            3000,
            seed=3,
            now=datetime(2026, 11, 1, tzinfo=UTC),
            prefix="cl",
        )
    )
    priced, unpriced = price_events(events, CATALOG)
    assert priced and not unpriced
    assert any(p.event.byok for p in priced) and any(p.event.account_id == "b\\c" for p in priced)
    for p in priced:
        fields = copy_line(p, 42).rstrip("\n").split("\t")
        assert fields == [reference(v) for v in staging_row(p, 42)]
        assert Decimal(fields[22]) == p.charge.total  # amount, exact


def test_copy_line_for_a_free_and_a_byok_event() -> None:
    free = UsageEvent(
        schema="usage.v1",
        event_id="e",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        account_id="a",
        api_key_id="k",
        model="openai/o4-mini",
        provider="openai",
        byok=False,
        usage=Usage(),
    )
    [p], _ = price_events([free], CATALOG)
    assert copy_line(p, 1).split("\t")[24] == "\\N"  # nothing charged: no posting
