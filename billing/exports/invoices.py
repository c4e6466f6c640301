"""Invoices: numbered per issuer without gaps, immutable once issued, reproducible bytes.

* **Gapless numbers**: each issuer has a counter row. The issuing transaction locks it
  ``FOR UPDATE``, inserts invoice ``last_number + 1`` and bumps the counter; if anything fails the
  whole transaction rolls back, so no number is ever skipped (a sequence would skip on rollback).
  Concurrent issuers queue on the row lock.
* **Once per subject**: one usage statement per account and period, one receipt per top-up
  (unique indexes). Issuing again returns the invoice already issued, unchanged.
* **Immutable**: the rendered bytes are stored with their SHA-256 (checked by a constraint and by
  ``billing audit``); the table is append-only (trigger). Rendering is deterministic (no
  embedded "now"), so ``render_again`` rebuilds identical bytes from the ledger, as long as the
  rendering code and its libraries are unchanged.
* **Figures**: with the bytes, the issuing transaction stores the figures they were rendered from
  (``billing.exports.figures``: canonical JSON and its SHA-256, migration 0016). ``verify``
  recomputes them from the ledger: that an issued invoice still follows from the books does not
  depend on how it is rendered today. Invoices issued before 0016 have no figures; for them
  ``verify`` can only compare bytes.
* A usage statement is issued only for a closed period: one that ended at least
  ``CLOSE_GRACE`` ago in the account's time zone, so no batch that started before the end can
  still commit into it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import psycopg

from billing.db import Queries, fetch_dicts
from billing.errors import BillingError
from billing.exports import figures as fig
from billing.exports.formats import (
    Format,
    InvoiceHeader,
    Receipt,
    receipt_html,
    statement_bytes,
)
from billing.exports.statements import Period, Statement, statement_for

CLOSE_GRACE = timedelta(hours=1)
DEFAULT_ISSUER = "default"


class InvoiceKind(StrEnum):
    TOPUP_RECEIPT = "topup_receipt"
    USAGE_STATEMENT = "usage_statement"


@dataclass(frozen=True)
class Invoice:
    invoice_id: int
    issuer: str
    number: int
    prefix: str
    kind: InvoiceKind
    account_id: str
    period: str | None
    topup_id: str | None
    issued_at: datetime
    issued_by: str | None
    format: str
    total: Decimal
    content: bytes
    content_sha256: str
    figures: str | None  # canonical JSON (billing.exports.figures); None if issued before 0016
    figures_sha256: str | None
    legal_name: str
    address: str

    @property
    def label(self) -> str:
        return f"{self.prefix}{self.number:06d}"

    @property
    def header(self) -> InvoiceHeader:
        return InvoiceHeader(self.legal_name, self.address, self.label, self.issued_at)

    @property
    def intact(self) -> bool:
        """The stored bytes, and the stored figures if any, match their hashes."""
        if hashlib.sha256(self.content).hexdigest() != self.content_sha256:
            return False
        if self.figures is None or self.figures_sha256 is None:
            return self.figures is None and self.figures_sha256 is None
        return hashlib.sha256(self.figures.encode()).hexdigest() == self.figures_sha256


def add_issuer(
    conn: psycopg.Connection[Any],
    q: Queries,
    issuer: str,
    legal_name: str,
    prefix: str,
    address: str = "",
) -> bool:
    """Register an issuer with its own numbering (from 1); False if it already exists."""
    try:
        row = conn.execute(
            q["insert_issuer"],
            {"issuer": issuer, "legal_name": legal_name, "address": address, "prefix": prefix},
        ).fetchone()
    except psycopg.errors.CheckViolation:
        raise BillingError(
            "issuer is lowercase [a-z0-9_-] (<= 40), prefix uppercase [A-Z0-9-] (<= 20)"
        ) from None
    return row is not None


def get_invoice(conn: psycopg.Connection[Any], q: Queries, invoice_id: int) -> Invoice:
    rows = fetch_dicts(conn, q["invoice_by_id"], {"invoice_id": invoice_id})
    if not rows:
        raise BillingError(f"no invoice {invoice_id}")
    row = rows[0]
    return Invoice(**{**row, "kind": InvoiceKind(row["kind"]), "content": bytes(row["content"])})


def find_invoice(conn: psycopg.Connection[Any], q: Queries, issuer: str, number: int) -> Invoice:
    row = conn.execute(q["invoice_by_number"], {"issuer": issuer, "number": number}).fetchone()
    if row is None:
        raise BillingError(f"no invoice number {number} of issuer {issuer!r}")
    return get_invoice(conn, q, int(row[0]))


def list_invoices(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    account: str | None = None,
    issuer: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    return fetch_dicts(
        conn, q["list_invoices"], {"account": account, "issuer": issuer, "limit": limit}
    )


def _transaction_time(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _issue(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    issuer: str,
    kind: InvoiceKind,
    account_id: str,
    period: str | None,
    topup_id: str | None,
    fmt: str,
    actor: str | None,
    existing: tuple[str, dict[str, Any]],
    render: Any,
) -> Invoice:
    with conn.transaction():
        locked = fetch_dicts(conn, q["lock_issuer"], {"issuer": issuer})
        if not locked:
            raise BillingError(f"no invoice issuer {issuer!r}")
        # Checked under the issuer lock: a concurrent issue of the same subject has committed.
        found = conn.execute(q[existing[0]], existing[1]).fetchone()
        if found is not None:
            return get_invoice(conn, q, int(found[0]))
        number = int(locked[0]["last_number"]) + 1
        header = InvoiceHeader(
            locked[0]["legal_name"],
            locked[0]["address"],
            f"{locked[0]['prefix']}{number:06d}",
            _transaction_time(conn),
        )
        content, total, figures = render(header)
        figures_text = fig.canonical(figures)
        row = conn.execute(
            q["insert_invoice"],
            {
                "issuer": issuer,
                "number": number,
                "kind": kind.value,
                "account_id": account_id,
                "period": period,
                "topup_id": topup_id,
                "issued_at": header.issued_at,
                "issued_by": actor,
                "format": fmt,
                "total": total,
                "content": content,
                "content_sha256": hashlib.sha256(content).hexdigest(),
                "figures": figures_text,
                "figures_sha256": hashlib.sha256(figures_text.encode()).hexdigest(),
            },
        ).fetchone()
        assert row is not None
        bumped = conn.execute(q["bump_issuer"], {"issuer": issuer, "number": number})
        if bumped.rowcount != 1:  # cannot happen under the row lock; never leave a gap
            raise BillingError(f"invoice counter of {issuer!r} moved while locked")
        return get_invoice(conn, q, int(row[0]))


def issue_statement(
    conn: psycopg.Connection[Any],
    q: Queries,
    account_id: str,
    period: Period,
    *,
    now: datetime,
    issuer: str = DEFAULT_ISSUER,
    fmt: str = Format.HTML,
    actor: str | None = None,
) -> Invoice:
    """The monthly usage statement of an account as an invoice (or the one already issued)."""
    if fmt not in Format.ALL:
        raise BillingError(f"format must be one of {', '.join(Format.ALL)}")

    def render(header: InvoiceHeader) -> tuple[bytes, Decimal, dict[str, Any]]:
        conn.execute(q["account_lock_share"], {"account_id": account_id})  # its zone stays
        st = statement_for(conn, q, account_id, period)
        if now < st.period_end + CLOSE_GRACE:
            raise BillingError(
                f"period {period} of {account_id} ends {st.period_end.isoformat()} "
                f"({st.time_zone}); it can be invoiced {CLOSE_GRACE} after it ends"
            )
        return statement_bytes(st, fmt, header), st.usage_total, fig.statement_figures(st)

    return _issue(
        conn,
        q,
        issuer=issuer,
        kind=InvoiceKind.USAGE_STATEMENT,
        account_id=account_id,
        period=str(period),
        topup_id=None,
        fmt=fmt,
        actor=actor,
        existing=("find_statement_invoice", {"account_id": account_id, "period": str(period)}),
        render=render,
    )


def load_receipt(conn: psycopg.Connection[Any], q: Queries, topup_id: str) -> Receipt:
    rows = fetch_dicts(conn, q["receipt_topup"], {"topup_id": topup_id})
    if not rows:
        raise BillingError(f"no top-up {topup_id!r}")
    row = rows[0]
    if row["status"] != "succeeded" or row["succeeded_at"] is None:
        raise BillingError(
            f"top-up {topup_id!r} is {row['status']}: only a paid top-up has a receipt"
        )
    return Receipt(
        topup_id=row["topup_id"],
        account_id=row["account_id"],
        account_name=row["account_name"],
        credit=row["credit"],
        fee=row["fee"],
        charged=row["charged"],
        currency=row["currency"],
        succeeded_at=row["succeeded_at"],
        payment_reference=row["stripe_payment_intent_id"],
    )


def issue_receipt(
    conn: psycopg.Connection[Any],
    q: Queries,
    topup_id: str,
    *,
    issuer: str = DEFAULT_ISSUER,
    actor: str | None = None,
) -> Invoice:
    """The receipt of a paid top-up (HTML, showing the 5% fee), or the one already issued."""
    receipt = load_receipt(conn, q, topup_id)
    return _issue(
        conn,
        q,
        issuer=issuer,
        kind=InvoiceKind.TOPUP_RECEIPT,
        account_id=receipt.account_id,
        period=None,
        topup_id=topup_id,
        fmt=Format.HTML,
        actor=actor,
        existing=("find_receipt_invoice", {"topup_id": topup_id}),
        render=lambda header: (
            receipt_html(receipt, header),
            receipt.charged,
            fig.receipt_figures(receipt),
        ),
    )


def _subject(conn: psycopg.Connection[Any], q: Queries, invoice: Invoice) -> Receipt | Statement:
    """What an issued invoice shows, read from the database now (one snapshot). Raises a
    ``BillingError`` when the books no longer give it (``ReconciliationError``: the statement
    does not add up)."""
    if invoice.kind is InvoiceKind.TOPUP_RECEIPT:
        assert invoice.topup_id is not None
        return load_receipt(conn, q, invoice.topup_id)
    assert invoice.period is not None
    return statement_for(conn, q, invoice.account_id, Period.parse(invoice.period))


def _render(invoice: Invoice, subject: Receipt | Statement) -> tuple[bytes, dict[str, Any]]:
    if isinstance(subject, Receipt):
        return receipt_html(subject, invoice.header), fig.receipt_figures(subject)
    return statement_bytes(subject, invoice.format, invoice.header), fig.statement_figures(subject)


def rebuild(
    conn: psycopg.Connection[Any], q: Queries, invoice: Invoice
) -> tuple[bytes, dict[str, Any]]:
    """An issued invoice's bytes and figures as the database gives them now (one snapshot)."""
    return _render(invoice, _subject(conn, q, invoice))


def render_again(conn: psycopg.Connection[Any], q: Queries, invoice: Invoice) -> bytes:
    """Rebuild an issued invoice's bytes from the database (equal to ``content`` while the
    rendering code and its libraries are those it was issued with)."""
    return rebuild(conn, q, invoice)[0]


class FiguresCheck(StrEnum):
    MATCH = "match"
    DIFFERENT = "different"
    UNRECOMPUTABLE = "unrecomputable"  # the books no longer give the invoice (see ``difference``)
    NOT_STORED = "not_stored"  # issued before migration 0016: only the bytes can be compared


@dataclass(frozen=True)
class Verification:
    """Does an issued invoice still follow from the ledger?

    ``figures`` answers it when the invoice has stored figures; ``same_bytes`` only tells whether
    today's rendering is byte-identical (it is not when the rendering code or a library changed).
    """

    intact: bool  # the stored bytes and figures match their hashes
    figures: FiguresCheck
    difference: str | None  # the first figure that differs (DIFFERENT), or why UNRECOMPUTABLE
    same_bytes: bool

    @property
    def ok(self) -> bool:
        if not self.intact or self.figures is FiguresCheck.UNRECOMPUTABLE:
            return False
        if self.figures is FiguresCheck.NOT_STORED:
            return self.same_bytes  # a rendering change and a ledger change look alike
        return self.figures is FiguresCheck.MATCH


def verify(conn: psycopg.Connection[Any], q: Queries, invoice: Invoice) -> Verification:
    """Recompute an issued invoice from the ledger; compare its figures, and its bytes.

    When the ledger no longer gives the invoice (its statement does not reconcile, its top-up is
    no longer a paid one) that is a failed verification (UNRECOMPUTABLE), not an error: the
    books changed under an issued invoice. Other exceptions propagate.
    """
    try:
        subject = _subject(conn, q, invoice)
    except BillingError as exc:
        return Verification(invoice.intact, FiguresCheck.UNRECOMPUTABLE, str(exc), False)
    content, now = _render(invoice, subject)
    same_bytes = content == invoice.content
    if invoice.figures is None:
        return Verification(invoice.intact, FiguresCheck.NOT_STORED, None, same_bytes)
    difference = fig.first_difference(fig.parse(invoice.figures), now)
    return Verification(
        invoice.intact,
        FiguresCheck.MATCH if difference is None else FiguresCheck.DIFFERENT,
        difference,
        same_bytes,
    )
