"""bench.throughput's options: --rounds takes each round's ratio within the round, then averages;
--hot-set / hot= places the Zipf hot set's busiest accounts in the lock order; --load-curve takes
fractions of the rate and prints them beside the half-rate phase."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime

import pytest

from bench.throughput import (
    HOT_SETS,
    LoadPoint,
    Result,
    parse_fractions,
    parse_variant,
    print_load_curves,
    print_rounds,
    ranked_accounts,
)
from billing.catalog import DEFAULT_CATALOG, Catalog, read_catalog_file
from billing.synthetic import TrafficShape, generate


def result(group: str, accounts: int, round_: int, rate: float) -> Result:
    return Result(
        scenario=f"{group}@{accounts}#{round_}",
        events=1,
        rate=rate,
        group=group,
        accounts=accounts,
        round=round_,
    )


def test_each_round_is_compared_with_the_first_count_of_the_same_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a slow second round: across rounds the 10,000 rows would read 50% and 150%
    print_rounds(
        [
            result("envelope100", 1_000, 1, 40_000),
            result("envelope100", 10_000, 1, 36_000),
            result("envelope100", 1_000, 2, 20_000),
            result("envelope100", 10_000, 2, 19_000),
        ]
    )
    out = capsys.readouterr().out
    assert "round 1  1,000: 40,000  10,000: 36,000 (90%)" in out
    assert "round 2  1,000: 20,000  10,000: 19,000 (95%)" in out
    assert "10,000 accounts: 92.5% of the rate (rounds 90%-95%)" in out


def test_one_round_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    print_rounds([result("single", 1_000, 1, 10_000), result("single", 10_000, 1, 9_000)])
    assert capsys.readouterr().out == ""


def test_a_variant_can_scatter_the_hot_set() -> None:
    assert parse_variant("s:hot=scattered").hot_set == "scattered"
    assert parse_variant("w3:workers=3").hot_set is None
    with pytest.raises(SystemExit):
        parse_variant("s:hot=middle")


def test_a_variant_can_choose_how_the_simulated_gateway_writes() -> None:
    assert parse_variant("old:gateway=pyamqp").gateway == "pyamqp"
    assert parse_variant("w3:workers=3").gateway is None
    with pytest.raises(SystemExit):
        parse_variant("k:gateway=kombu")


def test_the_scattered_hot_set_is_a_seeded_shuffle_of_the_same_accounts() -> None:
    accounts = [f"acct-{i:05d}" for i in range(1_000)]
    scattered = ranked_accounts(accounts, "scattered")
    assert ranked_accounts(accounts, "first") == accounts
    assert sorted(scattered) == accounts
    assert scattered == ranked_accounts(accounts, "scattered")  # every scenario of the run
    assert scattered[:10] != accounts[:10]  # the busiest are not the first locked


def test_the_generator_gives_the_most_traffic_to_the_first_account_of_the_ranking() -> None:
    # the premise of --hot-set: the traffic falls off along the list the generator is given
    catalog = Catalog.of(read_catalog_file(DEFAULT_CATALOG))
    accounts = [f"acct-{i:05d}" for i in range(1_000)]
    for hot_set in HOT_SETS:
        ranked = ranked_accounts(accounts, hot_set)
        events = generate(
            catalog,
            TrafficShape(accounts=ranked),
            5_000,
            seed=1,
            now=datetime(2026, 11, 1, tzinfo=UTC),
            prefix="hot",
        )
        busiest = [a for a, _ in Counter(e.account_id for e in events).most_common(2)]
        assert busiest == ranked[:2], hot_set


def test_load_curve_fractions_are_parsed_and_bounded() -> None:
    assert parse_fractions("0.3,0.4,0.6") == (0.3, 0.4, 0.6)
    for bad in ("", "0", "0.3,2", "half", "0.3,,0.4", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="fractions of the rate"):
            parse_fractions(bad)


def test_load_curve_prints_the_half_rate_phase_among_the_others_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = Result(scenario="single", events=1, rate=20_000, p50_ms=180, p99_ms=480)
    r.latency_rate, r.latency_cpu = 10_000, (70, 25, 55, 40)
    r.load_curve = [
        LoadPoint(0.6, 12_000, 400, 2_100, (80, 26, 56, 36)),
        LoadPoint(0.3, 6_000, 90, 200, (40, 15, 35, 25)),
    ]
    print_load_curves([r, Result(scenario="sql", events=1, rate=50_000)])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("single"))
    assert line.index("30% (6,000/s): 90 / 200 (115%)") < line.index("50% (10,000/s): 180 / 480")
    assert line.index("50% (10,000/s): 180 / 480 (190%)") < line.index("60% (12,000/s)")
    assert "2,100 (198%)" in line
    assert not any(line.startswith("sql") for line in out.splitlines())
