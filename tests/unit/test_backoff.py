"""Retry delays: exponential, capped, jittered, never a tight loop."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from billing.backoff import Backoff


@given(
    start=st.floats(0.01, 2),
    cap=st.floats(2, 60),
    failures=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_each_delay_is_between_half_and_all_of_the_capped_exponential_step(
    start: float, cap: float, failures: int, seed: int
) -> None:
    backoff = Backoff(start, cap, rng=random.Random(seed))
    for n in range(failures):
        step = min(cap, start * 2**n)
        delay = backoff.next_delay()
        assert step / 2 <= delay <= step
        assert delay >= start / 2  # never spins, however many failures
        assert delay <= cap


def test_delays_grow_then_stay_at_the_cap_and_reset_after_a_success() -> None:
    backoff = Backoff(0.2, 10.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert delays[0] <= 0.2 and delays[5] >= 3.2  # 0.2 * 2**5 / 2
    assert all(5.0 <= d <= 10.0 for d in delays[7:])
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_jitter_spreads_a_fleet_that_failed_together() -> None:
    fleet = [Backoff(0.2, 10.0, rng=random.Random(seed)) for seed in range(20)]
    third = [[b.next_delay() for _ in range(3)][-1] for b in fleet]
    assert len({round(d, 3) for d in third}) > 15
