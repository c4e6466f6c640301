"""An invoice's figures record: canonical, exact, free of labels, and compared field by field."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.errors import BillingError
from billing.exports import figures as fig
from billing.exports.formats import Receipt

from .test_exports_formats import movement, sample, statement, usage


def test_amounts_are_exact_twelve_place_text_and_negative_zero_is_zero() -> None:
    assert fig.exact_text(Decimal("7.77")) == "7.770000000000"
    assert fig.exact_text(Decimal("-1.234567891234")) == "-1.234567891234"
    assert fig.exact_text(-Decimal("0E-12")) == "0.000000000000"
    assert fig.exact_text(Decimal("12345678901234567890.5")) == "12345678901234567890.500000000000"
    with pytest.raises(ArithmeticError):  # never rounded into the record
        fig.exact_text(Decimal("0.0000000000001"))


def test_the_canonical_text_is_one_text_whatever_the_key_order() -> None:
    a = {"b": "1.000000000000", "a": [{"y": 1, "x": None}], "figures": 1}
    b = {"figures": 1, "a": [{"x": None, "y": 1}], "b": "1.000000000000"}
    assert fig.canonical(a) == fig.canonical(b)
    assert fig.canonical(a) == '{"a":[{"x":null,"y":1}],"b":"1.000000000000","figures":1}'
    assert fig.canonical({"figures": 1, "memo": "café"}).isascii()


def test_statement_figures_hold_the_numbers_not_the_labels() -> None:
    st = sample()
    figures = fig.statement_figures(st)
    assert json.loads(fig.canonical(figures)) == figures  # survives the round trip
    assert figures["total"] == fig.exact_text(st.usage_total)
    assert figures["closing"] == fig.exact_text(st.closing)
    assert len(figures["lines"]) == len(st.printed())
    topup = figures["lines"][1]
    assert (
        topup["kind"] == "topup" and topup["fee_cents"] == 500 and topup["charged_cents"] == 10500
    )
    # the account's name (it can be renamed), memos and descriptions are labels, not figures
    relabelled = replace(
        statement(
            "7.775",
            [
                movement("topup", "100", "5"),
                movement("topup_refund", "-20", "-1"),
                movement("adjustment", "-1.234567891234", memo="another reason"),
            ],
            list(st.usage),
            st.byok,
        ),
        account_name="Acme Renamed Ltd",
    )
    assert fig.statement_figures(relabelled) == figures
    # an amount is a figure
    changed = statement("7.775", [movement("topup", "100", "5")], list(st.usage), st.byok)
    assert fig.first_difference(figures, fig.statement_figures(changed)) is not None


def test_the_first_difference_names_the_field_totals_before_lines() -> None:
    st = sample()
    stored = fig.statement_figures(st)
    more_usage = statement(
        "7.775", [movement("topup", "100", "5"), movement("topup_refund", "-20", "-1"),
                  movement("adjustment", "-1.234567891234", memo="goodwill")],
        [*st.usage, usage("2.5")], st.byok,
    )  # fmt: skip
    now = fig.statement_figures(more_usage)
    assert fig.first_difference(stored, stored) is None
    assert fig.first_difference(stored, now) == (
        f"total stored {stored['total']}, now {now['total']}"
    )
    # within the lines: the index and the field
    edited = json.loads(fig.canonical(stored))
    edited["lines"][2]["posted_at"] = "2026-10-02T00:00:00.000000Z"
    was = stored["lines"][2]["posted_at"]
    assert fig.first_difference(edited, stored) == (
        f"lines[2].posted_at stored 2026-10-02T00:00:00.000000Z, now {was}"
    )
    # a line (or a field) on one side only
    shorter = {**stored, "lines": stored["lines"][:-1]}
    found = fig.first_difference(shorter, stored)
    assert found is not None and found.startswith(
        f"lines[{len(stored['lines']) - 1}] stored (none)"
    )
    assert fig.first_difference({**stored, "extra": 1}, stored) == "extra stored 1, now (none)"
    # a number is not its text, and 1 is not true
    assert fig.first_difference({"n": 1}, {"n": "1"}) is not None
    assert fig.first_difference({"n": True}, {"n": 1}) is not None


def test_receipt_figures() -> None:
    receipt = Receipt(
        "tu_1", "acme", "Acme", Decimal("100"), Decimal("5"), Decimal("105"), "USD",
        datetime(2026, 10, 3, 12, 30, tzinfo=UTC), "pi_1",
    )  # fmt: skip
    figures = fig.receipt_figures(receipt)
    assert figures["total"] == figures["charged"] == "105.000000000000"
    assert (figures["credit_cents"], figures["fee_cents"], figures["charged_cents"]) == (
        10000,
        500,
        10500,
    )
    assert figures["paid_at"] == "2026-10-03T12:30:00.000000Z"
    assert fig.receipt_figures(replace(receipt, account_name="Renamed")) == figures
    assert fig.first_difference(
        figures, fig.receipt_figures(replace(receipt, fee=Decimal(4), charged=Decimal(104)))
    ) == ("total stored 105.000000000000, now 104.000000000000")


def test_a_stored_record_of_another_version_is_refused() -> None:
    text = fig.canonical(fig.statement_figures(sample()))
    assert fig.parse(text)["figures"] == fig.VERSION
    with pytest.raises(BillingError, match="version 2"):
        fig.parse(text.replace('"figures":1', '"figures":2'))
    with pytest.raises(BillingError, match="version None"):
        fig.parse("[]")
