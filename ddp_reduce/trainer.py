"""The training loop: one readable step, run by every rank.

A step: every rank takes its slice of the global batch, runs A micro-steps (``no_sync`` around
forward *and* backward of all but the last), and the reduction layer
(:mod:`ddp_reduce.reduction`) turns the local gradients into c·G during the last backward. The
loss that is logged is the all-reduced one, per item (c = 1 units), never rank 0's own.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_reduce import checkpoint
from ddp_reduce import reduction as R
from ddp_reduce.config import BatchGeometry, RunConfig, batch_geometry, to_dict
from ddp_reduce.data import Dataset, GlobalBatchSampler, Split, Task, load_dataset
from ddp_reduce.distributed import DistContext
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.noise import NoiseEstimate, NoiseScaleEstimator
from ddp_reduce.optim import build_optimizer, build_schedule, effective_optim
from ddp_reduce.rundir import (
    SUMMARY,
    MetricsLogger,
    NullLogger,
    clear_results,
    read_summary,
    save_model,
    versions,
    write_config,
    write_json,
)
from ddp_reduce.sysinfo import peak_rss_mb, rss_mb


@dataclass
class Prepared:
    data: Dataset
    geometry: BatchGeometry


def prepare(cfg: RunConfig, world_size: int) -> Prepared:
    """Load the data and derive the batch geometry; refuses what does not divide or fit."""
    data = load_dataset(cfg.data)
    geometry = batch_geometry(cfg, world_size, len(data.train))
    effective_optim(cfg.optim, geometry.global_batch_size)  # refuses an impossible rescaling
    return Prepared(data, geometry)


def evaluate(
    model: nn.Module, task: Task, split: Split, ctx: DistContext
) -> tuple[float, float | None]:
    """Per-item loss and accuracy over a whole split, sharded across ranks and all-reduced."""
    was_training = model.training
    model.eval()
    shard = torch.tensor_split(torch.arange(len(split)), ctx.world_size)[ctx.rank]
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for idx in torch.split(shard, 2048):
            batch = split.batch(idx)
            loss, correct = loss_sums(task, model(batch.x), batch)
            sums[0] += loss
            sums[1] += correct
            sums[2] += split.items(idx)
    dist.all_reduce(sums)
    model.train(was_training)
    loss, correct, items = sums.tolist()
    return loss / items, (None if task is Task.regression else correct / items)


@dataclass
class StepOutcome:
    """What one step's forward, backward and reduction produced, identical on every rank."""

    loss: float | None  # all-reduced loss per item of the global batch (c = 1); logged steps
    global_items: int
    scale: R.StepScale  # the optimizer receives scale.c · G
    grad_norm: torch.Tensor  # |c·G|: what clipping sees
    local_norm_mean: float | None  # mean over ranks of |local mean gradient|; logged steps
    diverged: bool  # a NaN or inf in some rank's loss or in the gradient
    # (B_small, |G_small|²) for the noise scale: a smaller batch's size and squared mean-gradient
    # norm (c = 1 units); None when there is no second batch size
    small_batch: tuple[float, float] | None = None


@dataclass
class _Window:
    """Throughput since the last logged step."""

    time_s: float = 0.0
    items: int = 0
    steps: int = 0

    def add(self, time_s: float, items: int) -> None:
        self.time_s, self.items, self.steps = (
            self.time_s + time_s,
            self.items + items,
            self.steps + 1,
        )


@dataclass
class _Tally:
    """The range of c over the steps so far, and whether every step had an exact c."""

    low: float = float("inf")
    high: float = float("-inf")
    exact: bool = True

    def add(self, scale: R.StepScale) -> None:
        self.low, self.high = min(self.low, scale.c), max(self.high, scale.c)
        self.exact = self.exact and scale.exact

    def state_dict(self) -> dict[str, Any]:
        return {"min": self.low, "max": self.high, "exact": self.exact}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low, self.high, self.exact = state["min"], state["max"], state["exact"]


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext, prepared: Prepared | None = None):
        self.cfg, self.ctx = cfg, ctx
        prepared = prepared or prepare(cfg, ctx.world_size)
        self.data, self.geom = prepared.data, prepared.geometry
        self.train_split = self.data.train.to(ctx.device)
        self.test_split = self.data.test.to(ctx.device)
        self.sampler = GlobalBatchSampler(
            len(self.train_split), self.geom.global_batch_size, cfg.seed, cfg.data.last_batch
        )
        torch.manual_seed(cfg.seed)  # the same initial weights for every world size
        self.model = build_model(cfg.model, self.data, cfg.data.max_len).to(ctx.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        self.ddp = DDP(self.model, device_ids=device_ids)
        self.reduce_state = R.ReduceState(cfg.reduce.op, ctx.device)
        if cfg.reduce.impl is R.ReduceImpl.hook:
            self.ddp.register_comm_hook(self.reduce_state, R.reduce_hook)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.geom.global_batch_size)
        self.schedule = build_schedule(cfg.optim, self.optimizer, cfg.train.steps)
        self.noise_source, self.noise_unavailable = _noise_source(cfg, ctx.world_size)
        # Items are drawn without replacement; for tokens (lm) whole sequences are: no correction.
        population = None if self.data.task is Task.lm else len(self.train_split)
        self.noise = NoiseScaleEstimator(cfg.noise.beta, population)

    def items_per_rank(self, step: int) -> list[int]:
        """Every rank's item count of step ``step``: the sampler is global, so each rank knows."""
        shares = self.sampler.rank_shares(step - 1, self.ctx.world_size)
        return [self.train_split.items(share) for share in shares]

    def observe_noise(self, outcome: StepOutcome) -> NoiseEstimate | None:
        """Feed a step's two batch sizes to the noise-scale estimate (c = 1 units)."""
        if outcome.small_batch is None:
            return None
        b_small, small_sq = outcome.small_batch
        big_sq = (outcome.grad_norm.item() / outcome.scale.c) ** 2
        return self.noise.update(b_small, outcome.global_items, small_sq, big_sq)

    def forward_backward(self, step: int, log: bool = False) -> StepOutcome:
        """Step ``step`` (1-based) up to the reduced gradient; the optimizer is not touched.

        The only collective is the gradient all-reduce, unless ``log`` asks for the step's
        all-reduced loss and accuracy (one small collective more).
        """
        rc, ctx = self.cfg.reduce, self.ctx
        micro = self.sampler.micro_batches(
            step - 1, ctx.rank, ctx.world_size, self.geom.accum_steps
        )
        micro_items = [self.train_split.items(idx) for idx in micro]
        local_items = sum(micro_items)
        scale = R.loss_scale(rc.loss, local_items)
        collect_local = log or self.noise_source == "ranks"
        to_mean = R.local_to_mean_factor(rc.loss, local_items)
        self.reduce_state.start_step(local_items, to_mean, collect_local)
        loss_local = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct_local = torch.zeros_like(loss_local)
        small_sq = None
        for a, idx in enumerate(micro):
            last = a == len(micro) - 1
            # DDP reads the sync flag in forward: no_sync must wrap forward *and* backward.
            sync = last and rc.impl is not R.ReduceImpl.manual
            with nullcontext() if sync else self.ddp.no_sync():
                batch = self.train_split.batch(idx)
                loss_sum, correct = loss_sums(self.data.task, self.ddp(batch.x), batch)
                if self._poisoned(step):
                    loss_sum = loss_sum * float("nan")
                objective = loss_sum * scale
                if self.cfg.optim.l2:
                    # (l2/2)·|w|² on every item, so the term is scaled with the loss.
                    l2 = 0.5 * sum(p.pow(2).sum() for p in self.params)
                    objective = objective + self.cfg.optim.l2 * micro_items[a] * scale * l2
                # A NaN or inf in this rank's loss turns its gradient into NaN, which the
                # all-reduce carries to every rank: all stop at this step, with no collective
                # of their own. (x 1.0 when finite: the gradient is unchanged, bit for bit.)
                finite = torch.isfinite(loss_sum.detach())
                objective = objective * torch.where(finite, 1.0, float("nan"))
                objective.backward()
            loss_local += loss_sum.detach()
            correct_local += correct
            if a == 0 and self.noise_source == "micro":
                # One rank, A >= 2: the first micro-batch's own gradient is the small batch.
                sq = torch.nn.utils.get_total_norm([p.grad for p in self.params]).double() ** 2
                small_sq = (sq / (scale * micro_items[0]) ** 2).item()
        if rc.impl is R.ReduceImpl.manual:
            R.reduce_gradients_manually(self.params, self.reduce_state)

        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.params if p.grad is not None]
        )
        # The reduced gradient is the same on every rank, so is this verdict.
        diverged = not bool(torch.isfinite(grad_norm))
        all_counts = self.items_per_rank(step)
        global_items = sum(all_counts)
        loss = local_norm_mean = None
        if log:
            local_norm = self.reduce_state.local_sq.sqrt()
            stats = torch.stack([loss_local, correct_local, local_norm])
            dist.all_reduce(stats)
            loss_total, _, local_norm_sum = stats.tolist()
            loss, local_norm_mean = loss_total / global_items, local_norm_sum / ctx.world_size
        small = None
        if self.noise_source == "ranks":
            small = (
                global_items / ctx.world_size,
                self.reduce_state.ranks_sq.item() / ctx.world_size,
            )
        elif self.noise_source == "micro":
            small = (float(micro_items[0]), small_sq)
        return StepOutcome(
            loss=loss,
            global_items=global_items,
            scale=R.step_scale(rc.loss, rc.op, ctx.world_size, all_counts),
            grad_norm=grad_norm,
            local_norm_mean=local_norm_mean,
            diverged=diverged,
            small_batch=small,
        )

    def checkpoint_state(self, step: int, tally: _Tally) -> dict[str, Any]:
        """Everything a resumed run needs; a collective (every rank's RNG state is gathered)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        every_rng: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(every_rng, rng)
        return {
            "step": step,
            "config": to_dict(self.cfg),
            "global_batch_size": self.geom.global_batch_size,
            "world_size": self.ctx.world_size,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": every_rng,
            "tally": tally.state_dict(),
            "noise": self.noise.state_dict(),
        }

    def restore(self, state: dict[str, Any], tally: _Tally) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        # Same world size: each rank gets its own RNG back; otherwise rank 0's, for all.
        rngs = state["rng"]
        rng = rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        tally.load_state_dict(state["tally"])
        self.noise.load_state_dict(state["noise"])

    def _poisoned(self, step: int) -> bool:
        fault = self.cfg.fault
        return fault.nan_at_step == step and fault.nan_rank == self.ctx.rank

    def optimizer_step(self, outcome: StepOutcome) -> None:
        if self.cfg.optim.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(
                self.params, self.cfg.optim.clip_norm, outcome.grad_norm
            )
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, split: Split) -> tuple[float, float | None]:
        return evaluate(self.model, self.data.task, split, self.ctx)

    def close(self) -> None:
        # The DDP reducer holds the process group: release it before the group is destroyed.
        del self.ddp


def train(
    cfg: RunConfig, run_dir: Path, ctx: DistContext, prepared: Prepared | None = None
) -> dict[str, Any]:
    """Train one run; rank 0 writes the run directory. Returns the summary (on every rank)."""
    start = time.perf_counter()
    trainer = Trainer(cfg, ctx, prepared)
    geom, tc = trainer.geom, cfg.train
    if ctx.is_main:
        previous = read_summary(run_dir)
        if tc.overwrite and previous and previous.get("status") == "completed":
            clear_results(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, to_dict(cfg))
    status, diverged_at = "completed", None
    tally, window = _Tally(), _Window()
    resumed_from = _resume(trainer, run_dir, tally)
    steps_done = resumed_from or 0
    progress = None
    if ctx.is_main and tc.progress and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=tc.steps, initial=steps_done, unit="step", dynamic_ncols=True)
    if ctx.is_main:
        logger: MetricsLogger | NullLogger = MetricsLogger(
            run_dir,
            resume_step=steps_done,
            mode=f"{cfg.reduce.loss.name}-{cfg.reduce.op.name}",
            global_batch=geom.global_batch_size,
        )
    else:
        logger = NullLogger()
    last_loss = None  # the all-reduced training loss of the last logged step
    steps_to_target = None
    # the loss over the whole training set before the first step (None when resuming)
    initial_loss = None if resumed_from else trainer.evaluate(trainer.train_split)[0]
    try:
        for step in range(steps_done + 1, tc.steps + 1):
            _maybe_crash(cfg, ctx, step)
            t0 = time.perf_counter()
            log_now = step % tc.log_every == 0 or step == tc.steps
            outcome = trainer.forward_backward(step, log=log_now)
            tally.add(outcome.scale)
            if outcome.diverged:
                status, diverged_at = "diverged", step
                break
            before = torch.cat([p.detach().flatten() for p in trainer.params]) if log_now else None
            lr = trainer.optimizer.param_groups[0]["lr"]
            trainer.optimizer_step(outcome)
            steps_done = step
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            window.add(time.perf_counter() - t0, outcome.global_items)
            noise_now = trainer.observe_noise(outcome)

            scalars: dict[str, float | None] = {}
            if log_now:
                last_loss = outcome.loss
                after = torch.cat([p.detach().flatten() for p in trainer.params])
                grad_norm = outcome.grad_norm.item()
                scalars = {
                    "train/loss": outcome.loss,
                    "optim/lr": lr,
                    "grad/global_norm": grad_norm,
                    "grad/global_norm_c1": grad_norm / outcome.scale.c,
                    "grad/local_norm_mean": (
                        None if cfg.reduce.impl is R.ReduceImpl.builtin else outcome.local_norm_mean
                    ),
                    "reduce/grad_scale": outcome.scale.c,
                    "optim/update_to_weight": ((after - before).norm() / after.norm()).item(),
                    "perf/items_per_s": window.items / window.time_s,
                    "perf/step_time_s": window.time_s / window.steps,
                    "perf/rss_mb": rss_mb(),
                }
                if noise_now is not None:
                    scalars.update(
                        {
                            "noise/grad_sq": noise_now.grad_sq,
                            "noise/trace_sigma": noise_now.trace_sigma,
                            "noise/b_simple": noise_now.b_simple,
                        }
                    )
                window = _Window()
            reached = False
            if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                eval_loss, eval_acc = trainer.evaluate(trainer.test_split)
                scalars.update({"eval/loss": eval_loss, "eval/accuracy": eval_acc})
                if tc.target_loss is not None:
                    full_loss, _ = trainer.evaluate(trainer.train_split)
                    scalars["train/full_loss"] = full_loss
                    reached = full_loss <= tc.target_loss
            if scalars:
                logger.log(step, scalars)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                state = trainer.checkpoint_state(step, tally)
                if ctx.is_main:
                    checkpoint.save(run_dir, state, tc.keep_checkpoints)
            if progress is not None:
                progress.update(1)
                if outcome.loss is not None:
                    progress.set_postfix(loss=f"{outcome.loss:.4g}")
            if reached:
                steps_to_target = step
                break

        train_loss, train_acc = trainer.evaluate(trainer.train_split)
        eval_loss, eval_acc = trainer.evaluate(trainer.test_split)
        target = tc.target_loss
        if target is not None and steps_to_target is None and status == "completed":
            steps_to_target = steps_done if train_loss <= target else None
        logger.log(steps_done, {"eval/loss": eval_loss, "eval/accuracy": eval_acc})
        rc = cfg.reduce
        peaks: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(peaks, round(peak_rss_mb(), 1))
        summary = {
            "status": status,
            "diverged_at_step": diverged_at,
            "steps_done": steps_done,
            "steps_planned": tc.steps,
            "resumed_from_step": resumed_from,
            "grad_scale": R.nominal_scale(
                rc.loss, rc.op, geom.world_size, geom.local_batch_size, geom.accum_steps
            ),
            "grad_scale_rule": R.scale_rule(rc.loss, rc.op),
            "grad_scale_range": [tally.low, tally.high],
            "grad_scale_exact": tally.exact,
            "reduce_loss": rc.loss.name,
            "reduce_op": rc.op.name,
            "reduce_impl": rc.impl.name,
            "world_size": geom.world_size,
            "local_batch_size": geom.local_batch_size,
            "accum_steps": geom.accum_steps,
            "global_batch_size": geom.global_batch_size,
            "train_items": len(trainer.train_split),
            "final_train_loss": train_loss,
            "final_train_accuracy": train_acc,
            "final_eval_loss": eval_loss,
            "final_eval_accuracy": eval_acc,
            "last_logged_train_loss": last_loss,
            "initial_train_loss": initial_loss,
            "target_loss": tc.target_loss,
            "steps_to_target": steps_to_target,
            "optim_effective": asdict(effective_optim(cfg.optim, geom.global_batch_size)),
            **_noise_summary(trainer),
            "wall_time_s": time.perf_counter() - start,
            "device": str(ctx.device),
            "backend": ctx.backend,
            "threads_per_rank": ctx.threads if ctx.device.type == "cpu" else None,
            "peak_rss_mb_per_rank": peaks,
            "run_dir": str(run_dir),
            "versions": versions(),
        }
        if ctx.is_main:
            state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
            save_model(run_dir, state)
            final = {
                "final/train_loss": train_loss,
                "final/eval_loss": eval_loss,
                "final/eval_accuracy": eval_acc,
                "final/diverged": float(status == "diverged"),
            }
            logger.hparams(_hparams(cfg, geom, summary), final)
            write_json(run_dir / SUMMARY, summary)
        return summary
    finally:
        if progress is not None:
            progress.close()
        logger.close()
        trainer.close()


def _resume(trainer: Trainer, run_dir: Path, tally: _Tally) -> int | None:
    """Restore the newest valid checkpoint of this run, if any; returns its step.

    Rank 0 reads and verifies it (weights only) and broadcasts it, so the other ranks, on other
    nodes too, need no shared file system.
    """
    ctx = trainer.ctx
    found: list[Any] = [None]
    if ctx.is_main:
        try:
            latest = checkpoint.load_latest(run_dir)
            if latest is not None:
                checkpoint.check_compatible(
                    latest.state, to_dict(trainer.cfg), trainer.geom.global_batch_size
                )
                print(
                    f"ddp-reduce: resuming from {latest.path} (step {latest.state['step']})",
                    file=sys.stderr,
                    flush=True,
                )
                found[0] = latest.state
        except checkpoint.CheckpointError as exc:
            found[0] = exc
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], checkpoint.CheckpointError):
        raise found[0]
    if found[0] is None:
        return None
    trainer.restore(found[0], tally)
    return found[0]["step"]


def _noise_source(cfg: RunConfig, world_size: int) -> tuple[str | None, str | None]:
    """Where the smaller batch of the noise-scale estimate comes from, or why there is none."""
    if not cfg.noise.enabled:
        return None, "noise.enabled=false"
    if world_size >= 2 and cfg.reduce.impl is not R.ReduceImpl.builtin:
        return "ranks", None
    if cfg.train.accum_steps >= 2:
        return "micro", None
    if world_size >= 2:
        return None, "reduce.impl=builtin hides the per-rank gradient, and A = 1"
    return None, "one batch size only: needs W >= 2 or train.accum_steps >= 2"


def _noise_summary(trainer: Trainer) -> dict[str, Any]:
    if trainer.noise_source is None or trainer.noise.state_dict()["weight"] == 0:
        return {"noise_scale": None, "noise_unavailable": trainer.noise_unavailable}
    est = trainer.noise.estimate()
    return {
        "noise_scale": {
            "b_simple": est.b_simple,
            "grad_sq": est.grad_sq,
            "trace_sigma": est.trace_sigma,
            "small_batch_from": trainer.noise_source,
        }
    }


def _maybe_crash(cfg: RunConfig, ctx: DistContext, step: int) -> None:
    """fault.crash_*: kill this rank as an outside fault would, in the first attempt only."""
    fault = cfg.fault
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    if fault.crash_at_step == step and fault.crash_rank == ctx.rank and first_attempt:
        print(f"ddp-reduce: fault injected: killing rank {ctx.rank} at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _hparams(cfg: RunConfig, geom: BatchGeometry, summary: dict) -> dict[str, Any]:
    return {
        "data": cfg.data.name.name,
        "model": cfg.model.name.name,
        "reduce.loss": cfg.reduce.loss.name,
        "reduce.op": cfg.reduce.op.name,
        "world_size": geom.world_size,
        "local_batch_size": geom.local_batch_size,
        "accum_steps": geom.accum_steps,
        "global_batch_size": geom.global_batch_size,
        "grad_scale": summary["grad_scale"],
        "optim": cfg.optim.name.name,
        "lr": cfg.optim.lr,
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "clip_norm": cfg.optim.clip_norm if cfg.optim.clip_norm is not None else 0.0,
        "seed": cfg.seed,
        "status": summary["status"],
    }
