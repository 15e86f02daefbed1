"""What the layer refuses because it would be silently wrong: item counts that are not counts,
counts that contradict each other or the ranks, and a step whose forward runs on no plan (or on
the last step's).

Each check raises where the value enters, naming the argument, its value and what is allowed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ALLOWED_COUNT = "a whole number >= 0 (items: samples, or tokens, of this rank)"


def item_count(name: str, value: object) -> int:
    """``value`` as an item count: an int (or an integer tensor of one element) >= 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: allowed {ALLOWED_COUNT}")
    try:
        n = operator.index(value)  # int, numpy ints; refuses 2.5, NaN, "3"
    except TypeError:
        shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
        raise ValueError(f"{name}={shown}: allowed {ALLOWED_COUNT}") from None
    if n < 0:
        raise ValueError(f"{name}={n}: allowed {ALLOWED_COUNT}")
    return n


def check_counts(
    micro_items: Sequence[object],
    counts: Sequence[object] | None,
    global_items: object | None,
    world_size: int,
    rank: int,
) -> tuple[list[int], list[int] | None, int | None]:
    """The step's counts, validated: (micro_items, counts, global_items) as ints.

    ``counts[rank]`` must be this rank's own total; ``global_items`` at least that; a step
    whose total is known to be zero has nothing to average.
    """
    micro = [item_count("local_items", m) for m in micro_items]
    local = sum(micro)
    if counts is not None:
        counts = [item_count(f"counts[{r}]", n) for r, n in enumerate(counts)]
        if len(counts) != world_size:
            raise ValueError(
                f"counts= has {len(counts)} entries: allowed one per rank ({world_size})"
            )
        if counts[rank] != local:
            raise ValueError(
                f"counts[{rank}]={counts[rank]} but local_items={local} on rank {rank}: "
                "counts= must hold every rank's own item count of the step"
            )
    if global_items is not None:
        global_items = item_count("global_items", global_items)
        if global_items < local:
            raise ValueError(
                f"global_items={global_items} < local_items={local} on rank {rank}: "
                "allowed the total over all ranks, at least this rank's own count"
            )
    total = sum(counts) if counts is not None else global_items
    if total is None and world_size == 1:
        total = local
    if total == 0:
        raise ValueError(
            "this step has no items on any rank (global total 0): nothing to average; "
            "skip the step instead of planning it"
        )
    return micro, counts, global_items


def check_total(total: float) -> None:
    """The all-reduced total of a step whose counts were not given."""
    if total == 0:
        raise ValueError(
            "this step has no items on any rank (the all-reduced total is 0): nothing to "
            "average; skip the step instead of planning it"
        )


def check_agreement(rank: int, claimed: int, sums: list[float], world_size: int) -> None:
    """``sums``: [Σ n, Σ T, Σ T²] over the ranks of their own count n and the total T each one
    claimed (``counts=`` or ``global_items=``). Every claim equals Σ n iff Σ T = W·Σ n and
    Σ T² = W·(Σ n)²; the sums are the same on every rank, so every rank raises together."""
    total, claims, claims_sq = sums
    if claims == world_size * total and claims_sq == world_size * total * total:
        return
    raise ValueError(
        f"the ranks' counts= (or global_items=) disagree: rank {rank} claimed a step total of "
        f"{claimed}, the ranks hold {int(total)} items (mean claim {claims / world_size:g}); "
        "every rank must pass the same counts=, each with its own count at its rank"
    )


def syncs_gradients(module: nn.Module, units: Sequence[nn.Module] = ()) -> bool:
    """Whether the backward of a forward run now reduces the gradients: DDP outside
    ``no_sync``; FSDP2 (``units``: its fully_shard modules) with its gradient sync on."""
    if isinstance(module, DDP):
        return bool(module.require_backward_grad_sync)
    groups = [g for unit in units for g in unit._get_fsdp_state()._fsdp_param_groups]
    return all(g.reduce_grads for g in groups)


NO_PLAN = (
    "a training forward ran on a model with the reduction layer attached but no plan for the "
    "step: call reducer.loss_scale(local_items) once per optimizer step before its first "
    "forward (or reducer.add_items(n) before each micro-batch's); without it {what}"
)
