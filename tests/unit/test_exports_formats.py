"""Pure tests of statements and their formats: rounding carried to the cent, reproducible bytes."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import openpyxl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import BillingError
from billing.exports.formats import (
    LINE_COLUMNS,
    InvoiceHeader,
    Receipt,
    csv_bytes,
    line_records,
    normalize_zip,
    parquet_bytes,
    receipt_html,
    safe_name,
    statement_bytes,
    statement_html,
    summary_record,
)
from billing.exports.statements import (
    Movement,
    Period,
    ReconciliationError,
    Section,
    Statement,
    UsageLine,
)
from billing.money import EXACT, sum_exact, to_cents

T0 = datetime(2026, 10, 1, tzinfo=UTC)
T1 = datetime(2026, 11, 1, tzinfo=UTC)
V1 = datetime(2025, 4, 16, tzinfo=UTC)
V2 = datetime(2026, 10, 15, tzinfo=UTC)


def movement(kind: str, amount: str, fee: str = "0", memo: str | None = None) -> Movement:
    return Movement(1, kind, T0, Decimal(amount), Decimal(fee), None, memo, "tests")


def usage(amount: str, quantity: int = 1, byok: bool = False, version: datetime = V1) -> UsageLine:
    return UsageLine(
        "openai/o4-mini", "openai", byok, version, "input_tokens", quantity, Decimal(amount),
        Decimal("1.1"), 1_000_000, 1,
    )  # fmt: skip


def statement(
    opening: str, movements: list[Movement], lines: list[UsageLine], byok: Sequence[UsageLine] = ()
) -> Statement:
    closing = EXACT.subtract(
        EXACT.add(Decimal(opening), sum_exact(m.amount for m in movements)),
        sum_exact(u.amount for u in lines),
    )
    return Statement(
        "acme", "Acme", Period(2026, 10), "UTC", T0, T1, Decimal(opening), closing,
        tuple(movements), tuple(lines), tuple(byok),
    )  # fmt: skip


def sample() -> Statement:
    return statement(
        "7.775",
        [
            movement("topup", "100", "5"),
            movement("topup_refund", "-20", "-1"),
            movement("adjustment", "-1.234567891234", memo="goodwill"),
        ],
        [usage("0.004444444444"), usage("0.004444444444", version=V2), usage("1.005")],
        [usage("0.333333333333", byok=True)],
    )


def test_period_parse_and_next() -> None:
    assert Period.parse("2026-10") == Period(2026, 10)
    assert str(Period(2026, 12).next()) == "2027-01"
    assert Period(2026, 1).params("a") == {
        "year": 2026,
        "month": 1,
        "end_year": 2026,
        "end_month": 2,
        "account": "a",
    }
    for bad in ("2026-13", "2026-1", "26-10", "2026/10", ""):
        with pytest.raises(BillingError):
            Period.parse(bad)


def test_sections_and_printed_cents_add_up_to_the_closing_balance() -> None:
    s = sample()
    s.check()
    printed = s.printed()
    assert printed[0].section is Section.OPENING
    assert printed[-2].section is Section.CLOSING and printed[-1].section is Section.BYOK
    body = [p for p in printed if p.section not in (Section.CLOSING, Section.BYOK)]
    assert sum(p.cents for p in body) == to_cents(s.closing) == s.section_cents(Section.CLOSING)
    # opening 7.775 rounds half-even to 7.78; the carried remainder keeps the total right
    assert printed[0].cents == 778
    assert s.section_cents(Section.TOPUPS) == 10_000
    assert s.section_cents(Section.REFUNDS_DISPUTES) == -2_000
    assert s.credits == Decimal("100")
    assert s.fees == Decimal("4")
    assert s.debits == EXACT.add(Decimal("21.234567891234"), s.usage_total)


def test_check_refuses_a_statement_that_does_not_add_up() -> None:
    s = sample()
    broken = replace(s, closing=s.closing + Decimal("0.000000000001"))
    with pytest.raises(ReconciliationError):
        broken.check()


amounts = st.decimals(min_value=-500, max_value=500, places=12, allow_nan=False)


@settings(max_examples=200)
@given(
    st.decimals(min_value=-100, max_value=100, places=12, allow_nan=False),
    st.lists(amounts, max_size=8),
    st.lists(st.decimals(min_value=0, max_value=50, places=12, allow_nan=False), max_size=12),
)
def test_printed_lines_always_sum_to_the_printed_closing(
    opening: Decimal, moves: list[Decimal], lines: list[Decimal]
) -> None:
    s = statement(
        str(opening),
        [movement("adjustment" if i % 2 else "topup", str(m)) for i, m in enumerate(moves)],
        [usage(str(u)) for u in lines],
    )
    s.check()
    body = [p for p in s.printed() if p.section not in (Section.CLOSING, Section.BYOK)]
    assert sum(p.cents for p in body) == to_cents(s.closing)
    summary = summary_record(s)
    parts = ("opening", "topups", "grants", "refunds_disputes", "adjustments", "other", "usage")
    assert sum(summary[p] for p in parts) == summary["closing"]


def test_line_records_carry_fee_and_charged_for_topups() -> None:
    records = line_records(sample())
    topup = next(r for r in records if r["kind"] == "topup")
    assert (topup["amount"], topup["fee"], topup["charged"]) == (10_000, 500, 10_500)
    refund = next(r for r in records if r["kind"] == "topup_refund")
    assert (refund["amount"], refund["fee"], refund["charged"]) == (-2_000, -100, -2_100)
    byok = [r for r in records if r["section"] == "byok"]
    assert len(byok) == 1 and byok[0]["amount_exact"] == Decimal("0.333333333333")
    assert (byok[0]["charged"], byok[0]["fee"]) == (0, 0)


def test_a_card_movement_without_a_fee_still_shows_what_the_card_paid() -> None:
    """A 10-cent refund of a $100 + $5 top-up returns no fee (split_refund), and a top-up at a 0%
    fee rate has none: what the card paid or got back is printed all the same."""
    st = statement(
        "0",
        [
            movement("topup", "100"),
            movement("topup_refund", "-0.10"),
            movement("adjustment", "-1", memo="goodwill"),
        ],
        [],
    )
    records = {r["kind"]: r for r in line_records(st) if r["kind"]}
    assert (records["topup"]["fee"], records["topup"]["charged"]) == (0, 10_000)
    assert (records["topup_refund"]["fee"], records["topup_refund"]["charged"]) == (0, -10)
    assert records["topup_refund"]["fee_exact"] == 0
    assert (records["adjustment"]["fee"], records["adjustment"]["charged"]) == (None, None)
    html = statement_html(st).decode()
    assert (
        '<td class="num">$0.00</td><td class="num">-$0.10</td><td class="num">-$0.10</td>' in html
    )


def test_csv_and_parquet_keep_exact_decimals() -> None:
    records = line_records(sample())
    text = csv_bytes(records, LINE_COLUMNS).decode()
    assert "-1.234567891234" in text and "0.004444444444" in text
    table = pq.read_table(io.BytesIO(parquet_bytes(records, LINE_COLUMNS)))
    assert str(table.schema.field("amount_exact").type) == "decimal128(38, 12)"
    assert str(table.schema.field("amount").type) == "decimal128(18, 2)"
    assert table.column("amount_exact").to_pylist() == [r["amount_exact"] for r in records]


@pytest.mark.parametrize("fmt", ["csv", "xlsx", "parquet", "html"])
def test_the_same_statement_gives_the_same_bytes_later(fmt: str) -> None:
    header = InvoiceHeader("Gateway Billing", "1 Example St", "INV-000042", T1)
    first = statement_bytes(sample(), fmt, header)
    time.sleep(1.1)  # zip entries and document properties would otherwise carry "now"
    assert statement_bytes(sample(), fmt, header) == first


def test_xlsx_has_typed_numbers_a_summary_sheet_and_fixed_metadata() -> None:
    header = InvoiceHeader("Gateway Billing", "", "INV-000001", T1)
    data = statement_bytes(sample(), "xlsx", header)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert b"2026-11-01T00:00:00Z" in z.read("docProps/core.xml")
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["Summary", "Lines"]
    head = [c.value for c in book["Summary"][1]]
    closing = book["Summary"].cell(row=2, column=head.index("closing") + 1)
    assert closing.data_type == "n" and closing.number_format == "#,##0.00"
    assert Decimal(str(closing.value)).quantize(Decimal("0.01")) * 100 == to_cents(sample().closing)


def test_normalize_zip_is_idempotent() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a.txt", "x")
    once = normalize_zip(buffer.getvalue())
    assert normalize_zip(once) == once


def test_html_prints_totals_the_fee_and_byok_section() -> None:
    text = statement_bytes(sample(), "html").decode()
    assert "@page" in text and "Bring your own key" in text
    assert "$5.00" in text and "$105.00" in text  # the top-up's fee and amount charged
    assert "<script" not in text
    receipt = receipt_html(
        Receipt("tu_1", "acme", None, Decimal("100"), Decimal("5"), Decimal("105"), "USD", T0,
                "pi_1"),
        InvoiceHeader("Gateway <Billing>", "", "INV-000007", T1),
    ).decode()  # fmt: skip
    assert "Platform fee (5%)" in receipt and "$105.00" in receipt and "INV-000007" in receipt
    assert "Gateway &lt;Billing&gt;" in receipt


def test_safe_names_stay_unique() -> None:
    assert safe_name("acme-1") == "acme-1"
    assert safe_name("a/b") != safe_name("a_b")
    assert "/" not in safe_name("a/b")
