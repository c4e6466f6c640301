"""The price catalog: versions of prices, loaded from files, never rewritten.

A *price version* is the complete price sheet of one (model, provider) from its
``effective_from`` onward: one ``PriceComponent`` per billable class it charges for. An event is
priced at the version in force at its ``occurred_at`` (the latest ``effective_from`` not after
it), whenever it is processed.

Loading appends. A version already loaded with the same prices is skipped; the same key with
different prices is refused (history is never rewritten). A new version for a (model, provider)
that already had versions before this load must take effect after the latest one and not in the
past, so events already debited can never be re-priced under them (a first import may carry a
model's whole price history); ``allow_backdate`` lifts the second rule for an
operator who knows no events exist in between.
"""

from __future__ import annotations

import bisect
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

import psycopg

from billing.db import Queries
from billing.errors import CatalogError
from billing.money import EXACT, SCALE, exact, is_exact_at_scale
from billing.service_tier import ServiceTier


class BillableClass(StrEnum):
    """What a request is charged for. Token classes are disjoint (see ``events.Usage``)."""

    INPUT = "input_tokens"
    CACHED_INPUT = "cached_input_tokens"
    CACHE_WRITE = "cache_write_tokens"
    OUTPUT = "output_tokens"
    IMAGE = "image_count"
    WEB_SEARCH = "web_search_count"
    REQUEST = "request"
    # Added with provider usage adapters (usage.v1.1); appended so existing positions stay put.
    CACHE_WRITE_1H = "cache_write_1h_tokens"
    AUDIO_INPUT = "audio_input_tokens"
    AUDIO_OUTPUT = "audio_output_tokens"


CLASS_ORDER: tuple[BillableClass, ...] = tuple(BillableClass)
ALLOWED_PER = (1, 1_000, 1_000_000)
DEFAULT_CATALOG = Path(__file__).resolve().parent / "data" / "catalog.toml"


@dataclass(frozen=True)
class PriceComponent:
    """``unit_price`` USD per ``per`` units (per 1M tokens, per 1K images, per 1 request)."""

    unit_price: Decimal
    per: int

    def __post_init__(self) -> None:
        if self.per not in ALLOWED_PER:
            raise CatalogError(f"per must be one of {ALLOWED_PER}, got {self.per}")
        if self.unit_price < 0:
            raise CatalogError(f"price must not be negative, got {self.unit_price}")
        if not is_exact_at_scale(self.per_unit):
            raise CatalogError(
                f"{self.unit_price} per {self.per} is not exact at {SCALE} decimals per unit"
            )

    @property
    def per_unit(self) -> Decimal:
        return EXACT.divide(self.unit_price, Decimal(self.per))


@dataclass(frozen=True)
class PriceVersion:
    model: str
    provider: str
    effective_from: datetime
    prices: Mapping[BillableClass, PriceComponent]
    source: str = ""
    # Non-standard service tiers this version prices explicitly (``prices`` is the standard one).
    tiers: Mapping[ServiceTier, Mapping[BillableClass, PriceComponent]] = field(
        default_factory=dict
    )

    @property
    def key(self) -> tuple[str, str, datetime]:
        return (self.model, self.provider, self.effective_from)

    @cached_property
    def effective_from_text(self) -> str:
        """``effective_from`` in ISO 8601, formatted once (written with every priced event)."""
        return self.effective_from.isoformat()

    @cached_property
    def unit_rates(self) -> tuple[Decimal | None, ...]:
        """USD per single unit of each class in ``CLASS_ORDER`` (None: not priced).

        Computed once per version, so pricing an event is a few exact multiplications.
        """
        return _rates(self.prices)

    @cached_property
    def tier_rates(self) -> Mapping[ServiceTier, tuple[Decimal | None, ...]]:
        """``unit_rates`` of each service tier this version prices (standard included)."""
        rates = {tier: _rates(sheet) for tier, sheet in self.tiers.items()}
        rates[ServiceTier.STANDARD] = self.unit_rates
        return rates

    def sheets(self) -> dict[ServiceTier, Mapping[BillableClass, PriceComponent]]:
        """Every price sheet of this version by tier, the standard one first."""
        return {ServiceTier.STANDARD: self.prices, **self.tiers}

    def label(self) -> str:
        return f"{self.model}@{self.provider} from {self.effective_from.isoformat()}"


def _rates(sheet: Mapping[BillableClass, PriceComponent]) -> tuple[Decimal | None, ...]:
    return tuple(sheet[c].per_unit if c in sheet else None for c in CLASS_ORDER)


@dataclass
class Catalog:
    """An in-memory snapshot: versions per (model, provider), sorted by ``effective_from``."""

    versions: dict[tuple[str, str], list[PriceVersion]] = field(default_factory=dict)
    revision: tuple[int, datetime | None] = (0, None)
    _starts: dict[tuple[str, str], list[datetime]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, versions: Iterable[PriceVersion]) -> Catalog:
        catalog = cls()
        for version in versions:
            catalog.versions.setdefault((version.model, version.provider), []).append(version)
        for history in catalog.versions.values():
            history.sort(key=lambda v: v.effective_from)
        return catalog

    def in_force(self, model: str, provider: str, at: datetime) -> PriceVersion | None:
        history = self.versions.get((model, provider))
        if not history:
            return None
        starts = self._starts.get((model, provider))
        if starts is None or len(starts) != len(history):
            starts = self._starts[(model, provider)] = [v.effective_from for v in history]
        index = bisect.bisect_right(starts, at)
        return history[index - 1] if index else None

    def all_versions(self) -> list[PriceVersion]:
        return [v for key in sorted(self.versions) for v in self.versions[key]]


def parse_catalog(text: str, origin: str = "<catalog>") -> list[PriceVersion]:
    """Parse the TOML catalog format (floats are read as exact Decimals, never as float)."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: {exc}") from None
    entries = doc.get("version")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{origin}: expected one or more [[version]] tables")
    versions = []
    for index, entry in enumerate(entries):
        where = f"{origin}: version[{index}]"
        versions.append(_parse_version(entry, where))
    keys = [v.key for v in versions]
    if len(set(keys)) != len(keys):
        raise CatalogError(f"{origin}: the same (model, provider, effective_from) appears twice")
    return versions


def _parse_version(entry: Any, where: str) -> PriceVersion:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a table")
    for name in ("model", "provider", "source"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise CatalogError(f"{where}.{name}: required text")
    effective_from = entry.get("effective_from")
    if not isinstance(effective_from, datetime) or effective_from.utcoffset() is None:
        raise CatalogError(f"{where}.effective_from: required date-time with a UTC offset")
    raw_prices = entry.get("prices")
    if not isinstance(raw_prices, dict) or not raw_prices:
        raise CatalogError(f"{where}.prices: required, with at least one billable class")
    prices = _parse_sheet(raw_prices, f"{where}.prices")
    tiers: dict[ServiceTier, dict[BillableClass, PriceComponent]] = {}
    raw_tiers = entry.get("tiers", {})
    if not isinstance(raw_tiers, dict):
        raise CatalogError(f"{where}.tiers: must be a table of tier price sheets")
    for tier_name, raw_sheet in raw_tiers.items():
        try:
            tier = ServiceTier(tier_name)
        except ValueError:
            allowed = ", ".join(t.value for t in ServiceTier if t is not ServiceTier.STANDARD)
            raise CatalogError(
                f"{where}.tiers.{tier_name}: unknown tier (one of {allowed})"
            ) from None
        if tier is ServiceTier.STANDARD:
            raise CatalogError(f"{where}.tiers.standard: the standard sheet is `prices`")
        if not isinstance(raw_sheet, dict) or not raw_sheet:
            raise CatalogError(f"{where}.tiers.{tier_name}: required, with at least one class")
        sheet = _parse_sheet(raw_sheet, f"{where}.tiers.{tier_name}")
        if BillableClass.REQUEST in prices and BillableClass.REQUEST not in sheet:
            # A missing request fee would silently waive it: a tier sheet must say it.
            raise CatalogError(f"{where}.tiers.{tier_name}.request: required (standard has one)")
        tiers[tier] = sheet
    return PriceVersion(
        model=entry["model"],
        provider=entry["provider"],
        effective_from=effective_from,
        prices=prices,
        source=entry["source"],
        tiers=tiers,
    )


def _parse_sheet(raw_prices: dict[str, Any], where: str) -> dict[BillableClass, PriceComponent]:
    prices: dict[BillableClass, PriceComponent] = {}
    for name, spec in raw_prices.items():
        try:
            billable = BillableClass(name)
        except ValueError:
            allowed = ", ".join(c.value for c in BillableClass)
            raise CatalogError(f"{where}.{name}: unknown class (one of {allowed})") from None
        if not isinstance(spec, dict) or set(spec) != {"usd", "per"}:
            raise CatalogError(f"{where}.{name}: expected {{ usd = ..., per = ... }}")
        usd, per = spec["usd"], spec["per"]
        if isinstance(usd, bool) or not isinstance(usd, (Decimal, int)):
            raise CatalogError(f"{where}.{name}.usd: must be a number")
        if isinstance(per, bool) or not isinstance(per, int):
            raise CatalogError(f"{where}.{name}.per: must be an integer")
        try:
            prices[billable] = PriceComponent(exact(usd), per)
        except (CatalogError, ValueError) as exc:
            raise CatalogError(f"{where}.{name}: {exc}") from None
    return prices


def read_catalog_file(path: Path) -> list[PriceVersion]:
    return parse_catalog(path.read_text(), str(path))


@dataclass(frozen=True)
class LoadResult:
    added: list[PriceVersion]
    unchanged: list[PriceVersion]


def load_versions(
    conn: psycopg.Connection[Any],
    q: Queries,
    versions: list[PriceVersion],
    *,
    now: datetime,
    loaded_by: str,
    allow_backdate: bool = False,
    max_clock_skew: timedelta = timedelta(0),
) -> LoadResult:
    """Append the new versions in one transaction; refuse anything that rewrites history.

    A new version must start after the latest one and no earlier than ``now`` plus
    ``max_clock_skew`` (``BILLING_MAX_CLOCK_SKEW_S``): events are accepted up to that far ahead,
    so one may already be priced, at the version before, in the minutes just after ``now``.
    """
    added: list[PriceVersion] = []
    unchanged: list[PriceVersion] = []
    with conn.transaction():
        conn.execute(q["lock_catalog"])
        existing = snapshot(conn, q)
        for version in sorted(versions, key=lambda v: v.key):
            history = existing.versions.get((version.model, version.provider), [])
            same = next((v for v in history if v.effective_from == version.effective_from), None)
            if same is not None:
                if _sheets_of(same) != _sheets_of(version):
                    raise CatalogError(
                        f"{version.label()} is already loaded with different prices; "
                        "history is never rewritten: load a new version with a later effective_from"
                    )
                unchanged.append(version)
                continue
            if history and not allow_backdate:
                latest = history[-1].effective_from
                earliest = now + max_clock_skew
                if version.effective_from <= latest or version.effective_from < earliest:
                    raise CatalogError(
                        f"{version.label()} would take effect before the latest version "
                        f"({latest.isoformat()}) or in the past (before {earliest.isoformat()}: "
                        f"now plus the {max_clock_skew} events may run ahead); events may already "
                        "be priced in that period (use allow_backdate / --allow-backdate if none "
                        "are)"
                    )
            with conn.cursor() as cur:
                cur.executemany(
                    q["insert_price"],
                    [
                        {
                            "model": version.model,
                            "provider": version.provider,
                            "effective_from": version.effective_from,
                            "service_tier": tier.value,
                            "billable_class": billable.value,
                            "unit_price": component.unit_price,
                            "per": component.per,
                            "source": version.source,
                            "loaded_by": loaded_by,
                        }
                        for tier, sheet in version.sheets().items()
                        for billable, component in sorted(sheet.items())
                    ],
                )
            added.append(version)
    return LoadResult(added, unchanged)


def _sheets_of(version: PriceVersion) -> dict[ServiceTier, dict[BillableClass, PriceComponent]]:
    return {tier: dict(sheet) for tier, sheet in version.sheets().items()}


def revision(conn: psycopg.Connection[Any], q: Queries) -> tuple[int, datetime | None]:
    row = conn.execute(q["catalog_revision"]).fetchone()
    assert row is not None
    return (int(row[0]), row[1])


def snapshot(conn: psycopg.Connection[Any], q: Queries) -> Catalog:
    """The whole catalog in memory (it is small: a row per model, provider, version and class)."""
    Sheets = dict[ServiceTier, dict[BillableClass, PriceComponent]]
    grouped: dict[tuple[str, str, datetime], tuple[str, Sheets]] = {}
    for model, provider, effective_from, tier, billable, unit_price, per, source in conn.execute(
        q["select_prices"]
    ):
        _, sheets = grouped.setdefault((model, provider, effective_from), (source, {}))
        sheet = sheets.setdefault(ServiceTier(tier), {})
        sheet[BillableClass(billable)] = PriceComponent(exact(unit_price), int(per))
    catalog = Catalog.of(
        PriceVersion(
            m,
            p,
            t,
            sheets.pop(ServiceTier.STANDARD, {}),
            source,
            tiers=sheets,
        )
        for (m, p, t), (source, sheets) in grouped.items()
    )
    catalog.revision = revision(conn, q)
    return catalog


class CatalogCache:
    """Keeps a snapshot and rebuilds it only when the catalog's revision changes."""

    def __init__(self, q: Queries) -> None:
        self._q = q
        self._catalog: Catalog | None = None

    def current(self, conn: psycopg.Connection[Any]) -> Catalog:
        if self._catalog is None or revision(conn, self._q) != self._catalog.revision:
            self._catalog = snapshot(conn, self._q)
        return self._catalog
