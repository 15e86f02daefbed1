"""The reduction arithmetic: how per-item gradients become the gradient the optimizer receives.

Everything that depends on the choice "sum or mean" lives in this module, and nowhere else.

Notation (DESIGN §1): W ranks, b items per rank per micro-step, A micro-steps per optimizer step,
N = W·b·A items in the global batch. g_i is one item's gradient and G = (1/N)·Σ g_i the true mean
gradient of the global batch. An "item" is whatever the loss is a sum over: a sample, or a token.

Two independent switches decide what the optimizer receives:

* ``reduce.loss`` (inside a rank): the rank's objective for one optimizer step is the *sum* of its
  items' losses over all its micro-batches, multiplied by ``loss_scale``:
    - ``sum``:  loss_scale = 1                      -> the rank's gradient is Σ_local g_i
    - ``mean``: loss_scale = 1 / local_items_step   -> the rank's gradient is the local mean
  The divisor is the rank's item count of the *whole step* (all A micro-batches), never each
  micro-batch's own count: averaging each micro-batch and then dividing by A weights items of short
  micro-batches more (the 2024 accumulation bug).

* ``reduce.op`` (across ranks, in the DDP communication hook): all-reduce with SUM, then divide by
    - ``sum``:          1
    - ``mean``:         W                    (what DDP does when no hook is registered)
    - ``global_mean``:  global_items_step    (all-reduced item count; exact with unequal counts)

The optimizer receives c·G, where c follows from the two switches:

    loss  op            c (equal counts)    c (unequal counts)
    mean  mean          1                   none: a mean of means weights items unequally
    mean  sum           W                   none, for the same reason
    sum   mean          b·A                 N_t / W    (exact: a sum of sums divided by W)
    sum   sum           N                   N_t        (exact)
    sum   global_mean   1                   1          (exact)

``mean`` + ``global_mean`` is refused: dividing a sum of W local means by the global item count
gives W/N_t times a mean of means, a factor that nobody means to ask for.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist


# OmegaConf matches an Enum by member *name*, so the names are the user-facing values.
class LossReduction(Enum):
    sum = "sum"
    mean = "mean"


class ReduceOp(Enum):
    sum = "sum"
    mean = "mean"
    global_mean = "global_mean"


class ReduceImpl(Enum):
    """Where the all-reduce happens."""

    hook = "hook"  # a DDP communication hook: keeps DDP's buckets and its overlap with backward
    manual = "manual"  # all-reduce each gradient after backward (a reference for tests)
    builtin = "builtin"  # DDP with no hook: its own mean (op=mean only; a baseline for benchmarks)


def check_combination(loss: LossReduction, op: ReduceOp, impl: ReduceImpl) -> str | None:
    """Return why this combination is refused, or None when it is allowed."""
    if loss is LossReduction.mean and op is ReduceOp.global_mean:
        return (
            "reduce.loss=mean with reduce.op=global_mean divides a sum of per-rank means by the "
            "global item count; use reduce.loss=sum with reduce.op=global_mean for the exact "
            "count-weighted mean, or reduce.op=mean|sum with reduce.loss=mean"
        )
    if impl is ReduceImpl.builtin and op is not ReduceOp.mean:
        return (
            f"reduce.impl=builtin is DDP's own mean over ranks and cannot do reduce.op={op.name}; "
            "allowed with builtin: reduce.op=mean"
        )
    return None


def loss_scale(loss: LossReduction, local_items_step: int) -> float:
    """Factor applied to the rank's summed item losses (every micro-batch of the step).

    A rank with no items in the step (possible only for ragged batches) contributes nothing.
    """
    if loss is LossReduction.sum:
        return 1.0
    return 1.0 / local_items_step if local_items_step > 0 else 0.0


def reduce_divisor(op: ReduceOp, world_size: int, global_items_step: int) -> float:
    """What the all-reduced SUM of rank gradients is divided by."""
    if op is ReduceOp.sum:
        return 1.0
    if op is ReduceOp.mean:
        return float(world_size)
    return float(global_items_step)


@dataclass(frozen=True)
class StepScale:
    """The factor c of one step: the optimizer received c·G.

    ``exact`` is False when no single c exists (a mean of means over unequal counts); ``c`` is then
    the equal-count value, and the received gradient is a biased estimate of c·G.
    """

    c: float
    exact: bool


def step_scale(
    loss: LossReduction, op: ReduceOp, world_size: int, local_items: list[int]
) -> StepScale:
    """c for one step, given every rank's item count of the step (all micro-batches)."""
    global_items = sum(local_items)
    equal = min(local_items) == max(local_items)
    if loss is LossReduction.sum:
        if op is ReduceOp.sum:
            return StepScale(float(global_items), True)
        if op is ReduceOp.mean:
            return StepScale(global_items / world_size, True)
        return StepScale(1.0, True)
    # loss=mean: each rank contributes its local mean, whatever its count.
    if op is ReduceOp.mean:
        return StepScale(1.0, equal)
    if op is ReduceOp.sum:
        return StepScale(float(world_size), equal)
    raise ValueError("reduce.loss=mean with reduce.op=global_mean is refused")


def nominal_scale(
    loss: LossReduction, op: ReduceOp, world_size: int, local_batch: int, accum_steps: int
) -> float:
    """c with equal counts of b·A items per rank (DESIGN §1's table)."""
    items = [local_batch * accum_steps] * world_size
    return step_scale(loss, op, world_size, items).c


def scale_rule(loss: LossReduction, op: ReduceOp) -> str:
    """c in words, for summaries and reports."""
    return {
        (LossReduction.mean, ReduceOp.mean): "1",
        (LossReduction.mean, ReduceOp.sum): "W (world size)",
        (LossReduction.sum, ReduceOp.mean): "b*A (items per rank per step; N_t/W when ragged)",
        (LossReduction.sum, ReduceOp.sum): "N (items in the global batch of the step)",
        (LossReduction.sum, ReduceOp.global_mean): "1",
    }[(loss, op)]


def local_to_mean_factor(loss: LossReduction, local_items_step: int) -> float:
    """Factor turning a rank's own (pre-reduction) gradient into its local mean gradient."""
    if loss is LossReduction.mean:
        return 1.0
    return 1.0 / local_items_step if local_items_step > 0 else 0.0


class ReduceState:
    """What the communication hook needs for a step (set before the last backward) and what it
    learns there (read after backward)."""

    def __init__(
        self,
        op: ReduceOp,
        device: torch.device,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.op = op
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.local_items = 0
        self.to_mean_sq = 1.0  # squared factor from this rank's gradient to its local mean
        self.collect_local_sq = False
        self.count = torch.zeros(1, device=device)  # this rank's item count, to ride along
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.local_sq = zero.clone()  # |this rank's local mean gradient|², read before reducing
        self.ranks_sq = zero.clone()  # the same, summed over ranks
        self.global_items = zero.clone()  # the all-reduced item count (global_mean)

    def start_step(self, local_items: int, to_mean: float, collect_local_sq: bool) -> None:
        self.local_items = local_items
        self.to_mean_sq = to_mean * to_mean
        self.collect_local_sq = collect_local_sq
        for t in (self.local_sq, self.ranks_sq, self.global_items):
            t.zero_()
        if self.op is ReduceOp.global_mean:
            self.count.fill_(float(local_items))


def _use_avg(state: ReduceState, buffer: torch.Tensor) -> bool:
    # NCCL averages in one pass; gloo's AVG is missing on older torch, so there we pre-divide.
    return state.op is ReduceOp.mean and buffer.is_cuda


def reduce_hook(state: ReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce one bucket with the configured op.

    Once a hook is registered DDP no longer divides by W: the division here is the only one.
    Scalars that must be summed over ranks this step (the item count for ``global_mean``, the
    squared norm of the rank's own gradient for the noise scale) ride along at the end of every
    bucket's all-reduce: no collective of their own, and the count is known in the same callback
    that divides by it.
    """
    buffer = bucket.buffer()
    n = buffer.numel()
    parts = [buffer]
    if state.collect_local_sq:
        sq = torch.dot(buffer, buffer).mul_(state.to_mean_sq)  # before any division
        state.local_sq += sq
        parts.append(sq.view(1))
    if state.op is ReduceOp.global_mean:
        parts.append(state.count.to(buffer.dtype))
    if len(parts) == 1:
        if _use_avg(state, buffer):
            op = dist.ReduceOp.AVG
        else:
            op = dist.ReduceOp.SUM
            divisor = reduce_divisor(state.op, state.world_size, 0)
            if divisor != 1.0:
                buffer.div_(divisor)  # pre-divide, as DDP's own hook does
        work = dist.all_reduce(buffer, op=op, group=state.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    if state.op is ReduceOp.mean:
        buffer.div_(state.world_size)
    packed = torch.cat(parts)
    work = dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=state.process_group, async_op=True)
    collect, global_mean = state.collect_local_sq, state.op is ReduceOp.global_mean

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        out = fut.value()[0]
        if collect:
            state.ranks_sq += out[n]
        if global_mean:
            count = out[-1:]
            state.global_items.copy_(count[0])
            out[:n].div_(count)
        return out[:n]

    return work.get_future().then(finish)


def reduce_gradients_manually(params: list[torch.Tensor], state: ReduceState) -> None:
    """Reference implementation of the hook's arithmetic: one all-reduce per gradient, the
    scalars in float64 in a collective of their own."""
    grads = [p.grad for p in params if p.grad is not None]
    local_sq = sum(torch.dot(g.flatten(), g.flatten()).double() for g in grads) * state.to_mean_sq
    scalars = torch.stack(
        [
            local_sq,
            torch.tensor(float(state.local_items), dtype=torch.float64, device=local_sq.device),
        ]
    )
    dist.all_reduce(scalars, group=state.process_group)
    if state.collect_local_sq:
        state.local_sq += local_sq
        state.ranks_sq += scalars[0]
    state.global_items.copy_(scalars[1])
    divisor = reduce_divisor(state.op, state.world_size, int(scalars[1].item()))
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=state.process_group)
        if divisor != 1.0:
            g.div_(divisor)
