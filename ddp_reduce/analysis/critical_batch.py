"""McCandlish et al.'s (2018) steps/examples trade-off: training to a fixed loss at batch N takes
S steps and E = N·S examples, with (S/S_min − 1)(E/E_min − 1) = 1, which is S = S_min(1 + B/N)
and E = E_min(1 + N/B) with the critical batch B_crit = E_min/S_min.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

B_RANGE = (1e-2, 1e6)  # where the fit looks for B_crit


@dataclass(frozen=True)
class Tradeoff:
    s_min: float  # steps with an unbounded batch
    b_crit: float  # E_min / S_min
    rms_log: float  # root mean square residual of log S
    n: int  # points fitted
    at_bound: bool  # B_crit at an end of B_RANGE: not constrained by the points

    @property
    def e_min(self) -> float:  # examples with a batch of one
        return self.s_min * self.b_crit

    def steps(self, n: float) -> float:
        return self.s_min * (1 + self.b_crit / n)

    def examples(self, n: float) -> float:
        return n * self.steps(n)


def _sse(log_b: float, points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Sum of squared log residuals at B = exp(log_b), with log S_min in closed form."""
    b = math.exp(log_b)
    logs = [math.log(s) - math.log1p(b / n) for n, s in points]
    log_s_min = sum(logs) / len(logs)
    return sum((v - log_s_min) ** 2 for v in logs), log_s_min


def fit_tradeoff(points: Sequence[tuple[float, float]]) -> Tradeoff | None:
    """Fit S(N) = S_min(1 + B_crit/N) to (N, S) points by least squares in log S (the steps span
    decades; a relative error per point): a scan over log B, then scipy's bounded Brent search
    around the best scanned point. None with fewer than two distinct N."""
    from scipy.optimize import minimize_scalar

    points = [(float(n), float(s)) for n, s in points]
    if len({n for n, _ in points}) < 2 or any(s <= 0 or n <= 0 for n, s in points):
        return None
    lo, hi = (math.log(v) for v in B_RANGE)
    grid = [lo + (hi - lo) * k / 400 for k in range(401)]
    k = min(range(len(grid)), key=lambda i: _sse(grid[i], points)[0])
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    best = minimize_scalar(lambda x: _sse(x, points)[0], bounds=(a, b), method="bounded")
    log_b = float(best.x) if best.fun <= _sse(grid[k], points)[0] else grid[k]
    sse, log_s_min = _sse(log_b, points)
    at_bound = k in (0, len(grid) - 1)
    return Tradeoff(
        math.exp(log_s_min), math.exp(log_b), math.sqrt(sse / len(points)), len(points), at_bound
    )
