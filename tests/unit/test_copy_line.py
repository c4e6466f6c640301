"""The hand-written COPY line carries exactly the values of ``staging_row``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from billing.catalog import DEFAULT_CATALOG, Catalog, read_catalog_file
from billing.events import Usage, UsageEvent
from billing.synthetic import TrafficShape, generate
from billing.usage import copy_line, price_events, staging_row

CATALOG = Catalog.of(read_catalog_file(DEFAULT_CATALOG))


def reference(value: Any) -> str | datetime:
    """COPY text of one value, the slow generic way (a timestamp: its value, compared parsed)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str):
        return value.replace("\\", "\\\\")
    if isinstance(value, datetime):
        return value
    return str(value)


def as_written(text: str, value: Any) -> str | datetime:
    """A timestamp field parsed (ISO 8601 with an offset: ``Z`` or ``+00:00``), else its text."""
    if isinstance(value, datetime):
        parsed = datetime.fromisoformat(text)
        assert parsed.utcoffset() is not None, text
        return parsed
    return text


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
        assert [as_written(f, v) for f, v in zip(fields, staging_row(p, 42), strict=True)] == [
            reference(v) for v in staging_row(p, 42)
        ]
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


def test_copy_line_keeps_the_offset_of_a_timestamp_and_its_microseconds() -> None:
    at = datetime(2026, 3, 1, 9, 30, 0, 120, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    event = UsageEvent(
        schema="usage.v1",
        event_id="e",
        occurred_at=at,
        account_id="a",
        api_key_id="k",
        model="openai/o4-mini",
        provider="openai",
        byok=False,
        usage=Usage(input_tokens=1),
    )
    [p], _ = price_events([event], CATALOG)
    written = copy_line(p, 1).split("\t")[1]
    assert written == "2026-03-01T09:30:00.000120+05:30"
    assert datetime.fromisoformat(written) == at
