"""The c the optimizer really received, measured rather than planned.

On a step the caller chooses (the first, logged ones), after the backward and before the
optimizer: the mean gradient G of the step's items on every rank is computed again, through
``torch.func`` on the step's weights (``.grad`` and the reduction are not touched), the ranks'
sums and counts combined in one all-reduce (float64). The received gradient r is then compared
with G: c = <r, G>/|G|² (least squares) and the residual |r - c·G|/|r|, which is 0 where the
optimizer received exactly c·G.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# The measured c agrees with the stated one within this (relative), and the residual is below
# it: what a float32 reduction of a small model reaches (its rounding is ~1e-7 per value);
# a gradient that travels in bf16/fp16 rounds to ~1e-3, so the comm dtype's own tolerance
# is used there.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}

# LossFn: (forward, batch) -> (the batch's summed loss, its item count); ``forward`` is the
# model's forward on the step's weights
LossFn = Callable[[Callable[..., Any], Any], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Measured:
    c: float  # <r, G>/|G|²: the c the optimizer received
    residual: float  # |r - c·G| / |r|
    items: int  # all ranks' items the measurement saw


def mean_gradient(
    module: nn.Module, loss_fn: LossFn, batches: Iterable[Any], group: Any
) -> tuple[torch.Tensor, int]:
    """G over every rank's ``batches`` (float64, flat over the trainable parameters in order)
    and the item count it averages, through ``torch.func`` on ``module``'s current weights."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    # buffers copied: a batch norm's running statistics must not move for a measurement
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    batches = list(batches)

    def summed(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(module, (weights, buffers), args, kwargs)

        total, items = None, 0
        for batch in batches:
            loss, n = loss_fn(forward, batch)
            total = loss.float() if total is None else total + loss.float()
            items += int(n)
        if total is None:
            raise ValueError("measure(): no batches given")
        return total, torch.tensor(float(items))

    grads, items = torch.func.grad(summed, has_aux=True)(params)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    flat = torch.cat([grads[n].flatten().double() for n in names] + [items.double().view(1)])
    flat = flat.to(device)
    dist.all_reduce(flat, group=group)  # the ranks' summed gradients and their counts, at once
    total = float(flat[-1])
    if total == 0:
        raise ValueError("measure(): the batches hold no items on any rank")
    return flat[:-1] / total, int(total)


def compare(received: torch.Tensor, mean: torch.Tensor, items: int) -> Measured:
    """The c and residual of ``received`` against the mean gradient ``mean`` (both flat)."""
    r, g = received.double(), mean.double()
    gg = float(g.dot(g))
    c = float(r.dot(g)) / gg if gg > 0 else math.nan
    rn = float(r.norm())
    residual = float((r - c * g).norm()) / rn if rn > 0 else math.nan
    return Measured(c, residual, items)


def received_gradient(params: list[torch.Tensor]) -> torch.Tensor:
    """The reduced gradient the optimizer will read (whole: an FSDP shard is gathered)."""
    parts = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        parts.append(g.flatten().double())
    return torch.cat(parts)


def likely_cause(stated: float, measured: Measured, exact: bool, tol: float) -> str | None:
    """Why the measured c is not the stated one, or None where they agree."""
    ratio = measured.c / stated
    off = abs(ratio - 1) > tol
    bent = exact and measured.residual > tol
    if not (off or bent) or math.isnan(ratio):
        return None if not math.isnan(ratio) else "the received gradient is zero or not finite"
    said = (
        f"the optimizer received c = {measured.c:.6g} (residual {measured.residual:.2e}) "
        f"where the layer stated c = {stated:.6g}"
    )
    k = round(1 / ratio) if ratio < 1 else round(ratio)
    if not bent and k >= 2 and abs((ratio if ratio > 1 else 1 / ratio) - k) < tol * k:
        if ratio < 1:
            return (
                f"{said}: 1/{k} of it, something divides the loss by {k} (a framework's "
                "gradient accumulation: Accelerate's gradient_accumulation_steps, Lightning's "
                f"accumulate_grad_batches; use ddp_reduce.integrations or reducer.undo = {k})"
            )
        return (
            f"{said}: {k} times it (a second division removed, or the loss scale applied {k} times)"
        )
    return (
        f"{said}: the received gradient is not the stated multiple of G (a loss scaled per "
        "micro-batch instead of once per step: count per micro-batch with add_items; a "
        "loss that is not a sum over items; items left out of the measurement; randomness "
        "such as dropout in the forward)"
    )


def warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
