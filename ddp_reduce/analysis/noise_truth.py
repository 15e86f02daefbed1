"""The gradient noise scale's exact values, to check the online estimate against
(:mod:`ddp_reduce.layer.noise`): |G|² and tr(Σ) over a whole split from per-item gradients
(torch.func), and the closed form for least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ddp_reduce.data import Batch, Split, Task
from ddp_reduce.models import loss_sums


@dataclass
class NoiseTruth:
    grad_sq: float
    trace_sigma: float

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq


def _per_item(model: nn.Module, task: Task):
    """A function of (params, x, y) giving every item's gradient (torch.func: vmap of grad),
    its parameters and buffers; per-sample tasks only."""
    if task is Task.lm:
        raise ValueError("per-item gradients work on per-sample tasks (digits, linear)")
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def item_loss(p, x, y):
        batch = Batch(x[None], y[None], None)
        out = functional_call(model, (p, buffers), (batch.x,))
        return loss_sums(task, out, batch)[0]

    return vmap(grad(item_loss), in_dims=(None, 0, 0)), params


def _chunks(model: nn.Module, task: Task, split: Split, chunk: int):
    """Per-item gradients of a split, chunk by chunk, flattened, in float64 (eval mode: per-sample
    gradients need per-sample forwards, so batch norm uses its running statistics)."""
    per_item, params = _per_item(model, task)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), chunk):
            x, y = split.x[start : start + chunk], split.y[start : start + chunk]
            g = per_item(params, x, y)
            yield torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1).double()
    finally:
        model.train(was_training)


def per_item_gradients(
    model: nn.Module, task: Task, split: Split, chunk: int = 256
) -> torch.Tensor:
    """Every item's gradient at the current weights: an items x parameters float64 matrix."""
    return torch.cat(list(_chunks(model, task, split, chunk)))


def exact_noise(model: nn.Module, task: Task, split: Split, chunk: int = 256) -> NoiseTruth:
    """|G|² and tr(Σ) over a whole split at the current weights, from per-item gradients.

    Σ is the covariance of the per-item gradients g_i (population normalization, 1/n), G their
    mean. Per-sample gradients come from torch.func (vmap over grad); for ``lm`` an item is a
    token, and the tokens of one sequence share a forward pass, so that task is not supported.
    """
    total = None
    total_sq = torch.zeros((), dtype=torch.float64)
    for flat in _chunks(model, task, split, chunk):
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq += flat.pow(2).sum()
    n = len(split)
    mean = total / n
    grad_sq = float(mean.pow(2).sum())
    return NoiseTruth(grad_sq, float(total_sq / n) - grad_sq)


def linear_noise(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: float) -> NoiseTruth:
    """Closed form for least squares, loss_i = ½(x_i·w + b − y_i)²: g_i = r_i·(x_i, 1)."""
    x = np.asarray(x, dtype=np.float64)
    r = x @ np.asarray(weight, dtype=np.float64) + bias - np.asarray(y, dtype=np.float64)
    features = np.hstack([x, np.ones((len(x), 1))])
    mean = features.T @ r / len(x)
    grad_sq = float(mean @ mean)
    second = float(np.mean(r**2 * (features**2).sum(1)))
    return NoiseTruth(grad_sq, second - grad_sq)
