"""Usage report for a period, per account or fleet-wide: tables (CSV) and charts (PNG).

* tokens and spend per day per model (``daily.csv``, ``tokens_per_day.png``, ``spend_per_day.png``);
* BYOK vs. billed share of events, tokens and priced amount (``byok_share.csv`` / ``.png``);
* top models by spend (``top_models.csv`` / ``.png``);
* latency per model and provider: p50/p95 time to first token, p50 latency, p50 throughput
  (``latency.csv`` / ``.png``), from the events' ``latency_ms`` and ``ttft_ms``;
* ``report.html`` shows them together.

The aggregation is SQL (one row per day, model and BYOK flag; one per model and provider for
latency), so the frames are small whatever the event count. Usage is assigned to days and to the
period by the time it was debited, like the statements, so report spend equals statement usage.
Money stays exact (Decimal) in the tables; charts plot floats, for display only.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd

from billing.db import connect, fetch_dicts, queries
from billing.exports.formats import spreadsheet_text
from billing.exports.statements import Period
from billing.money import format_usd, sum_exact
from billing.settings import Settings

TOP_MODELS = 10


@dataclass(frozen=True)
class UsageReport:
    period: str
    account: str | None
    daily: pd.DataFrame
    share: pd.DataFrame
    top_models: pd.DataFrame
    latency: pd.DataFrame

    @property
    def spend(self) -> Decimal:
        return sum_exact(self.daily["spend"]) if len(self.daily) else Decimal(0)


def build_report(settings: Settings, period: Period, account: str | None = None) -> UsageReport:
    q = queries(settings)
    params = period.params(account)
    with connect(settings) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        daily = pd.DataFrame(
            fetch_dicts(conn, q["report_daily"], params),
            columns=["day", "model", "byok", "events", "tokens", "spend", "priced"],
        )
        latency = pd.DataFrame(
            fetch_dicts(conn, q["report_latency"], params),
            columns=[
                "model",
                "provider",
                "events",
                "with_ttft",
                "ttft_p50_ms",
                "ttft_p95_ms",
                "latency_p50_ms",
                "throughput_p50_tps",
            ],
        )
    for column in ("events", "tokens"):  # SQL sums of bigint arrive as numeric
        daily[column] = daily[column].map(int).astype("int64")
    latency["events"] = latency["events"].map(int).astype("int64")
    return UsageReport(
        str(period), account, daily, _share(daily), _top_models(daily), _floats(latency)
    )


def _floats(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "throughput_p50_tps"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float).round(1)
    return frame


def _share(daily: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for byok in (False, True):
        part = daily[daily["byok"] == byok]
        rows.append(
            {
                "traffic": "byok" if byok else "billed",
                "events": int(part["events"].sum()),
                "tokens": int(part["tokens"].sum()),
                "priced": sum_exact(part["priced"]),  # BYOK: notional provider cost
                "charged": sum_exact(part["spend"]),
            }
        )
    share = pd.DataFrame(rows)
    total_tokens = share["tokens"].sum()
    share["token_share"] = (share["tokens"] / total_tokens).round(4) if total_tokens else 0.0
    return share


def _top_models(daily: pd.DataFrame) -> pd.DataFrame:
    if daily.empty:
        return pd.DataFrame(columns=["model", "events", "tokens", "spend"])
    grouped = daily.groupby("model", sort=True).agg(
        events=("events", "sum"), tokens=("tokens", "sum"), spend=("spend", sum_exact)
    )
    grouped = grouped.reset_index()
    grouped["spend_sort"] = grouped["spend"].map(float)
    top = grouped.sort_values(["spend_sort", "tokens", "model"], ascending=[False, False, True])
    return top.drop(columns="spend_sort").head(TOP_MODELS).reset_index(drop=True)


def _csv(frame: pd.DataFrame, path: Path) -> None:
    out = frame.copy()
    for column in out.columns:
        if len(out) and isinstance(out[column].iloc[0], Decimal):
            out[column] = out[column].map(format_usd)
        elif len(out) and isinstance(out[column].iloc[0], str):  # model and provider names
            out[column] = out[column].map(spreadsheet_text)
    out.to_csv(path, index=False)


def write_report(report: UsageReport, out_dir: Path) -> list[Path]:
    """Write the tables, the charts and report.html; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for name, frame in (
        ("daily", report.daily),
        ("byok_share", report.share),
        ("top_models", report.top_models),
        ("latency", report.latency),
    ):
        path = out_dir / f"{name}.csv"
        _csv(frame, path)
        files.append(path)

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        files.append(path)

    top = list(report.top_models["model"])
    daily = report.daily.copy()
    daily["model"] = daily["model"].where(daily["model"].isin(top[:8]), "other")
    daily["spend_f"] = daily["spend"].map(float)
    for column, name, label in (
        ("tokens", "tokens_per_day", "tokens"),
        ("spend_f", "spend_per_day", "USD charged"),
    ):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        if not daily.empty:
            pivot = daily.pivot_table(
                index="day", columns="model", values=column, aggfunc="sum", fill_value=0
            )
            pivot.plot(kind="bar", stacked=True, ax=ax, width=0.85)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
            ax.set_xticklabels([str(d)[5:] for d in pivot.index], rotation=90, fontsize=7)
        ax.set_title(f"{label} per day per model, {report.period}")
        ax.set_ylabel(label)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(5, 4))
    if report.share["tokens"].sum():
        ax.pie(report.share["tokens"], labels=list(report.share["traffic"]), autopct="%1.1f%%")
    ax.set_title("BYOK vs billed (tokens)")
    save(fig, "byok_share")

    fig, ax = plt.subplots(figsize=(8, 4))
    if not report.top_models.empty:
        ax.barh(report.top_models["model"][::-1], report.top_models["spend"][::-1].map(float))
    ax.set_title(f"Top models by spend, {report.period}")
    ax.set_xlabel("USD charged")
    save(fig, "top_models")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if not report.latency.empty:
        labels = report.latency["model"] + " / " + report.latency["provider"]
        axes[0].barh(labels, report.latency["ttft_p50_ms"].fillna(0))
        axes[0].set_title("p50 time to first token (ms)")
        axes[1].barh(labels, report.latency["throughput_p50_tps"].fillna(0))
        axes[1].set_title("p50 throughput (output tokens/s)")
        for ax in axes:
            ax.tick_params(axis="y", labelsize=7)
    save(fig, "latency")

    page = out_dir / "report.html"
    page.write_text(_html(report, [f for f in files if f.suffix == ".png"]))
    files.append(page)
    return files


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(format_usd(v) if isinstance(v, Decimal) else str(v))}</td>"
            for v in row
        )
        + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(report: UsageReport, charts: list[Path]) -> str:
    scope = f"account {report.account}" if report.account else "all accounts"
    images = "".join(f'<p><img src="{html.escape(p.name)}" alt="{p.stem}"></p>' for p in charts)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Usage report {html.escape(report.period)}</title><style>"
        "body{font:10pt Arial,sans-serif;margin:16px}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
        f"</style></head><body><h1>Usage report {html.escape(report.period)}, "
        f"{html.escape(scope)}</h1><p>Total charged: ${format_usd(report.spend)}</p>"
        f"<h2>BYOK vs billed</h2>{_table(report.share)}"
        f"<h2>Top models</h2>{_table(report.top_models)}"
        f"<h2>Latency</h2>{_table(report.latency)}{images}</body></html>\n"
    )
