"""Retry delays for transient failures: exponential, capped, jittered ("equal jitter").

The n-th consecutive failure waits ``d/2 + uniform(0, d/2)`` with ``d = min(cap, start * 2**n)``:
never less than half the exponential step (a failing database is not hammered: no spinning),
never more than the cap, and spread so that a fleet of workers that failed together does not
retry in lock-step. ``reset`` after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    start: float = 0.2
    cap: float = 10.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def step(self) -> float:
        """The un-jittered delay for the current failure count (the jitter's upper bound)."""
        return min(self.cap, self.start * 2.0 ** min(self.failures, 62))

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        d = self.step()
        self.failures += 1
        return d / 2 + self.rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.failures = 0
