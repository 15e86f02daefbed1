"""The reduction arithmetic: how per-item gradients become the gradient the optimizer receives.

This module is the one statement of the factor c. It imports no torch: the run, the
communication hook (:mod:`ddp_reduce.layer.reducer`), ``ddp-reduce convert`` and the studies
all ask it.

Notation (docs/design.md §1): W ranks, b items per rank per micro-step, A micro-steps per
optimizer step, N = W·b·A items in the global batch; N_t is the number of items the step really
holds (ragged batches). g_i is one item's gradient, G = (1/N_t)·Σ g_i the true mean gradient of
the global batch. An "item" is whatever the loss is a sum over: a sample, or a token.

Two switches decide what the optimizer receives:

* ``reduce.loss`` (inside a rank): the rank's objective for one optimizer step is the *sum* of its
  items' losses over all its micro-batches, times a loss scale: 1 for ``sum``, 1/(the rank's item
  count of the *whole step*) for ``mean``. Never each micro-batch by its own count: that weights
  the items of short micro-batches more (the 2024 accumulation bug). The ranks then hold Σ_local
  g_i (sum) or their local mean gradients (mean); summed over ranks that is N_t·G (sum) or the sum
  of W local means, W·G when counts are equal (mean).

* ``reduce.op`` (across ranks): the all-reduce SUMs the ranks' gradients and divides by the
  op's **divisor** (:data:`DIVISORS`, the only place it is written):

    sum          1
    mean         W        (what DDP does when no hook is registered)
    global_mean  N_t      (all ranks' item count of the step; exact with unequal counts)

So c = (N_t if loss is sum else W) / divisor, and c is *exact* (the optimizer received exactly
c·G) when the loss is a sum or every rank held the same count; a mean of means over unequal
counts weights items unequally and has no single c.

    loss  op            c (equal counts)    c (unequal counts)
    mean  mean          1                   none: a mean of means
    mean  sum           W                   none, for the same reason
    sum   mean          N/W = b·A           N_t/W  (exact)
    sum   sum           N                   N_t    (exact)
    sum   global_mean   1                   1      (exact)

``micro_mean`` divides each micro-batch by its own count and by A: the same c as ``mean`` when
every micro-batch holds the same count, and no single c otherwise (the 2024 accumulation bug,
there to be reproduced). ``mean`` (or ``micro_mean``) with ``global_mean`` is refused: it
divides a sum of W local means by the global item count, W/N_t times a mean of means, a factor
nobody asks for.

Adding a reduce op: a member of :class:`ReduceOp` and its line in :data:`DIVISORS`. Everything
else (c, exactness, the hook's division, the summary's rule, ``convert``) follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum


# OmegaConf matches an Enum by member *name*, so the names are the user-facing values.
class LossReduction(Enum):
    sum = "sum"
    mean = "mean"
    # Each micro-batch's loss divided by its own item count, then by A: how several trainers
    # accumulated before the 2024 fix. Reproducible on purpose; biased when counts differ.
    micro_mean = "micro_mean"


class ReduceOp(Enum):
    sum = "sum"
    mean = "mean"
    global_mean = "global_mean"


class ReduceImpl(Enum):
    """Where the all-reduce happens."""

    hook = "hook"  # the reduction layer: a DDP communication hook (or DDP's own path when the
    # arithmetic is DDP's own), keeping DDP's buckets and its overlap with backward
    manual = "manual"  # all-reduce each gradient after backward (a reference for tests)
    builtin = "builtin"  # DDP with no hook: its own mean (op=mean only; a baseline)


class CommDtype(Enum):
    """The dtype the gradients travel in during the all-reduce (cast back for the optimizer)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# Where the division by the op's divisor d happens: all before the all-reduce (d^1), split
# (d^0.5 before, the rest after), or all after (d^0); a number f divides by f before, d/f after.
PREDIVIDE = {"none": 0.0, "sqrt": 0.5, "full": 1.0}
PREDIVIDE_ALLOWED = "none, sqrt, full, or a number > 0 (divide by it before, by divisor/it after)"


def parse_predivide(value: object) -> str | float:
    """``none|sqrt|full`` or a positive finite factor; ValueError naming what is allowed."""
    if isinstance(value, str) and value in PREDIVIDE:
        return value
    try:
        factor = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(PREDIVIDE_ALLOWED) from None
    if not (factor > 0 and factor < float("inf")):
        raise ValueError(PREDIVIDE_ALLOWED)
    return factor


def division_split(divisor, predivide: str | float):
    """(before, after) with before·after = divisor: the two divisions around the all-reduce.

    ``divisor`` may be a number or a 0-dim tensor (an item count all-reduced this step).
    """
    before = divisor ** PREDIVIDE[predivide] if isinstance(predivide, str) else predivide
    return before, divisor / before


@dataclass(frozen=True)
class Divisor:
    symbol: str  # in the notation above, for summaries and reports
    of: Callable[[int, int], float]  # (world_size, global_items) -> the divisor


# What the all-reduced SUM of the ranks' gradients is divided by: the one statement of c.
DIVISORS: dict[ReduceOp, Divisor] = {
    ReduceOp.sum: Divisor("1", lambda world_size, global_items: 1.0),
    ReduceOp.mean: Divisor("W", lambda world_size, global_items: float(world_size)),
    ReduceOp.global_mean: Divisor("N", lambda world_size, global_items: float(global_items)),
}


def divisor(op: ReduceOp, world_size: int, global_items: int) -> float:
    return DIVISORS[op].of(world_size, global_items)


def _numerator_symbol(loss: LossReduction) -> str:
    """What the sum over ranks of their gradients is, in units of G (equal counts)."""
    return "N" if loss is LossReduction.sum else "W"


def check_combination(loss: LossReduction, op: ReduceOp, impl: ReduceImpl) -> str | None:
    """Return why this combination is refused, or None when it is allowed."""
    if loss is not LossReduction.sum and op is ReduceOp.global_mean:
        return (
            f"reduce.loss={loss.name} with reduce.op=global_mean divides a sum of per-rank means "
            "by the global item count; use reduce.loss=sum with reduce.op=global_mean for the "
            "exact count-weighted mean, or reduce.op=mean|sum with reduce.loss=mean"
        )
    if impl is ReduceImpl.builtin and op is not ReduceOp.mean:
        return (
            f"reduce.impl=builtin is DDP's own mean over ranks and cannot do reduce.op={op.name}; "
            "allowed with builtin: reduce.op=mean"
        )
    return None


def check_builtin(
    impl: ReduceImpl, dtype: CommDtype, predivide: str | float
) -> tuple[str, str] | None:
    """DDP's own path (impl=builtin) casts nothing and divides before its all-reduce: what it
    cannot do, as (the setting, what is allowed with builtin); None where it can."""
    if impl is not ReduceImpl.builtin:
        return None
    if dtype is not CommDtype.fp32:
        return (
            "reduce.dtype",
            "fp32 with reduce.impl=builtin (DDP's own path casts nothing); bf16 and fp16 "
            "need reduce.impl=hook",
        )
    if parse_predivide(predivide) != "full":
        return (
            "reduce.predivide",
            "full with reduce.impl=builtin (DDP divides before its all-reduce)",
        )
    return None


@dataclass
class ReduceSettings:
    """What a user chooses of the reduction, with the defaults of both ``attach`` and the run's
    ``reduce.*`` (the config's ReduceConfig extends this class)."""

    loss: LossReduction = LossReduction.mean  # inside a rank, over its items of the whole step
    op: ReduceOp = ReduceOp.mean  # across ranks
    impl: ReduceImpl = ReduceImpl.hook
    # What the gradients travel in during the all-reduce (cast back for the optimizer).
    dtype: CommDtype = CommDtype.fp32
    # Where the division by the op's divisor happens: before the all-reduce (full), split
    # (sqrt), after (none), or a number: divide by it before and by divisor/it after
    # (typed str for the config's sake; attach takes a number too).
    predivide: str = "full"

    def refusal(self) -> tuple[str, object, str] | None:
        """The first setting that cannot be carried out, as (key, value, what is allowed);
        None when all can."""
        why = check_combination(self.loss, self.op, self.impl)
        if why:
            return "reduce.op", self.op, why
        try:
            parse_predivide(self.predivide)
        except ValueError as exc:
            return "reduce.predivide", self.predivide, str(exc)
        refused = check_builtin(self.impl, self.dtype, self.predivide)
        if refused:
            key, allowed = refused
            return key, self.dtype if key == "reduce.dtype" else self.predivide, allowed
        return None


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step's arithmetic, planned before the forward from the item counts.

    ``global_items`` is None when only this rank's count is known before the reduction (a user's
    loop without a global sampler); the divisor of ``global_mean`` is then not known yet.
    """

    loss: LossReduction
    op: ReduceOp
    world_size: int
    local_items: int  # this rank's items over the whole step (all micro-batches)
    global_items: int | None  # all ranks' items of the step
    # every rank held the same count (None: not known); for micro_mean also every micro-batch
    equal_counts: bool | None
    micro_items: tuple[int, ...] | None = None  # this rank's count per micro-batch

    @property
    def loss_scale(self) -> float:
        """Factor on the rank's summed item losses, the same for every micro-batch of the step.

        A rank with no items in the step (possible only for ragged batches) contributes nothing.
        """
        if self.loss is LossReduction.sum:
            return 1.0
        if self.loss is LossReduction.micro_mean:
            raise ValueError("reduce.loss=micro_mean scales each micro-batch by its own count")
        return 1.0 / self.local_items if self.local_items > 0 else 0.0

    @property
    def loss_scales(self) -> tuple[float, ...]:
        """The factor of each micro-batch's summed loss (``micro_items`` in order)."""
        micro = self.micro_items or (self.local_items,)
        if self.loss is not LossReduction.micro_mean:
            return (self.loss_scale,) * len(micro)
        return tuple(1.0 / (len(micro) * n) if n > 0 else 0.0 for n in micro)

    @property
    def to_local_mean(self) -> float:
        """Factor turning the rank's own (pre-reduction) gradient into its local mean gradient."""
        if self.loss is not LossReduction.sum:
            return 1.0
        return 1.0 / self.local_items if self.local_items > 0 else 0.0

    @property
    def divisor(self) -> float | None:
        if self.op is ReduceOp.global_mean and self.global_items is None:
            return None
        return divisor(self.op, self.world_size, self.global_items or 0)

    def with_counts(self, global_items: int, equal_counts: bool) -> StepPlan:
        """The same step once the all-ranks count is known (learned during the reduction);
        ``equal_counts``: for ``micro_mean`` over several micro-batches, whether every
        micro-batch of every rank held the same count."""
        return dataclasses.replace(self, global_items=global_items, equal_counts=equal_counts)

    @property
    def c(self) -> float:
        """The optimizer receives c·G (for a mean of means over unequal counts: nominally)."""
        if self.loss is LossReduction.sum:
            numerator = float(self.global_items) if self.global_items is not None else None
        else:
            numerator = float(self.world_size)
        d = self.divisor
        if numerator is None or d is None:
            raise ValueError("c needs every rank's item count: plan the step with global_items")
        return numerator / d

    @property
    def exact(self) -> bool:
        """The optimizer received exactly c·G (a sum loss, or equal counts)."""
        return self.loss is LossReduction.sum or bool(self.equal_counts)


def plan_step(
    loss: LossReduction,
    op: ReduceOp,
    world_size: int,
    local_items: int,
    counts: Sequence[int] | None = None,
    global_items: int | None = None,
    micro_items: Sequence[int] | None = None,
    micro_equal: bool | None = None,
) -> StepPlan:
    """Plan a step from this rank's count and, where known, every rank's (``counts``) or their
    total (``global_items``). ``micro_items``: this rank's count per micro-batch; for
    ``micro_mean``, ``micro_equal`` says whether every micro-batch of every rank held the same
    count (None: not known)."""
    if counts is None and global_items is None and world_size == 1:
        counts = [local_items]  # one rank knows every count
    if counts is not None:
        if len(counts) != world_size:
            raise ValueError(f"counts of {len(counts)} ranks for a world of {world_size}")
        global_items = sum(counts)
        equal = min(counts) == max(counts)
    else:
        equal = None
    if loss is LossReduction.micro_mean and micro_items is not None and len(micro_items) > 1:
        # exact only where every micro-batch of every rank holds the same count
        if micro_equal is None and world_size == 1:
            micro_equal = len(set(micro_items)) == 1  # one rank sees every micro-batch
        if equal is not None:  # else learned with the all-reduced counts (with_counts)
            equal = equal and bool(micro_equal)
    micro = tuple(micro_items) if micro_items is not None else None
    return StepPlan(loss, op, world_size, local_items, global_items, equal, micro)


def nominal_scale(
    loss: LossReduction, op: ReduceOp, world_size: int, local_batch: int, accum_steps: int
) -> float:
    """c with equal counts of b·A items per rank (the table above)."""
    items = local_batch * accum_steps
    return StepPlan(loss, op, world_size, items, world_size * items, True).c


_SYMBOL_MEANING = {
    "N": "N (items in the global batch of the step)",
    "W": "W (world size)",
    "N/W": "N/W = b*A (items per rank per step; N_t/W when ragged)",
}


def scale_symbol(loss: LossReduction, op: ReduceOp) -> str:
    """c as a symbol: the numerator over the op's divisor, simplified (1, W, N, N/W, ...)."""
    num, den = _numerator_symbol(loss), DIVISORS[op].symbol
    return "1" if num == den else (num if den == "1" else f"{num}/{den}")


def scale_rule(loss: LossReduction, op: ReduceOp) -> str:
    """c in words, for summaries and reports."""
    ratio = scale_symbol(loss, op)
    return _SYMBOL_MEANING.get(ratio, ratio)


# -- loss terms with their own units ---------------------------------------------------------
#
# A loss of several terms (a token cross-entropy, a per-sequence load-balancing loss, a
# per-micro-batch z-loss, ...) has one unit per term, so one count per term: the reduction
# divides the whole gradient by one divisor d (that of the step's first unit, its "items"),
# and each term's factor makes up the difference. Term u, with n_u units on this rank and N_u
# on all ranks, is summed over its units and multiplied by
#
#     factor_u = loss_scale_u · d / d_u
#
# where loss_scale_u and d_u are what the step's (loss, op) would give that term alone. Then
# the term's c is what that (loss, op) gives a one-term loss: with loss=sum, op=global_mean
# every term receives c = 1, the optimizer gets the gradient of Σ_u w_u · (the mean of term u
# over the global batch's units), and a weight w_u means the same at any W, A and b.


@dataclass(frozen=True)
class TermPlan:
    """One loss term's share of the step: the factor on this rank's summed term, and its c."""

    local_units: int
    global_units: int
    factor: float  # multiply this rank's summed term by it (and by its weight)
    c: float  # the optimizer receives c times the gradient of the term's global mean
    exact: bool  # a sum loss, or every rank held the same count of this unit


def plan_terms(
    loss: LossReduction,
    op: ReduceOp,
    world_size: int,
    local_units: dict[str, int],
    global_units: dict[str, int],
    equal: dict[str, bool],
) -> dict[str, TermPlan]:
    """Each term's factor and c (the rule above); the first unit's divisor is the step's."""
    if loss is LossReduction.micro_mean:
        raise ValueError(
            "loss=micro_mean has no factor per term: use loss=sum (or mean) with terms"
        )
    plans = {
        u: StepPlan(loss, op, world_size, local_units[u], global_units[u], equal[u])
        for u in local_units
    }
    d = next(iter(plans.values())).divisor
    out = {}
    for u, plan in plans.items():
        if not plan.global_items:
            out[u] = TermPlan(plan.local_items, 0, 0.0, 0.0, True)  # no unit of u anywhere
            continue
        factor = plan.loss_scale * d / plan.divisor
        out[u] = TermPlan(plan.local_items, plan.global_items, factor, plan.c, plan.exact)
    return out
