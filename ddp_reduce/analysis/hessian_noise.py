"""The noise scale that McCandlish et al.'s prediction is about, B_noise = tr(HΣ)/(GᵀHG), next
to B_simple = tr(Σ)/|G|², from per-item gradients and Hessian-vector products (torch.func).

G is the mean of the per-item gradients g_i over a split, Σ their covariance (population
normalization, 1/n, as in :mod:`ddp_reduce.analysis.noise_truth`) and H the Hessian of the mean
loss. GᵀHG is one Hessian-vector product; tr(HΣ) = (1/n) Σ_i (g_i − G)ᵀ H (g_i − G) takes one
per item, so it may be estimated from a random subset of the items (its standard error stated).
Written here rather than taken from a library: torch.func gives the products, and no maintained
package computes this ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ddp_reduce.data import Batch, Split, Task
from ddp_reduce.models import loss_sums


@dataclass(frozen=True)
class HessianNoise:
    grad_sq: float  # |G|²
    trace_sigma: float  # tr(Σ)
    g_h_g: float  # GᵀHG
    trace_h_sigma: float  # tr(HΣ), exact or estimated from `sampled` items
    se_trace_h_sigma: float  # its standard error (0 when every item was used)
    items: int  # n
    sampled: int  # items whose (g_i − G)ᵀH(g_i − G) was computed

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq

    @property
    def b_noise(self) -> float:
        return self.trace_h_sigma / self.g_h_g


def _flat(params: dict[str, torch.Tensor]):
    """One vector for a dict of tensors, and the function that maps it back."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [math.prod(s) for s in shapes]
    vec = torch.cat([params[k].reshape(-1) for k in names])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, sizes)
        return {k: p.reshape(s) for k, p, s in zip(names, parts, shapes, strict=True)}

    return vec, unflat


def hessian_noise(
    item_loss: Callable[..., torch.Tensor],
    params: dict[str, torch.Tensor],
    data: tuple[torch.Tensor, ...],
    sample: int | None = None,
    chunk: int = 64,
    seed: int = 0,
) -> HessianNoise:
    """B_simple and B_noise of ``item_loss(params, *item)`` over the items of ``data`` (tensors
    whose first dimension runs over the items), at ``params``.

    ``sample``: how many items' (g_i − G)ᵀH(g_i − G) to compute (drawn without replacement,
    ``seed``); None computes every one (exact). ``chunk``: items or directions at a time.
    """
    from torch.func import grad, jvp, vmap

    vec, unflat = _flat({k: v.detach() for k, v in params.items()})
    n = len(data[0])

    def f(v, *item):
        return item_loss(unflat(v), *item)

    per_item = vmap(grad(f), in_dims=(None, *([0] * len(data))))
    grads = torch.cat(
        [per_item(vec, *(d[s : s + chunk] for d in data)) for s in range(0, n, chunk)]
    )

    def mean_loss(v):
        return vmap(f, in_dims=(None, *([0] * len(data))))(v, *data).mean()

    def hvp(direction):
        return jvp(grad(mean_loss), (vec,), (direction,))[1]

    g = grads.double().mean(0)
    centred = grads.double() - g
    grad_sq = float(g @ g)
    trace_sigma = float(centred.pow(2).sum(1).mean())
    g_h_g = float(g @ hvp(g.to(vec.dtype)).double())
    rows = torch.arange(n)
    if sample is not None and sample < n:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
    quad = []
    for s in range(0, len(rows), chunk):
        d = centred[rows[s : s + chunk]]
        hd = vmap(hvp)(d.to(vec.dtype)).double()
        quad.append((d * hd).sum(1))
    q = torch.cat(quad)
    se = float(q.std() / math.sqrt(len(q))) if len(q) < n and len(q) > 1 else 0.0
    return HessianNoise(grad_sq, trace_sigma, g_h_g, float(q.mean()), se, n, len(q))


def model_hessian_noise(
    model: nn.Module, task: Task, split: Split, sample: int | None = None, seed: int = 0
) -> HessianNoise:
    """:func:`hessian_noise` of a model's per-item loss over a split, at its current weights (eval
    mode: per-item gradients need per-item forwards); per-sample tasks only."""
    if task is Task.lm:
        raise ValueError("per-item gradients work on per-sample tasks (digits, linear)")
    from torch.func import functional_call

    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def item_loss(p, x, y):
        batch = Batch(x[None], y[None], None)
        return loss_sums(task, functional_call(model, (p, buffers), (batch.x,)), batch)[0]

    was_training = model.training
    model.eval()
    try:
        params = dict(model.named_parameters())
        return hessian_noise(item_loss, params, (split.x, split.y), sample=sample, seed=seed)
    finally:
        model.train(was_training)
