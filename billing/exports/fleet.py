"""Export every account's statement for a period (or one account's), memory bounded.

The aggregation runs in PostgreSQL (``statement_*`` queries); the rows are streamed through
server-side cursors and merged account by account (``iter_statements``), and each statement is
written out before the next is read (``StatementSink``). Memory therefore holds one account's
statement plus a writer buffer, however many usage events the period has. Everything is read in
one REPEATABLE READ snapshot, so the files are consistent with each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from billing.db import connect, queries
from billing.errors import UnknownAccount
from billing.exports.formats import StatementSink, safe_name
from billing.exports.statements import Period, iter_statements
from billing.money import EXACT, ZERO
from billing.settings import Settings

WORK_MEM = "64MB"
Progress = Callable[[int, int], None]
"""progress(done, total): called after each account is written."""


@dataclass(frozen=True)
class ExportResult:
    period: str
    format: str
    accounts: int
    files: tuple[Path, ...]
    opening: Decimal
    closing: Decimal
    usage: Decimal
    seconds: float


def export_period(
    settings: Settings,
    period: Period | str,
    fmt: str,
    out_dir: Path,
    account: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the period's statements in ``fmt`` to ``out_dir``; returns what was written."""
    started = time.monotonic()
    when = period if isinstance(period, Period) else Period.parse(period)
    end = when.next()
    stem = f"statements-{when}" if account is None else f"statement-{when}-{safe_name(account)}"
    q = queries(settings)
    opening = closing = usage = ZERO
    done = 0
    with connect(settings) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        # Room to hash-aggregate a month in memory (PostgreSQL spills to disk beyond it).
        conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")  # a constant, not input
        row = conn.execute(q["statement_count"], {"account": account}).fetchone()
        total = int(row[0]) if row else 0
        if account is not None and total == 0:
            raise UnknownAccount(f"no account {account!r}")
        sink = StatementSink(fmt, out_dir, stem, datetime(end.year, end.month, 1, tzinfo=UTC))
        for st in iter_statements(conn, q, when, account):
            sink.add(st)
            opening = EXACT.add(opening, st.opening)
            closing = EXACT.add(closing, st.closing)
            usage = EXACT.add(usage, st.usage_total)
            done += 1
            if progress is not None:
                progress(done, total)
        files = sink.close()
    return ExportResult(
        period=str(when),
        format=fmt,
        accounts=done,
        files=tuple(files),
        opening=opening,
        closing=closing,
        usage=usage,
        seconds=time.monotonic() - started,
    )
