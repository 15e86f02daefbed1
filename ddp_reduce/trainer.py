"""The trainer: one optimizer step, run by every rank, and the state a resumed run needs.

A step: every rank takes its slice of the global batch, the reduction layer plans the step from
every rank's item count (with the data in memory and the built-in losses the sampler is global,
so each rank knows them all before the forward; otherwise they are all-reduced beside it),
the rank runs its A micro-batches (gradients reduced on the last one only), and the optimizer
receives c·G. The loss that is logged is the all-reduced one, per item (c = 1 units), never rank
0's own. Writing the run directory is :mod:`ddp_reduce.run.job`'s business, not this module's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddp_reduce import parallel
from ddp_reduce.batches import LoaderBatches, MemoryBatches, as_dataset, eval_batches
from ddp_reduce.config import (
    BatchGeometry,
    ConfigError,
    Loader,
    Precision,
    RunConfig,
    batch_geometry,
    to_dict,
)
from ddp_reduce.data import Dataset, GlobalBatchSampler, Split, UserData, load_data
from ddp_reduce.distributed import DistContext
from ddp_reduce.layer.noise import NoiseEstimate, NoiseSource, noise_source
from ddp_reduce.layer.reducer import TORCH_DTYPES, Reducer, StepReport, attach
from ddp_reduce.layer.reduction import LossReduction, ReduceImpl
from ddp_reduce.layer.strategy import total_norm
from ddp_reduce.models import (
    Objective,
    TermsLoss,
    build_model,
    build_objective,
    check_model_for_data,
)
from ddp_reduce.optim import build_optimizer, build_schedule, effective_optim
from ddp_reduce.verdict import Verdicts, blown_up


@dataclass
class Prepared:
    data: Dataset | UserData
    geometry: BatchGeometry
    model: nn.Module  # built with the run's seed: the same initial weights for every world size
    objective: Objective


def prepare(cfg: RunConfig, world_size: int) -> Prepared:
    """Load the data, build the model and the loss, derive the batch geometry; refuses what
    does not fit or divide. Your own parts (``_target_``) are tried on a batch of two."""
    check_model_for_data(cfg)
    data = load_data(cfg.data)
    geometry = batch_geometry(cfg, world_size, len(data.train))
    effective_optim(cfg.optim, geometry.global_batch_size)  # refuses an impossible rescaling
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    objective = build_objective(cfg, data)
    if cfg.data.target or cfg.model.target or cfg.loss.target:
        _try_a_batch(cfg, data, model, objective)
    return Prepared(data, geometry, model, objective)


def _try_a_batch(cfg: RunConfig, data: Any, model: nn.Module, objective: Objective) -> None:
    """Your model and loss on two training samples, so a mismatch is a config error now, not
    a traceback on every rank later."""
    dataset, collate = as_dataset(data.train)
    stage, key = "collating two samples", "data._target_"
    try:
        batch = collate([dataset[i] for i in range(min(2, len(dataset)))])
        stage, key = (
            "the model's forward",
            "model._target_" if cfg.model.target else "data._target_",
        )
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(batch.x)
            stage = "the loss"
            key = "loss._target_" if cfg.loss.target else key
            objective(out, batch)
        model.train(was_training)
    except Exception as exc:
        target = {"data._target_": cfg.data.target, "model._target_": cfg.model.target}.get(
            key, cfg.loss.target
        )
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            key, target, f"parts that work together; {stage} raised {type(exc).__name__}: {first}"
        ) from None


def evaluate(
    model: nn.Module,
    objective: Objective,
    split: Any,
    ctx: DistContext,
    num_workers: int = 0,
) -> tuple[float, float | None]:
    """Per-item loss and accuracy over a whole split, sharded across ranks and all-reduced."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    has_accuracy = True
    with torch.no_grad():
        for batch in eval_batches(split, ctx.rank, ctx.world_size, ctx.device, num_workers):
            loss, correct = objective(model(batch.x), batch)
            sums[0] += loss
            sums[2] += objective.count(batch)
            if correct is None:
                has_accuracy = False
            else:
                sums[1] += correct
    dist.all_reduce(sums)
    model.train(was_training)
    loss, correct, items = sums.tolist()
    return loss / items, (correct / items if has_accuracy else None)


@dataclass
class StepOutcome:
    """What one optimizer step came to, identical on every rank."""

    step: int  # its number, 1-based
    report: StepReport  # c, exactness, item counts, |c·G|, noise statistics
    losses: list[torch.Tensor] = field(repr=False)  # this rank's summed loss per micro-batch
    loss: float | None = None  # all-reduced loss per item of the global batch; logged steps
    local_norm_mean: float | None = None  # mean over ranks of |local mean gradient|; logged
    # Once the verdict is read: the step the run diverged at (this one or, read late, an
    # earlier one, whose update was rolled back) and why; None while the run goes on.
    diverged_at: int | None = None
    why: str | None = None
    skipped: bool = False  # fp16: the loss scaler skipped this step (a non-finite gradient)


@dataclass
class CRange:
    """The range of c over the steps so far, and whether every step had an exact c."""

    low: float = float("inf")
    high: float = float("-inf")
    exact: bool = True

    def add(self, report: StepReport) -> None:
        self.low, self.high = min(self.low, report.c), max(self.high, report.c)
        self.exact = self.exact and report.exact

    def state_dict(self) -> dict[str, Any]:
        return {"min": self.low, "max": self.high, "exact": self.exact}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low, self.high, self.exact = state["min"], state["max"], state["exact"]


class Trainer:
    """Model, optimizer, schedule, sampler and reduction layer of one run, and its progress:
    ``step`` (optimizer steps done) and ``c_range``, both in :meth:`state_dict`."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, prepared: Prepared | None = None):
        self.cfg, self.ctx = cfg, ctx
        prepared = prepared or prepare(cfg, ctx.world_size)
        self.data, self.geom, self.objective = prepared.data, prepared.geometry, prepared.objective
        # memory: whole splits on the device; loader: a DataLoader reads them batch by batch
        self.in_memory = cfg.data.loader is Loader.memory or (
            cfg.data.loader is Loader.auto and isinstance(self.data, Dataset)
        )
        device = ctx.device if self.in_memory else torch.device("cpu")
        self.train_split = _to_device(self.data.train, device)
        self.test_split = _to_device(self.data.test, device)
        self.sampler = GlobalBatchSampler(
            len(self.train_split), self.geom.global_batch_size, cfg.seed, cfg.data.last_batch
        )
        reduce_cfg = cfg.reduce
        self.model = prepared.model.to(ctx.device)
        # DDP(model), or model itself sharded in place (FSDP2): the one seam of the strategy
        self.wrapped = parallel.wrap(
            self.model,
            cfg.dist.strategy,
            ctx,
            reduce_dtype=TORCH_DTYPES[reduce_cfg.dtype],
            replicate=cfg.dist.replicate,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.noise_source, self.noise_unavailable = noise_source(
            cfg.noise.enabled,
            ctx.world_size,
            cfg.train.accum_steps,
            reduce_cfg.impl is not ReduceImpl.builtin,
        )
        # Items are drawn without replacement; where an item is a token, whole sequences are:
        # no finite-population correction then.
        population = len(self.train_split) if self.objective.per_sample else None
        self.reducer: Reducer = attach(
            self.wrapped,
            reduce_cfg.loss,
            reduce_cfg.op,
            noise=self.noise_source is not None,
            dtype=reduce_cfg.dtype,
            predivide=reduce_cfg.predivide,
            impl=reduce_cfg.impl,
            noise_beta=cfg.noise.beta,
            noise_population=population,
            noise_steps=cfg.noise.steps,
        )
        self.optimizer = build_optimizer(cfg.optim, self.model, self.geom.global_batch_size)
        self.schedule = build_schedule(cfg.optim, self.optimizer, cfg.train.steps)
        self.step = 0  # optimizer steps done
        self.c_range = CRange()
        self.verdicts = Verdicts()
        self._unsettled: list[StepOutcome] = []  # steps taken, their verdict not read yet
        self._sound: dict[str, Any] = {}  # the state before them (see train_step)
        self.initial_loss: float | None = None  # over the training set, before the first step
        # fp16: a loss scaler (its unscale_ divides the reduced gradient, c·G·S, by S: c stays)
        self.scaler = (
            torch.amp.GradScaler(ctx.device.type, init_scale=cfg.train.loss_scale_init)
            if cfg.train.precision is Precision.fp16
            else None
        )
        self._batches: MemoryBatches | LoaderBatches | None = None

    def batches(self) -> MemoryBatches | LoaderBatches:
        """Where the steps' micro-batches come from (made at the first step, after a resume)."""
        if self._batches is None:
            ctx, accum = self.ctx, self.geom.accum_steps
            if self.in_memory:
                self._batches = MemoryBatches(
                    self.train_split,
                    self.sampler,
                    ctx.rank,
                    ctx.world_size,
                    accum,
                    counts_known=self.objective.counts_split_items,
                )
            else:
                self._batches = LoaderBatches(
                    self.train_split,
                    self.sampler,
                    ctx.rank,
                    ctx.world_size,
                    accum,
                    ctx.device,
                    self.cfg.data.num_workers,
                    start=self.step,
                    stop=self.cfg.train.steps,
                )
        return self._batches

    def forward_backward(self, step: int, log: bool = False) -> StepOutcome:
        """Step ``step`` (1-based) up to the reduced gradient; the optimizer is not touched.

        The only collective is the gradient all-reduce, and nothing is read from the device,
        unless ``log`` asks for the step's all-reduced loss and accuracy (one small collective
        and one read more).
        """
        # micro_mean is exact only where every micro-batch holds the same count
        batches = self.batches().step(step, self.cfg.reduce.loss is LossReduction.micro_mean)
        micro_items = batches.micro_items
        if micro_items is None:
            micro_items = [self.objective.count(batch) for batch in batches.micro]
        amp = self._amp_scale()
        if isinstance(self.objective, TermsLoss):  # several terms: a factor per unit
            scales = self.objective.plan(self.reducer, batches.micro, log=log, amp=amp)
        else:
            scales = self.reducer.loss_scales(
                micro_items,
                counts=batches.counts,
                micro_equal=batches.micro_equal,
                log=log,
                amp=amp,
            )
        losses, corrects = [], []  # summed only where read: a logged or a diverged step
        last = len(batches.micro) - 1
        for micro, batch in enumerate(batches.micro):
            with self.reducer.micro_batch(last=micro == last):
                with self._autocast():  # accuracy on logged steps only: it costs a pass
                    loss_sum, correct = self.objective(self.wrapped(batch.x), batch, log)
                loss_sum = loss_sum.float()
                if self._poisoned(step):
                    loss_sum = loss_sum * float("nan")
                # The loss scale as a tensor that is NaN where this rank's loss is not finite
                # (0·x is NaN for x = inf or NaN, 0 otherwise): such a loss makes the rank's
                # gradient NaN (at least the layers whose backward multiplies, the last one
                # included), which the all-reduce carries to every rank, and all stop
                # at this step with no collective of their own. Where finite, the product is
                # loss·scale, bit for bit.
                scale = loss_sum.detach() * 0.0 + scales[micro]
                objective = loss_sum * scale
                if self.cfg.optim.l2:
                    # (l2/2)·|w|² on every item, so the term is scaled with the loss.
                    l2 = 0.5 * sum(p.pow(2).sum() for p in self.params)
                    l2_scale = self.cfg.optim.l2 * micro_items[micro] * scales[micro]
                    objective = objective + l2_scale * l2
                # fp16: the loss scaler's factor too, taken out again by unscale_ below
                (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
            losses.append(loss_sum.detach())
            if correct is not None:
                corrects.append(correct)
            small = micro == 0 and self.noise_source is NoiseSource.micro
            if small and self.reducer.feeds_noise(log):
                # One rank, A >= 2: the first micro-batch's own gradient is the small batch.
                sq = total_norm(self.params).double() ** 2
                mean_sq = sq / (scales[0] * amp * micro_items[0]) ** 2
                self.reducer.small_batch(micro_items[0], mean_sq)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        outcome = StepOutcome(step, self.reducer.last_step, losses)
        outcome.report.grad_norm  # noqa: B018 (|c·G| of this step's gradient, on the device)
        if log:
            self._log_stats(outcome, corrects)
        return outcome

    def _amp_scale(self) -> float | torch.Tensor:
        """fp16: the loss scaler's factor, as the tensor it keeps on the device (read only
        where the noise estimate's norms divide by it); 1 otherwise."""
        if self.scaler is None:
            return 1.0
        scale = self.scaler._get_scale_async()  # PyTorch's own no-sync getter
        return self.scaler.get_scale() if scale is None else scale  # None: the initial one

    def _log_stats(self, outcome: StepOutcome, corrects: list[torch.Tensor]) -> None:
        """The step's all-reduced loss per item and the ranks' mean local gradient norm."""
        report = outcome.report
        loss_local = _summed(outcome.losses, self.ctx.device)
        correct_local = _summed(corrects, self.ctx.device)
        local_sq = report.local_sq
        local_norm = local_sq.sqrt() if local_sq is not None else torch.zeros_like(loss_local)
        stats = torch.stack([loss_local, correct_local, local_norm.to(loss_local.dtype)])
        dist.all_reduce(stats)
        loss_total, _, local_norm_sum = stats.tolist()
        outcome.loss = loss_total / report.global_items
        if local_sq is not None:
            outcome.local_norm_mean = local_norm_sum / self.ctx.world_size

    def _cause(self, outcome: StepOutcome) -> str:
        """Where a non-finite reduced gradient came from, the same verdict on every rank (one
        small collective, on such a step only): a rank's loss, a rank's own gradient (the
        backward), or the reduction itself (the communication overflowed)."""
        amax = outcome.report.local_amax
        flags = torch.tensor(
            [
                float(not torch.isfinite(_summed(outcome.losses, self.ctx.device))),
                float(amax is not None and not torch.isfinite(amax)),
                float(amax is None),  # this rank's gradient was not looked at before reducing
            ],
            device=self.ctx.device,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad, unseen = flags.tolist()
        if loss_bad:
            return "loss"
        if grad_bad:
            return "backward"
        return "gradient" if unseen else "reduction"

    def _autocast(self):
        if self.cfg.train.precision is Precision.fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=_AUTOCAST[self.cfg.train.precision])

    def _poisoned(self, step: int) -> bool:
        fault = self.cfg.fault
        return fault.nan_at_step == step and fault.nan_rank == self.ctx.rank

    def optimizer_step(self, outcome: StepOutcome) -> None:
        if self.cfg.optim.clip_norm is not None:
            parallel.clip(self.params, self.cfg.optim.clip_norm, outcome.report.grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped where a gradient is not finite
            self.scaler.update()
            with warnings.catch_warnings():
                # The schedule follows the step count, a skipped step included (the lr of
                # step t is the same with or without a loss scaler); PyTorch warns when the
                # first optimizer step was the one skipped.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                self.schedule.step()
        else:
            self.optimizer.step()
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def apply(self, outcome: StepOutcome) -> None:
        """Take the optimizer step whose gradient ``outcome`` reduced."""
        self.optimizer_step(outcome)
        self.step += 1

    def train_step(self, log: bool = False, settle: bool = True) -> StepOutcome:
        """The next optimizer step, the one step of a run and of the benchmarks: forward,
        backward and reduction, the divergence verdict, the optimizer step.

        A step that diverges (``outcome.diverged_at``, ``outcome.why``) is not taken: the
        weights stay those of the step before. ``log``: also all-reduce the step's loss and
        accuracy into the outcome. ``settle=False``: read nothing from the device (no host
        synchronization): the step is taken, its verdict read with the next settled step's,
        and a step found non-finite then is undone (:meth:`_roll_back`). Settle before
        reading or saving the state (a logged step, an evaluation, a checkpoint, the last
        step). Under fp16 every step settles: the loss scaler reads its own verdict anyway.
        """
        settle = settle or log or self.scaler is not None
        if not settle and not self._unsettled:
            self._sound = self._capture()  # the state after the last step known to be sound
        outcome = self.forward_backward(self.step + 1, log=log)
        self.c_range.add(outcome.report)
        if settle:
            self._settle(outcome)
        else:
            outcome.report.update_noise()
            self._unsettled.append(outcome)
            self.apply(outcome)
        return outcome

    def _settle(self, outcome: StepOutcome) -> None:
        """Read the verdict of ``outcome``'s step and of the unsettled steps before it (one
        read of their norms |c·G|); take the step unless the run diverged."""
        pending, self._unsettled = [*self._unsettled, outcome], []
        finite = torch.isfinite(torch.stack([o.report.grad_norm for o in pending])).tolist()
        bad = next((o for o, ok in zip(pending, finite, strict=True) if not ok), None)
        amp = self.scaler is not None
        if bad is None:
            self.verdicts.finite()
            outcome.why = blown_up(outcome.loss, self.initial_loss, self.cfg.train.blowup_factor)
        else:
            dtype = self.cfg.reduce.dtype.name
            outcome.why = self.verdicts.non_finite(bad.step, self._cause(bad), dtype, amp)
            outcome.skipped = outcome.why is None  # fp16 (bad is this step): the scaler skips
        if outcome.why:
            outcome.diverged_at = outcome.step if bad is None else bad.step
            if bad is not None and bad is not outcome:
                self._roll_back(bad)
            return
        if not outcome.skipped:
            outcome.report.update_noise()
        self.reducer.noise_estimate()  # the steps since folded in, their norms read in one go
        self.apply(outcome)  # fp16: the loss scaler skips a step whose gradient is not finite

    def _capture(self) -> dict[str, Any]:
        """What :meth:`_roll_back` restores: weights, optimizer, schedule, RNG, c range and
        noise estimate, copied on the device (nothing is read)."""
        return {
            "step": self.step,
            "model": [t.detach().clone() for t in self.model.state_dict().values()],
            "optimizer": {
                p: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
                for p, state in self.optimizer.state.items()
            },
            "lr": [group["lr"] for group in self.optimizer.param_groups],
            "schedule": self.schedule.state_dict(),
            "rng": _rng_state(self.ctx.device),
            "c_range": dataclasses.replace(self.c_range),
            "noise": self.reducer.noise_state(),
        }

    def _roll_back(self, bad: StepOutcome) -> None:
        """Undo the steps taken unsettled from the diverged one ``bad`` on: back to the state
        captured before them, then the steps between that and ``bad`` again (the same batches
        and random numbers: the same updates), so the weights are those after ``bad.step - 1``
        exactly, as if the verdict had been read at every step."""
        sound = self._sound
        self.optimizer.zero_grad(set_to_none=True)  # the diverged gradient of the last step
        for now, then in zip(self.model.state_dict().values(), sound["model"], strict=True):
            now.copy_(then)
        self.optimizer.state.clear()
        for p, state in sound["optimizer"].items():
            self.optimizer.state[p] = state
        for group, lr in zip(self.optimizer.param_groups, sound["lr"], strict=True):
            group["lr"] = lr
        self.schedule.load_state_dict(sound["schedule"])
        _set_rng_state(sound["rng"], self.ctx.device)
        self.c_range = sound["c_range"]
        self.reducer.set_noise_state(sound["noise"])
        self.step = sound["step"]
        if not self.in_memory:
            self._batches = None  # a DataLoader again from this step
        while self.step + 1 < bad.step:
            replayed = self.forward_backward(self.step + 1)
            self.c_range.add(replayed.report)
            replayed.report.update_noise()
            self.apply(replayed)
        self.c_range.add(bad.report)

    def noise(self) -> NoiseEstimate | None:
        """The running noise-scale estimate, read from the device (None before its first
        step, or with no estimate)."""
        return self.reducer.noise_estimate()

    def evaluate(self, split: Any) -> tuple[float, float | None]:
        return evaluate(self.model, self.objective, split, self.ctx, self.cfg.data.num_workers)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, on the CPU; a collective under FSDP."""
        return parallel.full_model_state(self.wrapped)

    def extra_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the model and the optimizer; a collective (every
        rank's RNG state is gathered)."""
        every_rng: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(every_rng, _rng_state(self.ctx.device))
        return {
            "step": self.step,
            "config": to_dict(self.cfg),
            "global_batch_size": self.geom.global_batch_size,
            "world_size": self.ctx.world_size,
            "strategy": self.cfg.dist.strategy.name,
            "schedule": self.schedule.state_dict(),
            "rng": every_rng,
            "c_range": self.c_range.state_dict(),
            "initial_loss": self.initial_loss,
            "reducer": self.reducer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        # Same world size: each rank gets its own RNG back; otherwise rank 0's, for all.
        rngs = state["rng"]
        rng = rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0]
        _set_rng_state(rng, self.ctx.device)
        self.step = state["step"]
        self.c_range.load_state_dict(state["c_range"])
        self.initial_loss = state["initial_loss"]
        self.reducer.load_state_dict(state["reducer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, the model and optimizer state whole (keyed by
        parameter name, the same under DDP and FSDP); a collective."""
        return {
            **self.extra_state(),
            "model": self.model_state(),
            "optimizer": parallel.full_optimizer_state(self.wrapped, self.optimizer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.set_full_state(self.wrapped, self.optimizer, state["model"], state["optimizer"])
        self.load_extra_state(state)

    def close(self) -> None:
        # The DDP reducer holds the process group: release it before the group is destroyed.
        del self.wrapped


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _summed(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of some 0-dim tensors in float64 (0 for none), left on the device."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for value in values:
        total += value
    return total


def _to_device(split: Any, device: torch.device) -> Any:
    """A built-in split on ``device``; your own data stay where they are."""
    return split.to(device) if isinstance(split, Split) else split


_AUTOCAST = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
