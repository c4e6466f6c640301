"""Statement files: CSV, XLSX, Parquet and a printable HTML invoice, all byte-reproducible.

Every format carries the same two tables:

* **summary**, one row per account: opening, each section's subtotal, closing, usage, BYOK;
* **lines**, the statement in print order: opening, movements, usage lines, closing, then BYOK.

Money appears twice: ``*_exact`` is the exact decimal (12 places; a Parquet ``decimal128(38, 12)``,
text in CSV and XLSX so no spreadsheet float touches it), and the printed amount in cents
(``decimal128(18, 2)`` in Parquet, a typed numeric cell in XLSX). Printed cents come from
``Statement.printed`` (``CentsAllocator``), so the printed lines sum to the printed closing
balance, and a section subtotal is the sum of its printed lines.

Spreadsheets: account ids, names and other customer-chosen text can begin with a character a
spreadsheet reads as a formula (``=HYPERLINK(..)``). CSV text cells that could are prefixed with
``'`` (OWASP's advice on CSV injection; ``spreadsheet_text``), and XLSX text cells are typed as
strings, which a spreadsheet never evaluates. Parquet, for programs, keeps the text as stored.

Determinism: no format embeds the time it was written. XLSX document properties are set to a
fixed time (the invoice's issue time, or the period end) and the zip entries carry a fixed date;
Parquet and HTML hold no timestamps of their own. The same statement gives the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq

from billing.exports.statements import Section, Statement
from billing.money import CentsAllocator, format_cents, format_usd, to_cents


class Format:
    CSV = "csv"
    XLSX = "xlsx"
    PARQUET = "parquet"
    HTML = "html"
    ALL = ("csv", "xlsx", "parquet", "html")


@dataclass(frozen=True)
class InvoiceHeader:
    """What an issued invoice adds to a statement or receipt: who issued it, number, time."""

    issuer_name: str
    issuer_address: str
    number: str
    issued_at: datetime


def cents_to_decimal(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


# --- the two tables ---------------------------------------------------------------------------
# (name, kind): kind is "text", "int", "exact" (12 places), "cents" (2 places) or "time".
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("account_id", "text"),
    ("account_name", "text"),
    ("period", "text"),
    ("time_zone", "text"),
    ("period_start", "time"),
    ("period_end", "time"),
    ("opening", "cents"),
    ("topups", "cents"),
    ("grants", "cents"),
    ("refunds_disputes", "cents"),
    ("adjustments", "cents"),
    ("other", "cents"),
    ("usage", "cents"),
    ("closing", "cents"),
    ("fees", "cents"),
    ("byok_notional", "cents"),
    ("usage_events", "int"),
    ("byok_events", "int"),
    ("late_events", "int"),
    ("opening_exact", "exact"),
    ("credits_exact", "exact"),
    ("debits_exact", "exact"),
    ("closing_exact", "exact"),
    ("usage_exact", "exact"),
    ("fees_exact", "exact"),
    ("byok_notional_exact", "exact"),
    ("late_amount_exact", "exact"),
    ("paid_closing_exact", "exact"),
    ("granted_closing_exact", "exact"),
    ("usage_from_grants_exact", "exact"),
)
LINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("account_id", "text"),
    ("period", "text"),
    ("line", "int"),
    ("section", "text"),
    ("description", "text"),
    ("posted_at", "time"),
    ("kind", "text"),
    ("reference", "text"),
    ("actor", "text"),
    ("model", "text"),
    ("provider", "text"),
    ("billable_class", "text"),
    ("price_effective_from", "time"),
    ("quantity", "int"),
    ("unit_price", "exact"),
    ("per", "int"),
    ("events", "int"),
    ("fee", "cents"),
    ("charged", "cents"),
    ("amount", "cents"),
    ("amount_exact", "exact"),
    ("fee_exact", "exact"),
)


def summary_record(st: Statement) -> dict[str, Any]:
    byok_cents = st.section_cents(Section.BYOK)
    return {
        "account_id": st.account_id,
        "account_name": st.account_name,
        "period": str(st.period),
        "time_zone": st.time_zone,
        "period_start": st.period_start,
        "period_end": st.period_end,
        "opening": st.section_cents(Section.OPENING),
        "topups": st.section_cents(Section.TOPUPS),
        "grants": st.section_cents(Section.GRANTS),
        "refunds_disputes": st.section_cents(Section.REFUNDS_DISPUTES),
        "adjustments": st.section_cents(Section.ADJUSTMENTS),
        "other": st.section_cents(Section.OTHER),
        "usage": st.section_cents(Section.USAGE),
        "closing": st.section_cents(Section.CLOSING),
        "fees": _fee_cents(st),
        "byok_notional": byok_cents,
        "usage_events": st.usage_events,
        "byok_events": st.byok_events,
        "late_events": st.late_events,
        "opening_exact": st.opening,
        "credits_exact": st.credits,
        "debits_exact": st.debits,
        "closing_exact": st.closing,
        "usage_exact": st.usage_total,
        "fees_exact": st.fees,
        "byok_notional_exact": st.byok_notional,
        "late_amount_exact": st.late_amount,
        "paid_closing_exact": st.paid_closing,
        "granted_closing_exact": st.granted_closing,
        "usage_from_grants_exact": st.usage_from_grants,
    }


def _fee_cents(st: Statement) -> int:
    alloc = CentsAllocator()
    for m in st.movements:
        alloc.line(m.fee)
    return alloc.total_cents


def line_records(st: Statement) -> list[dict[str, Any]]:
    """The statement's printed lines; fee and charged are per line (top-ups and refunds)."""
    records = []
    for number, line in enumerate(st.printed(), start=1):
        m, u = line.movement, line.usage
        byok = line.section is Section.BYOK
        records.append(
            {
                "account_id": st.account_id,
                "period": str(st.period),
                "line": number,
                "section": line.section.value,
                "description": line.description,
                "posted_at": m.created_at if m else None,
                "kind": m.kind if m else None,
                "reference": m.reference if m else None,
                "actor": m.actor if m else None,
                "model": u.model if u else None,
                "provider": u.provider if u else None,
                "billable_class": u.billable_class if u else None,
                "price_effective_from": u.price_effective_from if u else None,
                "quantity": u.quantity if u else None,
                "unit_price": u.unit_price if u else None,
                "per": u.per if u else None,
                "events": u.events if u else None,
                # the fee is shown per line, rounded on its own (it is not part of the wallet sum)
                # BYOK: the amount is the notional provider cost; nothing charged, fee waived
                "fee": _line_fee_cents(m.fee) if m and m.by_card else (0 if byok else None),
                "charged": _line_fee_cents(m.charged) if m and m.by_card else (0 if byok else None),
                "amount": line.cents,
                "amount_exact": line.amount,
                "fee_exact": m.fee if m and m.by_card else None,
            }
        )
    return records


def _line_fee_cents(amount: Decimal) -> int:
    return to_cents(amount)


def _text(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind == "cents":
        return format_cents(int(value))
    if kind == "exact":
        return format_usd(value)
    if kind == "time":
        return _iso(value)
    return str(value)


# --- CSV --------------------------------------------------------------------------------------
# What a spreadsheet opening a CSV reads as the start of a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def spreadsheet_text(value: str) -> str:
    """Customer-chosen text as a spreadsheet shows it, never as a formula: a ``'`` before it
    when it begins like one. Only for text columns: amounts such as ``-1.50`` stay numbers."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _csv_text(kind: str, value: Any) -> str:
    text = _text(kind, value)
    return spreadsheet_text(text) if kind == "text" else text


def csv_bytes(records: Iterable[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> bytes:
    buffer = io.StringIO()
    _write_csv(buffer, records, columns, header=True)
    return buffer.getvalue().encode()


def _write_csv(
    out: Any, records: Iterable[dict[str, Any]], columns: tuple[tuple[str, str], ...], header: bool
) -> None:
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow([name for name, _ in columns])
    for r in records:
        writer.writerow([_csv_text(kind, r[name]) for name, kind in columns])


# --- Parquet ----------------------------------------------------------------------------------
def _arrow_type(kind: str) -> pa.DataType:
    return {
        "text": pa.string(),
        "int": pa.int64(),
        "exact": pa.decimal128(38, 12),
        "cents": pa.decimal128(18, 2),
        "time": pa.timestamp("us", tz="UTC"),
    }[kind]


def arrow_schema(columns: tuple[tuple[str, str], ...]) -> pa.Schema:
    return pa.schema([(name, _arrow_type(kind)) for name, kind in columns])


def arrow_table(records: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> pa.Table:
    arrays = []
    for name, kind in columns:
        values = [r[name] for r in records]
        if kind == "cents":
            values = [None if v is None else cents_to_decimal(v) for v in values]
        elif kind == "exact":
            values = [None if v is None else v.quantize(Decimal("1E-12")) for v in values]
        arrays.append(pa.array(values, type=_arrow_type(kind)))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(columns))


def parquet_bytes(records: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(arrow_table(records, columns), sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


# --- XLSX -------------------------------------------------------------------------------------
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _xlsx_cell(ws: Any, kind: str, value: Any) -> Any:
    from openpyxl.cell import WriteOnlyCell

    if value is None:
        return None
    if kind == "cents":
        cell = WriteOnlyCell(ws, value=cents_to_decimal(int(value)))
        cell.number_format = "#,##0.00"
        return cell
    if kind == "int":
        cell = WriteOnlyCell(ws, value=int(value))
        cell.number_format = "#,##0"
        return cell
    # exact amounts and times as text (no float, no zone loss); every text cell typed as a
    # string, or openpyxl would store one that begins with "=" as a formula
    cell = WriteOnlyCell(ws, value=_text(kind, value))
    cell.data_type = "s"
    return cell


class XlsxBook:
    """A write-only workbook (rows are streamed to disk) with Summary and Lines sheets."""

    def __init__(self, fixed_time: datetime, title: str) -> None:
        from openpyxl import Workbook

        self._wb = Workbook(write_only=True)
        naive = fixed_time.astimezone(UTC).replace(tzinfo=None, microsecond=0)
        self._wb.properties.created = naive
        self._wb.properties.modified = naive
        self._wb.properties.creator = "gateway-billing"
        self._wb.properties.title = title
        self.summary = self._wb.create_sheet("Summary")
        self.lines = self._wb.create_sheet("Lines")
        self.summary.append([name for name, _ in SUMMARY_COLUMNS])
        self.lines.append([name for name, _ in LINE_COLUMNS])
        self.line_rows = 0

    def add(self, st: Statement) -> None:
        rec = summary_record(st)
        self.summary.append([_xlsx_cell(self.summary, k, rec[n]) for n, k in SUMMARY_COLUMNS])
        for rec in line_records(st):
            self.line_rows += 1
            if self.line_rows >= 1_048_575:
                raise ValueError("more lines than one XLSX sheet holds; export CSV or Parquet")
            self.lines.append([_xlsx_cell(self.lines, k, rec[n]) for n, k in LINE_COLUMNS])

    def write(self, target: BinaryIO) -> None:
        """Write the workbook to ``target``; entries are streamed, never held whole in memory."""
        from openpyxl.writer.excel import ExcelWriter

        with tempfile.TemporaryFile() as raw:
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
                ExcelWriter(self._wb, archive).save()  # not save_workbook: it stamps "now"
            raw.seek(0)
            normalize_zip_stream(raw, target)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()


def normalize_zip_stream(source: BinaryIO, target: BinaryIO) -> None:
    """Re-pack a zip with every entry dated ``FIXED_ZIP_TIME``, same order and content."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o600 << 16
            with (
                src.open(info) as reader,
                dst.open(fixed, "w", force_zip64=info.file_size >= zipfile.ZIP64_LIMIT) as writer,
            ):
                shutil.copyfileobj(reader, writer, 1 << 20)


def normalize_zip(data: bytes) -> bytes:
    out = io.BytesIO()
    normalize_zip_stream(io.BytesIO(data), out)
    return out.getvalue()


def xlsx_bytes(statements: Iterable[Statement], fixed_time: datetime, title: str) -> bytes:
    book = XlsxBook(fixed_time, title)
    for st in statements:
        book.add(st)
    return book.to_bytes()


# --- HTML -------------------------------------------------------------------------------------
_CSS = """
@page { size: A4; margin: 16mm 14mm; }
* { box-sizing: border-box; }
body { font: 10pt/1.4 "Helvetica Neue", Arial, sans-serif; color: #111; margin: 0; }
header { display: flex; justify-content: space-between; border-bottom: 2px solid #111;
         padding-bottom: 8px; margin-bottom: 14px; }
h1 { font-size: 16pt; margin: 0 0 4px; } h2 { font-size: 11pt; margin: 18px 0 6px; }
.muted { color: #555; } .issuer { text-align: right; white-space: pre-line; }
table { width: 100%; border-collapse: collapse; margin-bottom: 6px; }
th, td { padding: 3px 6px; border-bottom: 1px solid #ddd; vertical-align: top; }
th { text-align: left; background: #f2f2f2; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr { page-break-inside: avoid; } thead { display: table-header-group; }
tr.total td { font-weight: 700; border-top: 2px solid #111; border-bottom: none; }
.note { font-size: 8.5pt; color: #555; margin-top: 14px; }
@media print { body { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{frac:02d}"


def _page(title: str, header: InvoiceHeader | None, heading: str, body: str) -> bytes:
    issuer = (
        f'<div class="issuer"><strong>{_e(header.issuer_name)}</strong>\n'
        f"{_e(header.issuer_address)}\nInvoice {_e(header.number)}\n"
        f"Issued {_e(header.issued_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC'))}</div>"
        if header
        else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><div>{heading}</div>{issuer}</header>{body}</body></html>\n"
    ).encode()


def statement_html(st: Statement, header: InvoiceHeader | None = None) -> bytes:
    """A customer statement that prints well to PDF (A4, repeated table headers)."""
    printed = st.printed()
    # the period's bounds and the movements' dates in the account's zone, the one the heading
    # names (the bytes must not depend on the database session's zone: invoices --verify)
    zone = ZoneInfo(st.time_zone)
    start = st.period_start.astimezone(zone).strftime("%Y-%m-%d %H:%M")
    end = st.period_end.astimezone(zone).strftime("%Y-%m-%d %H:%M")
    heading = (
        f"<h1>Statement {_e(st.period)}</h1>"
        f"<div>Account <strong>{_e(st.account_id)}</strong>"
        f"{' (' + _e(st.account_name) + ')' if st.account_name else ''}</div>"
        f'<div class="muted">{_e(start)} to {_e(end)} ({_e(st.time_zone)})</div>'
    )
    summary = [
        ("Opening balance", st.section_cents(Section.OPENING)),
        ("Top-ups", st.section_cents(Section.TOPUPS)),
        ("Granted credit (promotional)", st.section_cents(Section.GRANTS)),
        ("Refunds and disputes", st.section_cents(Section.REFUNDS_DISPUTES)),
        ("Adjustments", st.section_cents(Section.ADJUSTMENTS)),
        ("Other movements", st.section_cents(Section.OTHER)),
        ("Usage", st.section_cents(Section.USAGE)),
    ]
    rows = "".join(
        f'<tr><td>{_e(label)}</td><td class="num">{_money(c)}</td></tr>'
        for label, c in summary
        if c or label in ("Opening balance", "Usage")
    )
    body = [
        '<h2>Summary</h2><table><thead><tr><th>USD</th><th class="num">Amount</th></tr>'
        f'</thead><tbody>{rows}<tr class="total"><td>Closing balance</td>'
        f'<td class="num">{_money(st.section_cents(Section.CLOSING))}</td></tr></tbody></table>'
    ]
    if st.granted_closing or st.usage_from_grants:  # paid and granted credit apart
        # paid = closing - granted in cents, so that the two printed lines add up to the
        # printed closing balance (rounding each on its own could be a cent off)
        granted = to_cents(st.granted_closing)
        split = [
            ("of which paid credit", st.section_cents(Section.CLOSING) - granted),
            ("of which granted credit", granted),
            ("usage paid from granted credit", to_cents(st.usage_from_grants)),
        ]
        body.append(
            "<table><tbody>"
            + "".join(
                f'<tr><td>{_e(label)}</td><td class="num">{_money(v)}</td></tr>'
                for label, v in split
            )
            + "</tbody></table>"
        )
    moves = [line for line in printed if line.movement is not None]
    if moves:
        body.append(
            "<h2>Wallet movements</h2><table><thead><tr><th>Date</th><th>Description</th>"
            '<th class="num">Fee</th><th class="num">Charged</th><th class="num">Wallet</th>'
            "</tr></thead><tbody>"
        )
        for line in moves:
            m = line.movement
            assert m is not None
            fee = _money(_line_fee_cents(m.fee)) if m.by_card else ""
            charged = _money(_line_fee_cents(m.charged)) if m.by_card else ""
            body.append(
                f"<tr><td>{_e(m.created_at.astimezone(zone).strftime('%Y-%m-%d'))}</td>"
                f"<td>{_e(line.description)}"
                f"{' <span class=muted>by ' + _e(m.actor) + '</span>' if m.actor else ''}</td>"
                f'<td class="num">{fee}</td><td class="num">{charged}</td>'
                f'<td class="num">{_money(line.cents)}</td></tr>'
            )
        body.append("</tbody></table>")
    body.append(_usage_table("Usage", [li for li in printed if li.section is Section.USAGE], -1))
    byok = [line for line in printed if line.section is Section.BYOK]
    if byok:
        body.append(
            _usage_table(
                "Bring your own key (notional provider cost; $0.00 charged, fee waived)", byok, 1
            )
        )
    if st.late_events:
        body.append(
            f'<p class="note">{st.late_events} usage events that occurred before this period were '
            "recorded in it and are billed here (usage belongs to the period it was debited "
            "in).</p>"
        )
    body.append(
        '<p class="note">Amounts are exact to 12 decimal places internally and printed in cents, '
        "rounded half to even with the remainder carried from line to line, so the printed "
        "lines add up to the printed totals.</p>"
    )
    title = f"Statement {st.period} {st.account_id}"
    return _page(title, header, heading, "".join(body))


def _version_label(when: datetime) -> str:
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%d" if utc.time() == time.min else "%Y-%m-%d %H:%M UTC")


def _usage_table(title: str, lines: list[Any], sign: int) -> str:
    out = [
        f"<h2>{_e(title)}</h2><table><thead><tr><th>Model</th><th>Provider</th><th>Class</th>"
        '<th>Price from</th><th class="num">Quantity</th><th class="num">Unit price</th>'
        '<th class="num">Amount</th></tr></thead><tbody>'
    ]
    for line in lines:
        u = line.usage
        unit = f"${format_usd(u.unit_price)} / {u.per:,}" if u.unit_price is not None else ""
        out.append(
            f"<tr><td>{_e(u.model)}</td><td>{_e(u.provider)}</td><td>{_e(u.billable_class)}</td>"
            f"<td>{_e(_version_label(u.price_effective_from))}</td>"
            f'<td class="num">{u.quantity:,}</td><td class="num">{_e(unit)}</td>'
            f'<td class="num">{_money(sign * line.cents)}</td></tr>'
        )
    total = sum(line.cents for line in lines) * sign
    out.append(
        f'<tr class="total"><td colspan="6">Total</td><td class="num">{_money(total)}</td></tr>'
        "</tbody></table>"
    )
    return "".join(out)


# --- one statement, any format ----------------------------------------------------------------
def statement_bytes(st: Statement, fmt: str, header: InvoiceHeader | None = None) -> bytes:
    """One statement as one document (the form an invoice stores)."""
    fixed_time = header.issued_at if header else st.period_end
    if fmt == Format.HTML:
        return statement_html(st, header)
    if fmt == Format.CSV:
        return csv_bytes(line_records(st), LINE_COLUMNS)
    if fmt == Format.PARQUET:
        return parquet_bytes(line_records(st), LINE_COLUMNS)
    if fmt == Format.XLSX:
        return xlsx_bytes([st], fixed_time, f"Statement {st.period} {st.account_id}")
    raise ValueError(f"unknown format {fmt!r}")


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(account_id: str) -> str:
    """A file-name-safe form of an account id (a hash suffix keeps it unique when changed)."""
    cleaned = _SAFE.sub("_", account_id)
    if cleaned == account_id:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(account_id.encode()).hexdigest()[:8]}"


# --- many statements into files, memory bounded -----------------------------------------------
class StatementSink:
    """Writes statements one at a time into the files of one format; ``close`` returns them."""

    def __init__(self, fmt: str, out_dir: Path, stem: str, fixed_time: datetime) -> None:
        if fmt not in Format.ALL:
            raise ValueError(f"format must be one of {', '.join(Format.ALL)}")
        self.fmt, self.out_dir, self.stem = fmt, out_dir, stem
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self._pending: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        if fmt == Format.CSV:
            self._summary_csv = (out_dir / f"{stem}-summary.csv").open("w", newline="")
            self._lines_csv = (out_dir / f"{stem}-lines.csv").open("w", newline="")
            _write_csv(self._summary_csv, [], SUMMARY_COLUMNS, header=True)
            _write_csv(self._lines_csv, [], LINE_COLUMNS, header=True)
            self.files += [Path(self._summary_csv.name), Path(self._lines_csv.name)]
        elif fmt == Format.PARQUET:
            paths = (out_dir / f"{stem}-summary.parquet", out_dir / f"{stem}-lines.parquet")
            self._pq = (
                pq.ParquetWriter(paths[0], arrow_schema(SUMMARY_COLUMNS), compression="zstd"),
                pq.ParquetWriter(paths[1], arrow_schema(LINE_COLUMNS), compression="zstd"),
            )
            self.files += list(paths)
        elif fmt == Format.XLSX:
            self._book = XlsxBook(fixed_time, stem)
            self.files.append(out_dir / f"{stem}.xlsx")

    BUFFER_ROWS = 20_000

    def add(self, st: Statement) -> None:
        if self.fmt == Format.CSV:
            _write_csv(self._summary_csv, [summary_record(st)], SUMMARY_COLUMNS, header=False)
            _write_csv(self._lines_csv, line_records(st), LINE_COLUMNS, header=False)
        elif self.fmt == Format.PARQUET:
            self._pending[0].append(summary_record(st))
            self._pending[1].extend(line_records(st))
            if len(self._pending[1]) >= self.BUFFER_ROWS:
                self._flush_parquet()
        elif self.fmt == Format.XLSX:
            self._book.add(st)
        else:
            path = self.out_dir / f"statement-{st.period}-{safe_name(st.account_id)}.html"
            path.write_bytes(statement_html(st))
            self.files.append(path)

    def _flush_parquet(self) -> None:
        summary, lines = self._pending
        if summary:
            self._pq[0].write_table(arrow_table(summary, SUMMARY_COLUMNS))
        if lines:
            self._pq[1].write_table(arrow_table(lines, LINE_COLUMNS))
        summary.clear()
        lines.clear()

    def close(self) -> list[Path]:
        if self.fmt == Format.CSV:
            self._summary_csv.close()
            self._lines_csv.close()
        elif self.fmt == Format.PARQUET:
            self._flush_parquet()
            for writer in self._pq:
                writer.close()
        elif self.fmt == Format.XLSX:
            with self.files[0].open("wb") as target:
                self._book.write(target)
        return self.files


# --- top-up receipt ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Receipt:
    """A succeeded top-up as its receipt shows it: credit, the 5% platform fee, amount charged."""

    topup_id: str
    account_id: str
    account_name: str | None
    credit: Decimal
    fee: Decimal
    charged: Decimal
    currency: str
    succeeded_at: datetime
    payment_reference: str | None


def receipt_html(receipt: Receipt, header: InvoiceHeader) -> bytes:
    """The receipt of one top-up; credit + fee = charged, all whole cents already."""
    heading = (
        f"<h1>Receipt</h1><div>Account <strong>{_e(receipt.account_id)}</strong>"
        f"{' (' + _e(receipt.account_name) + ')' if receipt.account_name else ''}</div>"
        f'<div class="muted">Top-up {_e(receipt.topup_id)}, paid '
        f"{_e(receipt.succeeded_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC'))}</div>"
    )
    rows = [
        ("Wallet credit", to_cents(receipt.credit)),
        ("Platform fee (5%)", to_cents(receipt.fee)),
    ]
    body = (
        '<h2>Payment</h2><table><thead><tr><th>Item</th><th class="num">Amount</th></tr>'
        "</thead><tbody>"
        + "".join(f'<tr><td>{_e(k)}</td><td class="num">{_money(c)}</td></tr>' for k, c in rows)
        + f'<tr class="total"><td>Total charged ({_e(receipt.currency)})</td>'
        f'<td class="num">{_money(to_cents(receipt.charged))}</td></tr></tbody></table>'
        + (
            f'<p class="note">Payment reference {_e(receipt.payment_reference)}</p>'
            if receipt.payment_reference
            else ""
        )
    )
    return _page(f"Receipt {receipt.topup_id}", header, heading, body)
