"""The reduction layer on a model: ``attach`` it, ask it for the loss scale, read what it did.

    reducer = ddp_reduce.attach(ddp_model, loss="sum", op="global_mean", noise=True)
    for batch in loader:
        scale = reducer.loss_scale(local_items)   # before the forward: this rank's items
        (loss_fn(ddp_model(x), y, reduction="sum") * scale).backward()
        step = reducer.last_step                  # c, exact, global_items, the noise scale
        optimizer.step()

The arithmetic (the divisor of each op, c, exactness) is :mod:`ddp_reduce.layer.reduction`'s; this
module carries it out: a DDP communication hook (as PyTorch's own ``default_hooks`` are: one
helper behind a thin hook), or DDP's own C++ path where the arithmetic is DDP's own, or a
post-backward reference. Once a hook is registered DDP no longer divides by W: the division here
is the only one.

What the hook learns comes back as a value, :class:`StepReport`, built from tensors that stay on
the device until read (no synchronization on the hot path).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.
import contextlib
import copy
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_reduce.layer import guard, measure, reduction, terms
from ddp_reduce.layer.hsdp import HSDPReduction, hsdp_shape
from ddp_reduce.layer.noise import NOISE_BETA, NoiseEstimate, NoiseScaleEstimator, NoiseSteps
from ddp_reduce.layer.strategy import is_fsdp, total_norm
from ddp_reduce.layer.wrappers import find_reduced

TORCH_DTYPES = {
    reduction.CommDtype.fp32: torch.float32,
    reduction.CommDtype.bf16: torch.bfloat16,
    reduction.CommDtype.fp16: torch.float16,
}
LOW_PRECISION = (torch.bfloat16, torch.float16)  # comm dtypes whose reduction is measured


class Route(Enum):
    """How the reduction is carried out (the summary names it; c is the same on every route).

    Not :class:`~ddp_reduce.layer.reduction.ReduceImpl`: that is what the user asks for
    (``reduce.impl``: the layer, the manual reference, or DDP's built-in baseline), this is what
    runs, decided at the first step from the request, the strategy (DDP or FSDP2), the device,
    the comm dtype, the noise estimate and whether the counts are known: ``impl=hook`` runs as
    ``ddp_builtin`` where DDP's own arithmetic is already ours, as ``fsdp_comm`` or
    ``fsdp_native`` under FSDP2.
    """

    ddp_builtin = "ddp_builtin"  # no hook: DDP's own C++ mean; any other divisor is folded into
    # the loss scale (gradients are linear in the loss), so the optimizer gets the same c·G
    hook = "hook"  # a Python communication hook: noise norms, comm dtype, pre-division
    manual = "manual"  # every micro-batch under no_sync, then one all-reduce per gradient
    fsdp_comm = "fsdp_comm"  # FSDP2 with our reduce-scatter: SUM, the planned division
    fsdp_native = "fsdp_native"  # FSDP2's own reduce-scatter, its divide factor set to ours
    hsdp_comm = "hsdp_comm"  # FSDP2 on a (replicate, shard) mesh: our reduce-scatter, FSDP's
    # all-reduce, both SUM, one division split around them (ddp_reduce.layer.hsdp)


def _enum(cls, value):
    if isinstance(value, cls):
        return value
    try:
        return cls[value]
    except KeyError:
        raise ValueError(f"{value!r} is not one of {[m.name for m in cls]}") from None


def _sq(t: torch.Tensor) -> torch.Tensor:
    """|t|² in float64 whatever t's dtype (a bf16 or fp16 square would round or overflow)."""
    if t.dtype in (torch.float32, torch.float64):
        return torch.dot(t, t).double()
    return torch.linalg.vector_norm(t, dtype=torch.float32).double() ** 2


@dataclass
class _InFlight:
    """The reduction in flight: planned before the forward, filled in by the hook, read into
    the :class:`StepReport` once the backward is done."""

    plan: reduction.StepPlan
    divisor: Any  # float, or a 0-dim tensor (an all-reduced count still in flight)
    count: torch.Tensor | None  # [Σ items, Σ items²] over ranks, float64, when not given
    count_work: Any  # its all-reduce (None when done or not needed)
    collect_sq: bool  # read the rank's own gradient norm before reducing (noise scale)
    audit: bool  # also reduce in float64 and measure the comm dtype's error (logged steps)
    local_sq: torch.Tensor | None = None  # |this rank's local mean gradient|², c = 1 units
    ranks_sq: torch.Tensor | None = None  # the same, summed over ranks
    local_amax: torch.Tensor | None = None  # max |g| of this rank's gradient before the cast
    err_sq: torch.Tensor | None = None  # audit: |reduced - reduced in float64|²
    ref_sq: torch.Tensor | None = None  # audit: |reduced in float64|²
    # (items, |mean gradient|²: a number or a 0-dim tensor) given by the caller
    small_batch: tuple[float, Any] | None = None
    amp: Any = 1.0  # the losses were multiplied by this too (a loss scaler's, maybe a tensor)
    forwards: int = 0  # training forwards run on this plan
    reduced: bool = False  # its reduction has begun (or its last forward syncs)
    micro_counts: list[int] | None = None  # add_items: the counts so far, the total unknown
    claimed: int | None = None  # the total this rank was told (counts=), checked by all-reduce
    measured: Any = None  # the measured c (ddp_reduce.layer.measure), where measured
    count_group: Any = None  # add_items: the process group and device of the count's
    count_device: Any = None  # all-reduce

    def read_local(self, grad: torch.Tensor, low_precision: bool) -> None:
        """Before a piece of this rank's gradient is reduced (a DDP bucket, an FSDP unit):
        add its squared norm in c = 1 units (noise scale) and, where it travels in bf16/fp16,
        its largest entry (which tells a backward's overflow from the reduction's)."""
        if self.collect_sq:
            sq = _sq(grad) * (self.plan.to_local_mean / self.amp) ** 2
            self.local_sq = sq if self.local_sq is None else self.local_sq + sq
        if low_precision:
            amax = grad.abs().max().float()
            self.local_amax = (
                amax if self.local_amax is None else torch.maximum(self.local_amax, amax)
            )

    def add_audit(self, reduced: torch.Tensor, reference: torch.Tensor) -> None:
        """Add a reduced piece's error against its float64 reduction, and the latter's size."""
        err, ref_sq = _sq(reduced.double() - reference), _sq(reference)
        self.err_sq = err if self.err_sq is None else self.err_sq + err
        self.ref_sq = ref_sq if self.ref_sq is None else self.ref_sq + ref_sq

    def wait_count(self) -> torch.Tensor | None:
        if self.micro_counts is not None:  # add_items: every count is in by the reduction
            self.count = _count_tensor(self.micro_counts, self.count_device)
            self.micro_counts = None
            dist.all_reduce(self.count, group=self.count_group)
            guard.check_total(float(self.count[0]))
        if self.count_work is not None:
            self.count_work.wait()
            self.count_work = None
            if self.claimed is None:
                guard.check_total(float(self.count[0]))
        return self.count


@dataclass
class StepReport:
    """What the reduction did to the step just reduced (``reducer.last_step``).

    Floats are read from the device when asked for; nothing here synchronizes until then.
    """

    c: float  # the optimizer received c·G (nominally, for a mean of means over unequal counts)
    exact: bool  # exactly c·G: a sum loss, or equal item counts on every rank
    local_items: int
    global_items: int
    world_size: int
    route: Route
    _step: _InFlight = field(repr=False)
    _reducer: "Reducer" = field(repr=False)
    # a loss of several terms (Reducer.term_scales): each unit's factor, counts, c, exactness
    terms: dict[str, reduction.TermPlan] | None = None
    _fed: bool | None = field(default=None, repr=False)  # given to the noise estimate yet

    @functools.cached_property
    def grad_norm(self) -> torch.Tensor:
        """|c·G|, the norm of the received gradient (what clipping sees), on the device."""
        return self._reducer.grad_norm()

    @property
    def local_sq(self) -> torch.Tensor | None:
        """|this rank's local mean gradient|² (c = 1 units), read before the reduction."""
        return self._step.local_sq

    @property
    def ranks_sq_mean(self) -> torch.Tensor | None:
        """The same, averaged over ranks: the small batch of the noise scale."""
        s = self._step.ranks_sq
        return None if s is None else s / self.world_size

    @property
    def comm_rel_error(self) -> float | None:
        """|reduced - reduced in float64| / |reduced in float64|, on audited steps."""
        if self._step.err_sq is None:
            return None
        return float((self._step.err_sq / self._step.ref_sq).sqrt())

    @property
    def local_amax(self) -> torch.Tensor | None:
        """max |g| of this rank's gradient before a low-precision cast (overflow diagnosis)."""
        return self._step.local_amax

    def update_noise(self) -> bool:
        """Give this step to the running noise-scale estimate, once, on the device (nothing is
        read); whether the step had a smaller batch to give (noise=True, W >= 2 or A >= 2)."""
        if self._fed is None:
            self._fed = self._reducer._observe_noise(self)
        return self._fed

    @property
    def measured_c(self) -> float | None:
        """The c the optimizer received, measured (:meth:`Reducer.measure`); None if not."""
        return None if self._step.measured is None else self._step.measured.c

    @property
    def residual(self) -> float | None:
        """|received - measured c·G| / |received|: 0 where it was exactly c·G."""
        return None if self._step.measured is None else self._step.measured.residual

    @functools.cached_property
    def noise(self) -> NoiseEstimate | None:
        """The running noise-scale estimate including this step (noise=True, W >= 2), read
        from the device."""
        return self._reducer.noise_estimate() if self.update_noise() else None


class Reducer:
    """The reduction layer attached to one DDP model. Build it with :func:`attach`."""

    def __init__(
        self,
        model: DDP,
        loss: reduction.LossReduction,
        op: reduction.ReduceOp,
        impl: reduction.ReduceImpl,
        noise: bool,
        dtype: reduction.CommDtype,
        predivide: str | float,
        noise_beta: float,
        noise_population: int | None,
        process_group: dist.ProcessGroup | None,
        noise_steps: NoiseSteps = NoiseSteps.every,
    ):
        refused = reduction.ReduceSettings(loss, op, impl, dtype, predivide).refusal()
        if refused:
            key, value, allowed = refused
            name = value.name if isinstance(value, Enum) else value
            raise ValueError(f"{key.split('.')[1]}={name}: allowed {allowed}")
        self.model = model
        self.sharded = is_fsdp(model)
        if self.sharded and impl is not reduction.ReduceImpl.hook:
            raise ValueError(f"impl={impl.name} is DDP's; under FSDP the reduction is the hook's")
        self.loss, self.op, self.impl = loss, op, impl
        self.dtype = dtype
        self.predivide = reduction.parse_predivide(predivide)
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.estimator = NoiseScaleEstimator(noise_beta, noise_population) if noise else None
        # Steps given to the estimate and not read yet: (B_small, B_big, |G_small|², |c·G|, c),
        # the norms still on the device; folded in where the estimate is read.
        self._noise_queue: list[tuple[float, float, Any, torch.Tensor, float]] = []
        # The ranks' own gradients are a second batch size for the noise scale (W >= 2); they
        # exist only where the hook (or the reference) sees them, not on DDP's own path.
        self.collect_sq = (
            noise and self.world_size >= 2 and impl is not reduction.ReduceImpl.builtin
        )
        self.noise_steps = noise_steps  # every step gives its norms, or the logged ones only
        self._fsdp_units = [m for m in model.modules() if is_fsdp(m)] if self.sharded else []
        shape = hsdp_shape(model) if self.sharded else None
        self._hsdp = HSDPReduction(shape, self.predivide) if shape is not None else None
        self.route: Route | None = None  # decided at the first step (see _choose_route)
        self._step: _InFlight | None = None
        self._report: StepReport | None = None
        self._counts_given: bool | None = None
        self._terms: dict[str, reduction.TermPlan] | None = None
        self.rank = dist.get_rank(process_group)
        self.undo = 1.0  # a framework divides the loss by this: the layer multiplies it back
        self._per_micro_batch = False  # add_items: the total is learned in the reduction
        self._claims_checked = 0  # steps whose counts= were checked against the ranks'
        _claim(model, self)

    # -- planning, before the forward -------------------------------------------------------

    def loss_scale(
        self,
        local_items: int,
        *,
        counts: Sequence[int] | None = None,
        global_items: int | None = None,
        log: bool = False,
    ) -> float:
        """Plan this optimizer step and return the factor for this rank's *summed* loss.

        ``local_items``: this rank's item count over the whole step (all micro-batches). Pass
        every rank's count (``counts``, as a global sampler knows them) or their total
        (``global_items``) when known: otherwise one small asynchronous all-reduce of the counts
        runs alongside the forward. ``log``: a step whose statistics are logged: the ranks'
        gradient norms are read wherever a hook runs, and with a low-precision ``dtype`` the
        buckets are also reduced in float64 to measure the comm dtype's error (an extra
        collective on such steps only).
        """
        if self.loss is reduction.LossReduction.micro_mean:
            raise ValueError(
                "loss=micro_mean scales each micro-batch by its own count: use loss_scales()"
            )
        return self.loss_scales([local_items], counts=counts, global_items=global_items, log=log)[0]

    def loss_scales(
        self,
        micro_items: Sequence[int],
        *,
        counts: Sequence[int] | None = None,
        global_items: int | None = None,
        micro_equal: bool | None = None,
        log: bool = False,
        amp: float = 1.0,
    ) -> tuple[float, ...]:
        """:meth:`loss_scale` for each micro-batch of the step, given its item count
        (``micro_equal``: every micro-batch of every rank held the same count, for
        ``loss=micro_mean``'s exactness; ``amp``: the losses are also multiplied by this, a
        loss scaler's factor, which the gradient norms read in the reduction take out)."""
        micro_items, counts, global_items = guard.check_counts(
            micro_items, counts, global_items, self.world_size, self.rank
        )
        self._check_pending("loss_scale()")
        if self._per_micro_batch:
            raise ValueError("this reducer counts per micro-batch (add_items): use it every step")
        given = counts is not None or global_items is not None
        if self._counts_given is None:
            self._counts_given = given
            self._install(self._choose_route(given))
        elif given != self._counts_given:
            raise ValueError(
                "pass counts= (or global_items=) on every step or on none: the reduction "
                "route was chosen at the first step"
            )
        local_items = sum(micro_items)
        plan = reduction.plan_step(
            self.loss,
            self.op,
            self.world_size,
            local_items,
            counts,
            global_items,
            micro_items=micro_items if len(micro_items) > 1 else None,
            micro_equal=micro_equal,
        )
        count = work = claimed = None
        if plan.global_items is None or self._check_claims(log):
            count = _count_tensor(micro_items, self.device, plan.global_items)
            work = dist.all_reduce(count, group=self.process_group, async_op=True)
            claimed = plan.global_items
        d = plan.divisor
        if d is None:  # global_mean with the count still in flight: divide by the tensor
            d = _LazyCount(self)
        self._step = _InFlight(
            plan=plan,
            divisor=d,
            count=count,
            count_work=work,
            collect_sq=self._collect_sq(log),
            audit=log and self._low_precision(),
            amp=amp,
            claimed=claimed,
        )
        self._report, self._terms = None, None
        if self.route is Route.fsdp_native:
            for unit in self._fsdp_units:
                unit.set_gradient_divide_factor(plan.divisor)
        fold = self._fold(plan)
        return tuple(scale * fold * self.undo for scale in plan.loss_scales)

    def feeds_noise(self, log: bool) -> bool:
        """Whether a step planned with ``log`` gives its two batch sizes to the noise estimate
        (``noise_steps``: every step, or the logged ones only)."""
        return self.estimator is not None and (log or self.noise_steps is NoiseSteps.every)

    def _collect_sq(self, log: bool) -> bool:
        """Whether this step reads the ranks' own gradient norms: for the noise estimate, and
        on any logged step where a hook runs."""
        if log:
            return self.collect_sq or self.route is not Route.ddp_builtin
        return self.collect_sq and self.feeds_noise(log)

    def _install(self, route: Route) -> None:
        """Register what carries out the reduction on ``route`` (once, at the first step)."""
        self.route = route
        if route is Route.hook:
            self.model.register_comm_hook(self, _reduce_bucket)
        elif route in (Route.fsdp_comm, Route.hsdp_comm):
            comm = _FSDPReduceScatter(self)
            for unit in self._fsdp_units:
                unit.set_custom_reduce_scatter(comm)
                # SUM only (gloo has no PREMUL_SUM); the division is ours alone
                unit.set_force_sum_reduction_for_comms(True)
                unit.set_gradient_divide_factor(1.0)
                if self._hsdp is not None:  # the rest of the division, after the all-reduce
                    unit.set_all_reduce_hook(functools.partial(_after_all_reduce, self))

    def _fold(self, plan: reduction.StepPlan) -> float:
        """The part of the step's division that the loss scale carries (the route's)."""
        if self._hsdp is not None:
            return self._hsdp.plan(plan.divisor)  # S = 1: the division before the all-reduce
        if self.route is Route.ddp_builtin and plan.divisor not in (None, float(self.world_size)):
            return self.world_size / plan.divisor  # DDP divides by W; the rest is folded here
        return 1.0

    def term_scales(self, *, log: bool = False, amp: float = 1.0, **units: int) -> dict[str, float]:
        """The factor of each term of a loss of several terms, each summed over its own units:
        ``term_scales(tokens=n_tok, sequences=n_seq)`` with this rank's counts over the whole
        step (all micro-batches), before the step's first forward. The first unit named is the
        step's items (``global_mean`` divides the gradient by its count; every other term's
        factor makes up the difference). One all-reduce carries every unit's count. Multiply
        each term's sum by its factor and its weight; ``last_step.terms`` gives each c.
        """
        if not units:
            raise ValueError("term_scales() needs a count per unit, e.g. term_scales(tokens=n)")
        global_units, equal = terms.all_reduce_units(units, self.process_group, self.device)
        first = next(iter(units))
        self.loss_scales([units[first]], global_items=global_units[first], log=log, amp=amp)
        self._step.plan = self._step.plan.with_counts(global_units[first], equal[first])
        plans = reduction.plan_terms(
            self.loss, self.op, self.world_size, dict(units), global_units, equal
        )
        fold = self._fold(self._step.plan)  # the route's share of the division, as for one loss
        fold *= self.undo  # a framework's own division of the loss, undone
        self._terms = {u: dataclasses.replace(p, factor=p.factor * fold) for u, p in plans.items()}
        return {unit: plan.factor for unit, plan in self._terms.items()}

    def _choose_route(self, counts_given: bool) -> Route:
        divisor_known = self.op is not reduction.ReduceOp.global_mean or counts_given
        if self._hsdp is not None:
            return Route.hsdp_comm
        if self.sharded and self.world_size == 1:
            return Route.fsdp_native  # one rank: FSDP runs no reduce-scatter, only its division
        if self.sharded:
            # FSDP's own reduce-scatter divides in the collective (NCCL's PREMUL_SUM or AVG):
            # used on CUDA where nothing must happen inside the reduction; gloo has no PREMUL_SUM
            plain = not self.collect_sq and self.predivide == "full" and divisor_known
            cuda = self.device.type == "cuda"
            return Route.fsdp_native if plain and cuda else Route.fsdp_comm
        if self.impl is reduction.ReduceImpl.manual:
            return Route.manual
        if self.impl is reduction.ReduceImpl.builtin:
            return Route.ddp_builtin
        native = all(p.dtype == TORCH_DTYPES[self.dtype] for p in self.params)
        plain = native and not self.collect_sq and self.predivide == "full" and divisor_known
        return Route.ddp_builtin if plain else Route.hook

    # -- counting per micro-batch, and the checks -------------------------------------------

    def add_items(self, n: int, *, log: bool = False) -> None:
        """Count this rank's items one micro-batch at a time, before each micro-batch's forward
        (``n``: its items), instead of :meth:`loss_scale` once per step: the loss is then this
        rank's plain *sum* (``loss="sum"``, no loss scale), and the division by the step's
        all-reduced total happens in the reduction, which has every count by then."""
        n = guard.item_count("n", n)
        step = self._step
        if step is not None and not step.reduced and step.micro_counts is not None:
            step.micro_counts.append(n)
            step.plan = dataclasses.replace(step.plan, local_items=step.plan.local_items + n)
            return
        self._open_counted_step(n, log)

    def _open_counted_step(self, n: int, log: bool) -> None:
        if self.loss is not reduction.LossReduction.sum:
            raise ValueError(
                f"add_items() with loss={self.loss.name}: counting per micro-batch needs "
                "loss='sum' (your loss a plain sum over items); attach(..., loss='sum', "
                "op='global_mean') gives c = 1 exactly"
            )
        if self._counts_given is None:
            if self.impl is reduction.ReduceImpl.builtin and self.op is not reduction.ReduceOp.mean:
                raise ValueError("add_items() with impl=builtin: allowed op=mean")
            self._counts_given, self._per_micro_batch = False, True
            route = Route.manual if self.impl is reduction.ReduceImpl.manual else Route.hook
            if self.sharded:
                route = Route.fsdp_native if self.world_size == 1 else Route.fsdp_comm
                if self._hsdp is not None:
                    route = Route.hsdp_comm
            if self.impl is reduction.ReduceImpl.builtin:
                route = Route.ddp_builtin
            self._install(route)
        elif not self._per_micro_batch:
            raise ValueError("this reducer plans whole steps (loss_scale): use it every step")
        plan = reduction.StepPlan(self.loss, self.op, self.world_size, n, None, None)
        d = plan.divisor
        self._step = _InFlight(
            plan=plan,
            divisor=_LazyCount(self, 1 / self.undo) if d is None else d / self.undo,
            count=None,
            count_work=None,
            collect_sq=self._collect_sq(log),
            audit=log and self._low_precision(),
            micro_counts=[n],
            count_group=self.process_group,
            count_device=self.device,
        )
        self._report = None
        if self.route is Route.fsdp_native and d is not None:
            for unit in self._fsdp_units:
                unit.set_gradient_divide_factor(d / self.undo)

    def _check_pending(self, what: str) -> None:
        """Before planning a step: the last one's forwards must have been reduced (a plan
        made again mid-step would scale the step's micro-batches differently), and the ranks'
        counts= of it checked."""
        step = self._step
        if step is None:
            return
        if step.forwards and not step.reduced:
            raise RuntimeError(
                f"{what} called again before the step's gradients were reduced: call "
                "reducer.loss_scale() once per optimizer step, before its first forward, with "
                "the items of all its micro-batches; a loop that sees one micro-batch at a "
                "time counts them with reducer.add_items(n) instead"
            )
        self._verify_claim(step)

    def _check_claims(self, log: bool) -> bool:
        """Whether this step's counts= (known before the step) are checked against the ranks'
        own counts: on the first step and on logged ones, by the count all-reduce the layer
        makes on every step whose counts are not given."""
        if self.world_size == 1:
            return False
        first = self._claims_checked == 0
        self._claims_checked += 1
        return first or log

    def _verify_claim(self, step: _InFlight) -> None:
        if step.claimed is None:
            return
        count = step.wait_count().tolist()
        claimed, step.claimed = step.claimed, None
        guard.check_agreement(self.rank, claimed, [count[0], count[4], count[5]], self.world_size)

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        """A forward pre-hook on the model: a training forward needs this step's plan."""
        if not (torch.is_grad_enabled() and module.training):
            return
        step = self._step
        if step is None:
            raise RuntimeError(guard.NO_PLAN.format(what="DDP would average the gradients"))
        if step.reduced:
            raise RuntimeError(
                guard.NO_PLAN.format(what="the last step's plan (its counts) would be reused")
            )
        step.forwards += 1
        if guard.syncs_gradients(module, self._fsdp_units):
            step.reduced = True  # this forward's backward reduces the step

    def _low_precision(self) -> bool:
        return TORCH_DTYPES[self.dtype] in LOW_PRECISION

    # -- the micro-batches -------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around the forward *and* backward of one micro-batch (DDP reads the sync flag in
        forward): gradients are reduced on the last one only."""
        if self._step is None:
            raise RuntimeError("call reducer.loss_scale(...) before the step's first forward")
        sync = last and self.route is not Route.manual
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)  # FSDP reads it in the backward
            yield
        else:
            with contextlib.nullcontext() if sync else self.model.no_sync():
                yield
        if last and self.route is Route.manual:
            _reduce_manually(self)

    # -- after the backward ------------------------------------------------------------------

    @property
    def last_step(self) -> StepReport:
        """What the reduction did to the last reduced step."""
        if self._report is None:
            step = self._step
            if step is None:
                raise RuntimeError("no step has been planned yet (reducer.loss_scale)")
            self._verify_claim(step)
            plan = step.plan
            if self.sharded and step.local_sq is not None and step.ranks_sq is None:
                # FSDP calls the reduce-scatter per unit and says none is the last: the ranks'
                # squared norms are summed here, one small all-reduce after the backward
                step.ranks_sq = step.local_sq.clone()
                dist.all_reduce(step.ranks_sq, group=self.process_group)
            if self.sharded and step.err_sq is not None:  # each rank audited its own shard
                both = torch.stack([step.err_sq, step.ref_sq])
                dist.all_reduce(both, group=self.process_group)
                step.err_sq, step.ref_sq = both[0], both[1]
            if plan.global_items is None:
                total, total_sq, micro_sq, micro_n = step.wait_count().tolist()
                equal = self.world_size * total_sq == total * total
                if plan.loss is reduction.LossReduction.micro_mean and plan.micro_items is not None:
                    equal = micro_n * micro_sq == total * total
                plan = plan.with_counts(int(total), equal)
            self._report = StepReport(
                c=plan.c,
                exact=plan.exact,
                local_items=plan.local_items,
                global_items=plan.global_items,
                world_size=self.world_size,
                route=self.route,
                _step=step,
                _reducer=self,
                terms=self._terms,
            )
        return self._report

    def grad_norm(self) -> torch.Tensor:
        return total_norm(self.params).to(self.device)

    def measure(self, loss_fn: measure.LossFn, batches: Any) -> StepReport:
        """Measure the c the optimizer receives this step: after the backward, before the
        optimizer, with this rank's micro-batches of the step (``batches``) and ``loss_fn(forward,
        batch) -> (summed loss, items)``. One all-reduce; ``.grad`` is not touched. The report's
        ``measured_c`` and ``residual`` are set, and a mismatch with the stated c warns with
        its likely cause."""
        report = self.last_step
        module = self.model.module if isinstance(self.model, DDP) else self.model
        mean, items = measure.mean_gradient(module, loss_fn, batches, self.process_group)
        received = measure.received_gradient(self.params) / report._step.amp
        found = measure.compare(received, mean, items)
        report._step.measured = found
        if items != report.global_items:
            measure.warn(
                f"measure(): the batches hold {items} items over the ranks, the step "
                f"{report.global_items}: pass every micro-batch of the step"
            )
        low = TORCH_DTYPES[self.dtype] if self._low_precision() else self.params[0].dtype
        cause = measure.likely_cause(report.c, found, report.exact, measure.TOLERANCE[low])
        if cause is not None:
            measure.warn(cause)
        return report

    def small_batch(self, items: int, mean_grad_sq: float | torch.Tensor) -> None:
        """Give this step's smaller batch for the noise scale where the ranks cannot (one rank,
        accumulation: the first micro-batch): its items and |its mean gradient|² (c = 1), a
        number or a 0-dim tensor left on the device."""
        self._step.small_batch = (float(items), mean_grad_sq)

    def _observe_noise(self, report: StepReport) -> bool:
        step = report._step
        if self.estimator is None:
            return False
        if self.collect_sq and step.ranks_sq is not None:
            small = (report.global_items / self.world_size, report.ranks_sq_mean)
        elif step.small_batch is not None:
            small = step.small_batch
        else:
            return False
        self._noise_queue.append(
            (small[0], report.global_items, small[1], report.grad_norm, report.c)
        )
        return True

    def noise_estimate(self) -> NoiseEstimate | None:
        """The running noise-scale estimate: the steps given since the last call folded in
        (their norms read from the device in one go); None before the first or without one."""
        if self.estimator is None:
            return None
        if self._noise_queue:
            queue, self._noise_queue = self._noise_queue, []
            small = [torch.as_tensor(q[2], dtype=torch.float64, device=self.device) for q in queue]
            norms = [q[3].to(torch.float64) for q in queue]
            values = torch.stack([*small, *norms]).tolist()
            for (b_small, b_big, _, _, c), small_sq, norm in zip(
                queue, values[: len(queue)], values[len(queue) :], strict=True
            ):
                self.estimator.update(b_small, b_big, small_sq, (norm / c) ** 2)
        return None if self.estimator.empty else self.estimator.estimate()

    def noise_state(self) -> tuple[NoiseScaleEstimator | None, list]:
        """A copy of the estimate's state, queue included (see :meth:`set_noise_state`)."""
        return copy.copy(self.estimator), list(self._noise_queue)

    def set_noise_state(self, state: tuple[NoiseScaleEstimator | None, list]) -> None:
        estimator, queue = state
        self.estimator, self._noise_queue = copy.copy(estimator), list(queue)

    def state_dict(self) -> dict[str, Any]:
        self.noise_estimate()  # the queued steps folded in
        return {"noise": self.estimator.state_dict() if self.estimator else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.estimator is not None and state.get("noise") is not None:
            self.estimator.load_state_dict(state["noise"])


class _LazyCount:
    """The all-reduced item count as a divisor, waited for where it is first divided by
    (``factor``: a framework's loss division undone, for counts added per micro-batch)."""

    def __init__(self, reducer: Reducer, factor: float = 1.0):
        self.reducer, self.factor = reducer, factor

    def tensor(self) -> torch.Tensor:
        total = self.reducer._step.wait_count()[0]
        return total if self.factor == 1.0 else total * self.factor


def _count_tensor(micro_items: Sequence[int], device, claimed: int | None = None) -> torch.Tensor:
    """[Σ n, Σ n², Σ m², Σ A] over the ranks' counts n and micro-batch counts m: equal counts
    iff W·Σn² = (Σn)², equal micro-batches iff ΣA·Σm² = (Σn)²; float64 holds them exactly.
    With ``claimed`` (the total this rank was told) also [Σ T, Σ T²]: do the ranks agree."""
    n = float(sum(micro_items))
    values = [n, n * n, float(sum(m * m for m in micro_items)), float(len(micro_items))]
    if claimed is not None:
        values += [float(claimed), float(claimed) ** 2]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _claim(model: torch.nn.Module, reducer: Reducer) -> None:
    """Mark ``model`` as reduced by ``reducer`` (one reducer a model: two would each register a
    hook and divide), and check each training forward runs on a fresh plan."""
    if getattr(model, "_ddp_reduce_attached", False):
        raise ValueError(
            f"a reducer is already attached to this {type(model).__name__}: attach() once per "
            "model and keep the Reducer it returns (a second one would divide the gradients "
            "again or replace the first's plan)"
        )
    model._ddp_reduce_attached = True
    model.register_forward_pre_hook(torch.compiler.disable(reducer._before_forward))


_DEFAULT = reduction.ReduceSettings()  # attach's defaults are the config's (reduce.*)


def attach(
    model: DDP,
    loss: str | reduction.LossReduction = _DEFAULT.loss.name,
    op: str | reduction.ReduceOp = _DEFAULT.op.name,
    noise: bool = False,
    *,
    dtype: str | reduction.CommDtype = _DEFAULT.dtype.name,
    predivide: str | float = _DEFAULT.predivide,
    impl: str | reduction.ReduceImpl = _DEFAULT.impl.name,
    noise_beta: float = NOISE_BETA,
    noise_population: int | None = None,
    noise_steps: str | NoiseSteps = NoiseSteps.every.name,
    process_group: dist.ProcessGroup | None = None,
) -> Reducer:
    """Attach the reduction layer to a ``DistributedDataParallel`` model (or an FSDP2 one, or
    either inside Lightning Fabric's, Accelerate's or ``torch.compile``'s wrapper).

    ``loss``: ``sum`` or ``mean``, how your loss reduces over this rank's items of the step
    (compute it as a *sum* and multiply by :meth:`Reducer.loss_scale`); ``op``: ``sum``,
    ``mean`` or ``global_mean``, the reduction across ranks. ``noise``: estimate the gradient
    noise scale from the ranks' own gradients (W >= 2), on every step or, with
    ``noise_steps="logged"``, on the steps planned with ``log=True`` only. ``dtype``: what the
    gradients travel in; ``predivide``: where the division happens (``none``, ``sqrt``,
    ``full`` or a factor).
    """
    return Reducer(
        find_reduced(model),
        _enum(reduction.LossReduction, loss),
        _enum(reduction.ReduceOp, op),
        impl=_enum(reduction.ReduceImpl, impl),
        noise=noise,
        dtype=_enum(reduction.CommDtype, dtype),
        predivide=predivide,
        noise_beta=noise_beta,
        noise_population=noise_population,
        process_group=process_group,
        noise_steps=_enum(NoiseSteps, noise_steps),
    )


# -- the arithmetic, carried out ------------------------------------------------------------


def _divisor_value(step: _InFlight):
    step.reduced = True
    d = step.divisor
    return d.tensor() if isinstance(d, _LazyCount) else d


def _reduce_bucket(reducer: Reducer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce one bucket with the planned division.

    The squared norm of the rank's own gradient (noise scale) is read before any division and,
    summed over the step's buckets, rides at the end of the last bucket's all-reduce (no
    collective of its own; a float32 one beside it when the gradients travel in bf16/fp16).
    """
    step, group = reducer._step, reducer.process_group
    buffer = bucket.buffer()
    comm_dtype = TORCH_DTYPES[reducer.dtype]
    step.read_local(buffer, low_precision=comm_dtype in LOW_PRECISION)
    before, after = reduction.division_split(_divisor_value(step), reducer.predivide)
    send = buffer if buffer.dtype == comm_dtype else buffer.to(comm_dtype)
    reference = None
    if step.audit:
        reference = buffer.double()
        if isinstance(before, torch.Tensor) or before != 1:
            reference.div_(before)
    if isinstance(before, torch.Tensor) or before != 1:
        send.div_(before)
    n = send.numel()
    scalars = None
    if step.collect_sq and bucket.is_last():
        if send.dtype in (torch.float32, torch.float64):
            send = torch.cat([send, step.local_sq.to(send.dtype).view(1)])
        else:
            scalars = step.local_sq.view(1).clone()
    futures = [dist.all_reduce(send, group=group, async_op=True).get_future()]
    if scalars is not None:
        futures.append(dist.all_reduce(scalars, group=group, async_op=True).get_future())
    if reference is not None:
        futures.append(dist.all_reduce(reference, group=group, async_op=True).get_future())
    post = after if isinstance(after, torch.Tensor) or after != 1 else None

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        out = futures[0].value()[0]
        if out.numel() > n:
            step.ranks_sq = out[n:].double().sum()
            out = out[:n]
        elif scalars is not None:
            step.ranks_sq = futures[1].value()[0].double().sum()
        if post is not None:
            out.div_(post)
        if reference is not None:
            ref = futures[-1].value()[0]
            if post is not None:
                ref.div_(post)
            step.add_audit(out, ref)
        if out.dtype != buffer.dtype or out.data_ptr() != buffer.data_ptr():
            buffer.copy_(out)
        return buffer

    if len(futures) == 1:
        return futures[0].then(finish)
    return torch.futures.collect_all(futures).then(finish)


# reduce_scatter_single in current torch; reduce_scatter_tensor, its older name, before it
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _FSDPReduceScatter:
    """FSDP2's reduce-scatter, with the planned division around a SUM, the ranks' own
    gradient norms read before it (noise scale), and the float64 audit on logged steps.

    FSDP hands each unit's flattened local gradient (in its reduce dtype) and takes back this
    rank's shard of the sum; the interface is FSDP's ``set_custom_reduce_scatter``'s.
    """

    def __init__(self, reducer: Reducer):
        self.reducer = reducer

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        step = self.reducer._step
        step.read_local(input_tensor, input_tensor.dtype in LOW_PRECISION)
        before, after = reduction.division_split(_divisor_value(step), self.reducer.predivide)
        reference, hsdp = None, self.reducer._hsdp
        if step.audit:
            reference = input_tensor.double() / before
            if hsdp is not None:  # summed over the replicas too
                ref_out = hsdp.reference_shard(reference, group, self.reducer.process_group)
            else:
                ref_out = torch.empty(
                    output_tensor.shape, dtype=torch.float64, device=output_tensor.device
                )
                _reduce_scatter(ref_out, reference, group=group)
        if isinstance(before, torch.Tensor) or before != 1:
            input_tensor.div_(before)
        _reduce_scatter(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=group)
        if hsdp is not None:  # the rest after FSDP's all-reduce over the replicas
            hsdp.pending_ref = ref_out if reference is not None else None
            return None
        if isinstance(after, torch.Tensor) or after != 1:
            output_tensor.div_(after)
        if reference is not None:
            ref_out.div_(after)
            step.add_audit(output_tensor, ref_out)  # a shard's: summed over ranks when read
        return None


def _after_all_reduce(reducer: Reducer, reduced: torch.Tensor) -> None:
    """FSDP's all-reduce hook under HSDP: the division left for after the all-reduce."""
    step = reducer._step
    reducer._hsdp.finish(reduced, _divisor_value(step), step)


def _reduce_manually(reducer: Reducer) -> None:
    """Reference implementation of the hook's arithmetic: one all-reduce per gradient after
    the backward, the squared norms in float64 in a collective of their own."""
    step, group = reducer._step, reducer.process_group
    grads = [p.grad for p in reducer.params if p.grad is not None]
    local_sq = sum(_sq(g.flatten()) for g in grads) * (step.plan.to_local_mean / step.amp) ** 2
    ranks_sq = local_sq.clone()
    dist.all_reduce(ranks_sq, group=group)
    if step.collect_sq:
        step.local_sq, step.ranks_sq = local_sq, ranks_sq
    d = _divisor_value(step)
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
        if isinstance(d, torch.Tensor) or d != 1.0:
            g.div_(d)
