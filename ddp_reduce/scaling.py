"""Batch-size scaling rules for the learning rate (and Adam's betas, eps): written once, used by a
run (``optim.lr_scaling``) and by ``ddp-reduce convert``. Imports no torch.

With k = N / N_base, the ratio of the new global batch to the one the hyperparameters were
tuned for:

    linear     lr·k                                          Goyal et al. 2017
    sqrt       lr·√k                                         Krizhevsky 2014; Hoffer et al. 2017
    adam_sqrt  lr·√k, each β → 1 − k(1 − β), ε → ε/√k         Malladi et al. 2022

They hold only below the critical batch size; none of them is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class LrScaling(Enum):
    """How lr (and Adam's betas, eps) follow the global batch N, from optim.base_batch_size."""

    none = "none"
    linear = "linear"
    sqrt = "sqrt"
    adam_sqrt = "adam_sqrt"


@dataclass(frozen=True)
class Scaled:
    """Hyperparameters once a scaling rule has met a global batch."""

    rule: str
    kappa: float  # k = N / N_base (1 without a rule)
    lr: float
    betas: tuple[float, float]
    eps: float


class ScalingError(ValueError):
    """A rule that cannot apply to this batch ratio (adam_sqrt pushing a beta below 0)."""


def scale(
    rule: LrScaling, kappa: float, lr: float, betas: tuple[float, float], eps: float
) -> Scaled:
    b1, b2 = betas
    if rule is LrScaling.none:
        return Scaled("none", 1.0, lr, (b1, b2), eps)
    if rule is LrScaling.linear:
        return Scaled("linear", kappa, lr * kappa, (b1, b2), eps)
    root = math.sqrt(kappa)
    if rule is LrScaling.sqrt:
        return Scaled("sqrt", kappa, lr * root, (b1, b2), eps)
    scaled_betas = (1 - kappa * (1 - b1), 1 - kappa * (1 - b2))
    if min(scaled_betas) < 0:
        raise ScalingError(
            f"a batch ratio k = {kappa:g} that keeps 1 - k(1 - beta) >= 0 for betas "
            f"{[b1, b2]} (here {list(scaled_betas)})"
        )
    return Scaled("adam_sqrt", kappa, lr * root, scaled_betas, eps / root)
