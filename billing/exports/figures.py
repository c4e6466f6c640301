"""An invoice's figures: what it says, as a canonical record independent of how it is rendered.

An issued invoice stores, besides its bytes, the figures those bytes were rendered from
(migration 0016): amounts as exact decimal strings (12 places, the ledger's scale), the printed
cents, quantities, counts, identities (posting ids, model and price version, top-up) and times in
UTC. ``billing invoices show N --verify`` rebuilds them from the ledger and compares them with the
stored record, so a rendering change (a column added to a format, an HTML fix, a pyarrow or
openpyxl upgrade) is told apart from a change in the books.

What is *not* a figure: labels and layout (descriptions, memos, the account's name, which can be
renamed), the issuer, number and issue time (stored in their own columns). The record is
versioned (``figures``): a later version may add fields, and an invoice is checked against the
version it was issued with.

Canonical text: JSON with sorted keys, no spaces, ASCII only (``canonical``); its SHA-256 is stored
with it. Decimals are strings, never JSON numbers, so no reader turns them into floats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.errors import BillingError
from billing.exports.formats import Receipt
from billing.exports.statements import PrintedLine, Statement
from billing.money import EXACT, QUANTUM, to_cents

VERSION = 1


def exact_text(value: Decimal) -> str:
    """An amount as 12-place decimal text, ``-0`` as ``0``; raises if it has more places."""
    if not value:
        value = Decimal(0)
    return f"{value.quantize(QUANTUM, context=EXACT):f}"


def time_text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line(line: PrintedLine) -> dict[str, Any]:
    record: dict[str, Any] = {"section": line.section.value}
    m, u = line.movement, line.usage
    if m is not None:
        record |= {"posting_id": m.posting_id, "kind": m.kind, "posted_at": time_text(m.created_at)}
    if u is not None:
        record |= {
            "member": u.member,
            "model": u.model,
            "provider": u.provider,
            "price_effective_from": time_text(u.price_effective_from),
            "billable_class": u.billable_class,
            "quantity": u.quantity,
            "unit_price": None if u.unit_price is None else exact_text(u.unit_price),
            "per": u.per,
            "events": u.events,
        }
    record |= {"amount": exact_text(line.amount), "cents": line.cents}
    if m is not None:
        record["fee"] = exact_text(m.fee)
        if m.by_card:  # the fee and charged columns are printed (in cents, each on its own)
            record |= {"fee_cents": to_cents(m.fee), "charged_cents": to_cents(m.charged)}
    return record


def statement_figures(st: Statement) -> dict[str, Any]:
    """A usage statement's figures, in the order a difference is looked for: what it is, its
    totals, then its lines in print order (opening, movements, usage, closing, BYOK)."""
    return {
        "figures": VERSION,
        "kind": "usage_statement",
        "account_id": st.account_id,
        "period": str(st.period),
        "time_zone": st.time_zone,
        "period_start": time_text(st.period_start),
        "period_end": time_text(st.period_end),
        "total": exact_text(st.usage_total),  # the usage charged (invoices.total)
        "opening": exact_text(st.opening),
        "closing": exact_text(st.closing),
        "credits": exact_text(st.credits),
        "debits": exact_text(st.debits),
        "fees": exact_text(st.fees),
        "paid_closing": exact_text(st.paid_closing),
        "granted_closing": exact_text(st.granted_closing),
        "usage_from_grants": exact_text(st.usage_from_grants),
        "byok_notional": exact_text(st.byok_notional),
        "late_amount": exact_text(st.late_amount),
        "usage_events": st.usage_events,
        "byok_events": st.byok_events,
        "late_events": st.late_events,
        "lines": [_line(line) for line in st.printed()],
    }


def receipt_figures(receipt: Receipt) -> dict[str, Any]:
    """A top-up receipt's figures: the payment as made (credit + fee = charged)."""
    return {
        "figures": VERSION,
        "kind": "topup_receipt",
        "account_id": receipt.account_id,
        "topup_id": receipt.topup_id,
        "paid_at": time_text(receipt.succeeded_at),
        "payment_reference": receipt.payment_reference,
        "currency": receipt.currency,
        "total": exact_text(receipt.charged),
        "credit": exact_text(receipt.credit),
        "fee": exact_text(receipt.fee),
        "charged": exact_text(receipt.charged),
        "credit_cents": to_cents(receipt.credit),
        "fee_cents": to_cents(receipt.fee),
        "charged_cents": to_cents(receipt.charged),
    }


def canonical(figures: dict[str, Any]) -> str:
    """The one text of a figures record (what is stored and hashed)."""
    return json.dumps(figures, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def parse(text: str) -> dict[str, Any]:
    """A stored record; refused if this code does not know its version."""
    figures = json.loads(text)
    if not isinstance(figures, dict) or figures.get("figures") != VERSION:
        version = figures.get("figures") if isinstance(figures, dict) else None
        raise BillingError(f"invoice figures of version {version!r}: this code knows {VERSION}")
    return figures


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_ABSENT = object()


def _differences(stored: Any, now: Any, path: str) -> Iterator[str]:
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in [*now, *(k for k in stored if k not in now)]:
            sub = f"{path}.{key}" if path else key
            yield from _differences(stored.get(key, _ABSENT), now.get(key, _ABSENT), sub)
    elif isinstance(stored, list) and isinstance(now, list):
        for i in range(max(len(stored), len(now))):
            yield from _differences(
                stored[i] if i < len(stored) else _ABSENT,
                now[i] if i < len(now) else _ABSENT,
                f"{path}[{i}]",
            )
    elif stored != now or type(stored) is not type(now):
        yield f"{path or 'figures'} stored {_show(stored)}, now {_show(now)}"


def first_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when the records are equal; else the first field that differs, in ``now``'s order
    (totals before lines), e.g. ``closing stored 12.000000000000, now 14.500000000000``."""
    return next(_differences(stored, now, ""), None)
