"""One interval implementation for the whole analysis: the median of some samples with a 95%
bootstrap interval (the benchmark's ratios, the studies' across-seed optima and fitted constants).

With few samples (three seeds) a bootstrap of the median spans nearly their whole range: the
interval is then the seeds' spread, which is what a reader should see.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    median: float
    low: float
    high: float
    n: int

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def holds(self, x: float) -> bool:
        return self.low <= x <= self.high

    def text(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


def _bounds(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    cut = round((1 - LEVEL) / 2 * len(values))
    return values[cut], values[len(values) - 1 - cut]


def median_interval(samples: Sequence[float], seed: int = 0) -> Interval:
    """Median with a 95% bootstrap interval (resampling the samples with replacement)."""
    if not samples:
        raise ValueError("no samples")
    rng = random.Random(seed)
    boot = [statistics.median(rng.choices(samples, k=len(samples))) for _ in range(RESAMPLES)]
    return Interval(statistics.median(samples), *_bounds(boot), len(samples))


def bootstrap(
    statistic: Callable[[list], float | None], groups: Sequence, seed: int = 0
) -> Interval | None:
    """``statistic`` of ``groups`` (one entry per seed, or per point) with a 95% bootstrap
    interval over resamples of the groups; resamples where it is undefined (None) are left out.
    None when the statistic of the groups themselves is undefined."""
    centre = statistic(list(groups))
    if centre is None:
        return None
    rng = random.Random(seed)
    boot = [statistic(rng.choices(list(groups), k=len(groups))) for _ in range(RESAMPLES)]
    boot = [b for b in boot if b is not None]
    if not boot:
        return Interval(centre, centre, centre, len(groups))
    return Interval(centre, *_bounds(boot), len(groups))
