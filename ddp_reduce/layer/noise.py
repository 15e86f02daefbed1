"""The gradient noise scale B_simple = tr(Σ) / |G|², estimated online (its exact values, for
checking it, are :mod:`ddp_reduce.analysis.noise_truth`).

Data parallelism measures the gradient at two batch sizes every step for free (docs/design.md §3):
B_small items in one rank's own gradient, read in the communication hook before the all-reduce,
and B_big = N items in the reduced gradient. In c = 1 units (mean gradients):

    E|G_B|² = |G|² + tr(Σ)/B   for a batch of B items, so from the two sizes
    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

with |G_small|² averaged over ranks. Each estimate is unbiased but very noisy; their ratio per
step is biased, so the numerator and the denominator are smoothed separately (bias-corrected
exponential moving averages) and only then divided.

The batches here are drawn *without replacement* from n training items, for which
E|G_B|² = |G|² + tr(Σ)·(n − B)/(B·(n − 1)) exactly (Σ normalized by n). With n known the
estimator uses that coefficient in place of 1/B; it matters: the plain formulas underestimate |G|²
by tr(Σ)/(n − 1), which is B_simple/(n − 1) of it (7% for B_simple = 100 on digits' 1438 items).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

NOISE_BETA = 0.95  # the default smoothing of the numerator and the denominator


class NoiseSteps(Enum):
    """Which steps give their two batch sizes to the estimate.

    Reading a rank's own gradient norm costs a pass over the gradient and a longer bucket in
    the reduction; on a small, communication-bound model that is several percent of a step.
    ``logged`` pays it on logged steps only (``log=True``): the estimate then averages
    ``1/(1 - beta)`` logged steps instead of as many consecutive ones, a longer stretch of
    training, and is as unbiased.
    """

    every = "every"  # every optimizer step
    logged = "logged"  # the steps planned with log=True only


class NoiseSource(Enum):
    """Where a step's smaller batch comes from."""

    ranks = "ranks"  # each rank's own gradient (W >= 2), read in the communication hook
    micro = "micro"  # the first micro-batch's gradient (one rank, A >= 2)


def noise_source(
    enabled: bool, world_size: int, accum_steps: int, ranks_visible: bool
) -> tuple[NoiseSource | None, str | None]:
    """The smaller batch of the noise-scale estimate, or why there is none.

    ``ranks_visible``: the reduction sees each rank's own gradient (not DDP's own path).
    """
    if not enabled:
        return None, "noise.enabled=false"
    if world_size >= 2 and ranks_visible:
        return NoiseSource.ranks, None
    if accum_steps >= 2:
        return NoiseSource.micro, None
    if world_size >= 2:
        return None, "reduce.impl=builtin hides the per-rank gradient, and A = 1"
    return None, "one batch size only: needs W >= 2 or train.accum_steps >= 2"


@dataclass
class NoiseEstimate:
    grad_sq: float  # |G|², smoothed
    trace_sigma: float  # tr(Σ), smoothed
    b_simple: float | None  # tr(Σ)/|G|², None while |G|² is not positive


class NoiseScaleEstimator:
    def __init__(self, beta: float, population: int | None = None):
        """``population``: the n items batches are drawn from without replacement (None: i.i.d.)."""
        self.beta = beta
        self.population = population
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0  # 1 − β^t, for the bias correction

    def update(self, b_small: float, b_big: float, small_sq: float, big_sq: float) -> NoiseEstimate:
        """One step: mean gradients' squared norms (c = 1 units) at batch sizes b_small < b_big."""
        f_small, f_big = self._coefficient(b_small), self._coefficient(b_big)
        trace = (small_sq - big_sq) / (f_small - f_big)
        grad_sq = (f_small * big_sq - f_big * small_sq) / (f_small - f_big)
        self._grad_sq = self.beta * self._grad_sq + (1 - self.beta) * grad_sq
        self._trace = self.beta * self._trace + (1 - self.beta) * trace
        self._weight = self.beta * self._weight + (1 - self.beta)
        return self.estimate()

    def _coefficient(self, batch: float) -> float:
        """E|G_B|² = |G|² + tr(Σ)·coefficient(B)."""
        n = self.population
        return 1.0 / batch if n is None else (n - batch) / (batch * (n - 1))

    @property
    def empty(self) -> bool:
        """No step added yet (nothing to estimate from)."""
        return self._weight == 0

    def estimate(self) -> NoiseEstimate:
        g = self._grad_sq / self._weight
        t = self._trace / self._weight
        return NoiseEstimate(g, t, t / g if g > 0 else None)

    def state_dict(self) -> dict[str, float]:
        return {"grad_sq": self._grad_sq, "trace": self._trace, "weight": self._weight}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._grad_sq, self._trace, self._weight = state["grad_sq"], state["trace"], state["weight"]
