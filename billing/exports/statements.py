"""The statement of one account for one period, computed in SQL from the ledger.

* **Period**: a calendar month in the account's time zone (``accounts.time_zone``, NULL = UTC),
  ``[first day 00:00, first day of the next month 00:00)``.
* **Balances**: opening = the sum of the wallet's ledger entries before the period start;
  closing = before its end. Movements are the wallet's entries in between, joined to their
  postings (kind, memo, actor, reference).
* **Usage belongs to the period in which it was debited**: a batch debits its events when it
  commits, and ``usage_events.recorded_at`` is that posting's time. So an event that occurred on
  31 October but was recorded on 1 November is on November's statement (counted in
  ``late_events``). Assigning by ledger time is what makes the statement reconcile exactly:
  the usage lines sum to the usage debits posted in the period, which ``build_statement`` checks.
* **Exactness**: opening + credits - debits = closing holds on the exact decimals. Printed cents
  come from ``CentsAllocator`` run over the statement's lines in print order, starting with the
  opening balance, so every printed line, subtotal and the closing balance add up to the cent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from billing.db import Queries
from billing.errors import BillingError, UnknownAccount
from billing.money import EXACT, ZERO, CentsAllocator, sum_exact

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


class ReconciliationError(BillingError):
    """A statement does not add up: the ledger and the usage behind it disagree."""


@dataclass(frozen=True, order=True)
class Period:
    """A calendar month, e.g. ``2026-10``; its bounds depend on the account's time zone."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD.match(text.strip())
        if not match:
            raise BillingError(f"a period is YYYY-MM, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, when: datetime) -> Period:
        return cls(when.year, when.month)

    def next(self) -> Period:
        return Period(self.year + self.month // 12, self.month % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def params(self, account: str | None = None) -> dict[str, Any]:
        end = self.next()
        return {
            "year": self.year,
            "month": self.month,
            "end_year": end.year,
            "end_month": end.month,
            "account": account,
        }


class Section(StrEnum):
    """Statement sections, in print order."""

    OPENING = "opening"
    TOPUPS = "topups"
    GRANTS = "grants"  # promotional credit granted and expired (kept apart from paid credit)
    REFUNDS_DISPUTES = "refunds_disputes"
    ADJUSTMENTS = "adjustments"
    OTHER = "other"
    USAGE = "usage"
    CLOSING = "closing"
    BYOK = "byok"


_SECTION_OF_KIND = {
    "topup": Section.TOPUPS,
    "topup_refund": Section.REFUNDS_DISPUTES,
    "dispute_hold": Section.REFUNDS_DISPUTES,
    "dispute_release": Section.REFUNDS_DISPUTES,
    "dispute_loss": Section.REFUNDS_DISPUTES,
    "adjustment": Section.ADJUSTMENTS,
    "grant": Section.GRANTS,
    "grant_expiry": Section.GRANTS,
}
MOVEMENT_SECTIONS = (
    Section.TOPUPS,
    Section.GRANTS,
    Section.REFUNDS_DISPUTES,
    Section.ADJUSTMENTS,
    Section.OTHER,
)


_CARD_KINDS = frozenset({"topup", "topup_refund"})


@dataclass(frozen=True)
class Movement:
    """One wallet ledger entry other than usage: a top-up, refund, dispute or adjustment.

    ``amount`` is what the wallet moved (+ credit, - debit). ``fee`` is the platform fee the same
    posting moved (positive on a top-up, negative when a refund returns it), so for a top-up the
    card paid ``amount + fee``.
    """

    posting_id: int
    kind: str
    created_at: datetime
    amount: Decimal
    fee: Decimal
    reference: str | None
    memo: str | None
    actor: str | None

    @property
    def section(self) -> Section:
        return _SECTION_OF_KIND.get(self.kind, Section.OTHER)

    @property
    def by_card(self) -> bool:
        """A card payment or its return: its fee and charged columns are printed, 0 included (a
        refund too small to return any fee, or a top-up at a 0% fee rate, still moved money)."""
        return self.kind in _CARD_KINDS or bool(self.fee)

    @property
    def charged(self) -> Decimal:
        """Money paid (or returned, negative) by card: wallet credit plus platform fee."""
        return EXACT.add(self.amount, self.fee) if self.fee else self.amount

    def description(self) -> str:
        label = {
            "topup": "Top-up",
            "topup_refund": "Top-up refund",
            "dispute_hold": "Dispute hold",
            "dispute_release": "Dispute released",
            "dispute_loss": "Dispute lost",
            "adjustment": "Adjustment",
            "grant": "Credit grant",
            "grant_expiry": "Granted credit expired",
        }.get(self.kind, self.kind)
        detail = self.memo or self.reference
        return f"{label}: {detail}" if detail else label


@dataclass(frozen=True)
class UsageLine:
    """Usage of one billable class at one price version of one (model, provider)."""

    model: str
    provider: str
    byok: bool
    price_effective_from: datetime
    billable_class: str
    quantity: int
    amount: Decimal  # charged, or the notional provider cost for BYOK
    unit_price: Decimal | None  # USD per ``per`` units, of the version applied
    per: int | None
    events: int
    member: str | None = None  # a member account whose usage this organisation paid

    def description(self) -> str:
        who = f"{self.member}: " if self.member else ""
        return f"{who}{self.model} via {self.provider}: {self.billable_class}"


@dataclass(frozen=True)
class PrintedLine:
    """A line as printed: its section, the exact amount and its allocated cents."""

    section: Section
    description: str
    amount: Decimal
    cents: int
    movement: Movement | None = None
    usage: UsageLine | None = None


@dataclass(frozen=True)
class Statement:
    account_id: str
    account_name: str | None
    period: Period
    time_zone: str
    period_start: datetime
    period_end: datetime
    opening: Decimal
    closing: Decimal
    movements: tuple[Movement, ...]
    usage: tuple[UsageLine, ...]
    byok: tuple[UsageLine, ...]
    late_events: int = 0
    late_amount: Decimal = ZERO
    granted_closing: Decimal = ZERO  # of the closing balance, promotional credit (grants)
    usage_from_grants: Decimal = ZERO  # of the period's usage, what granted credit paid

    @property
    def paid_closing(self) -> Decimal:
        """Of the closing balance, paid credit (negative if refunds took back spent credit)."""
        return EXACT.subtract(self.closing, self.granted_closing)

    @property
    def usage_total(self) -> Decimal:
        return sum_exact(line.amount for line in self.usage)

    @property
    def byok_notional(self) -> Decimal:
        return sum_exact(line.amount for line in self.byok)

    @property
    def usage_events(self) -> int:
        return _events(self.usage)

    @property
    def byok_events(self) -> int:
        return _events(self.byok)

    @property
    def credits(self) -> Decimal:
        return sum_exact(m.amount for m in self.movements if m.amount > 0)

    @property
    def debits(self) -> Decimal:
        """Positive: usage plus every movement that took money out of the wallet."""
        out = sum_exact(-m.amount for m in self.movements if m.amount < 0)
        return EXACT.add(out, self.usage_total)

    @property
    def fees(self) -> Decimal:
        return sum_exact(m.fee for m in self.movements)

    def printed(self) -> tuple[PrintedLine, ...]:
        return self._printed

    @cached_property
    def _printed(self) -> tuple[PrintedLine, ...]:
        """Opening, movements by section, usage (negative), closing: cents carried in order.

        The closing line's cents equal the sum of every printed line above it, and equal
        ``to_cents(closing)``. BYOK lines follow with their own allocation (they are notional).
        """
        alloc = CentsAllocator()
        lines = [
            PrintedLine(Section.OPENING, "Opening balance", self.opening, alloc.line(self.opening))
        ]
        for section in MOVEMENT_SECTIONS:
            for m in self.movements:
                if m.section is section:
                    lines.append(
                        PrintedLine(section, m.description(), m.amount, alloc.line(m.amount), m)
                    )
        for u in self.usage:
            lines.append(
                PrintedLine(
                    Section.USAGE, u.description(), -u.amount, alloc.line(-u.amount), usage=u
                )
            )
        lines.append(
            PrintedLine(Section.CLOSING, "Closing balance", self.closing, alloc.total_cents)
        )
        byok = CentsAllocator()
        for u in self.byok:
            lines.append(
                PrintedLine(Section.BYOK, u.description(), u.amount, byok.line(u.amount), usage=u)
            )
        return tuple(lines)

    def section_cents(self, section: Section) -> int:
        """The sum of the section's printed lines (closing and opening: the line itself)."""
        return self._section_cents.get(section, 0)

    @cached_property
    def _section_cents(self) -> dict[Section, int]:
        totals: dict[Section, int] = {}
        for line in self.printed():
            totals[line.section] = totals.get(line.section, 0) + line.cents
        return totals

    def check(self) -> None:
        """opening + credits - debits = closing, exactly; raise otherwise."""
        computed = EXACT.subtract(EXACT.add(self.opening, self.credits), self.debits)
        if computed != self.closing:
            raise ReconciliationError(
                f"{self.account_id} {self.period}: opening {self.opening} + credits "
                f"{self.credits} - debits {self.debits} = {computed}, ledger closing is "
                f"{self.closing}"
            )


def _events(lines: tuple[UsageLine, ...]) -> int:
    seen: dict[tuple[str | None, str, str, datetime], int] = {}
    for line in lines:
        seen[(line.member, line.model, line.provider, line.price_effective_from)] = line.events
    return sum(seen.values())


def build_statement(
    period: Period,
    account: dict[str, Any],
    movements: list[dict[str, Any]],
    usage: list[dict[str, Any]],
) -> Statement:
    """Assemble one account's statement from its rows of the three statement queries."""
    lines = [
        UsageLine(
            model=r["model"],
            provider=r["provider"],
            byok=r["byok"],
            price_effective_from=r["price_effective_from"],
            billable_class=r["billable_class"],
            quantity=int(r["quantity"]),
            amount=r["amount"],
            unit_price=r["unit_price"],
            per=None if r["per"] is None else int(r["per"]),
            events=int(r["events"]),
            member=r.get("member"),
        )
        for r in usage
    ]
    late: dict[tuple[str | None, str, str, bool, datetime], tuple[int, Decimal]] = {}
    for r in usage:
        key = (r.get("member"), r["model"], r["provider"], r["byok"], r["price_effective_from"])
        late[key] = (int(r["late_events"]), r["late_amount"] if not r["byok"] else ZERO)
    statement = Statement(
        account_id=account["account_id"],
        account_name=account["name"],
        period=period,
        time_zone=account["time_zone"],
        period_start=account["period_start"],
        period_end=account["period_end"],
        opening=account["opening"],
        closing=account["closing"],
        movements=tuple(
            Movement(
                posting_id=int(m["posting_id"]),
                kind=m["kind"],
                created_at=m["created_at"],
                amount=m["amount"],
                fee=m["fee"],
                reference=m["reference"],
                memo=m["memo"],
                actor=m["actor"],
            )
            for m in movements
        ),
        usage=tuple(line for line in lines if not line.byok),
        byok=tuple(line for line in lines if line.byok),
        late_events=sum(n for n, _ in late.values()),
        late_amount=sum_exact(a for _, a in late.values()),
        granted_closing=account.get("granted_closing", ZERO),
        usage_from_grants=account.get("usage_from_grants", ZERO),
    )
    ledger_usage = EXACT.minus(account["usage_ledger"])
    if statement.usage_total != ledger_usage:
        raise ReconciliationError(
            f"{statement.account_id} {period}: usage lines total {statement.usage_total} but the "
            f"ledger debited {ledger_usage} for usage in the period (run `billing audit`)"
        )
    statement.check()
    return statement


def _stream(conn: psycopg.Connection[Any], query: Any, params: dict[str, Any], name: str) -> Any:
    from psycopg.rows import dict_row

    cur = conn.cursor(name=name, row_factory=dict_row)
    cur.itersize = 2000
    cur.execute(query, params)
    return cur


def iter_statements(
    conn: psycopg.Connection[Any], q: Queries, period: Period, account: str | None = None
) -> Iterator[Statement]:
    """Every account's statement (or one account's), streamed in account order.

    Three server-side cursors (balances, movements, usage lines) ordered by account are merged
    account by account, so memory holds one account's lines whatever the number of events. Call
    inside a transaction (REPEATABLE READ READ ONLY gives one consistent snapshot).
    """
    params = period.params(account)
    accounts = _stream(conn, q["statement_accounts"], params, "stmt_accounts")
    movements = _Peek(_stream(conn, q["statement_movements"], params, "stmt_movements"))
    usage = _Peek(_stream(conn, q["statement_usage"], params, "stmt_usage"))
    try:
        for row in accounts:
            account_id = row["account_id"]
            yield build_statement(period, row, movements.take(account_id), usage.take(account_id))
    finally:
        for cursor in (accounts, movements.cursor, usage.cursor):
            cursor.close()


class _Peek:
    """A cursor with one row of look-ahead, to take the rows of one account at a time."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self._iter = iter(cursor)
        self._next: dict[str, Any] | None = next(self._iter, None)

    def take(self, account_id: str) -> list[dict[str, Any]]:
        rows = []
        while self._next is not None and self._next["account_id"] == account_id:
            rows.append(self._next)
            self._next = next(self._iter, None)
        return rows


def statement_for(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, period: Period
) -> Statement:
    """One account's statement, in one consistent snapshot: its own REPEATABLE READ READ ONLY
    transaction, or the caller's (whose isolation is the caller's choice)."""
    owned = conn.info.transaction_status == TransactionStatus.IDLE
    with conn.transaction():
        if owned:  # else three cursors could see a batch that commits between them
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        found = list(iter_statements(conn, q, period, account_id))
    if not found:
        raise UnknownAccount(f"no account {account_id!r}")
    return found[0]


def set_time_zone(
    conn: psycopg.Connection[Any], q: Queries, account_id: str, time_zone: str | None
) -> None:
    """Set the zone an account's periods are cut in (None = UTC): a zone of pg_timezone_names
    that PostgreSQL does not also read as a fixed-offset abbreviation (CET: migration 0014).

    Refused once a usage statement was issued in another zone: the month after it would be cut
    in the new zone, and the hours between the two zones' month boundaries would fall in no
    statement (or in two), so an issued closing balance would no longer open the next one.
    """
    if time_zone is not None:
        row = conn.execute(q["time_zone_problem"], {"time_zone": time_zone}).fetchone()
        if row is not None and row[0] is not None:
            raise BillingError(str(row[0]))
    with conn.transaction():
        current = conn.execute(
            q["account_time_zone_for_update"], {"account_id": account_id}
        ).fetchone()
        if current is None:
            raise UnknownAccount(f"no account {account_id!r}")
        zone = current[0]
        issued = conn.execute(q["last_issued_statement"], {"account_id": account_id}).fetchone()
        last_issued = issued[0] if issued is not None else None
        if last_issued is not None and zone != (time_zone or "UTC"):
            raise BillingError(
                f"{account_id}: statements were issued in {zone} (the last for {last_issued}); "
                "its periods cannot move to another zone without a gap or an overlap between "
                "issued statements"
            )
        conn.execute(q["set_account_time_zone"], {"account_id": account_id, "time_zone": time_zone})
