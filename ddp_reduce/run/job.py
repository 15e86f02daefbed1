"""One run, end to end: prepare its directory, resume, train, evaluate, checkpoint, summarize.

Every rank runs :func:`train`; rank 0 alone writes the run directory (the others log nothing).
The steps themselves are the :class:`~ddp_reduce.trainer.Trainer`'s.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddp_reduce import parallel
from ddp_reduce.config import ConfigError, RunConfig, to_dict
from ddp_reduce.distributed import DistContext
from ddp_reduce.layer.noise import NoiseEstimate
from ddp_reduce.layer.reduction import nominal_scale, scale_rule
from ddp_reduce.optim import effective_optim
from ddp_reduce.run import checkpoint
from ddp_reduce.run.rundir import (
    HParam,
    MetricsLogger,
    NullLogger,
    clear_results,
    save_model,
    write_config,
)
from ddp_reduce.run.summary import RunSummary, Status, read_summary, write_summary
from ddp_reduce.sysinfo import peak_rss_mb, rss_mb
from ddp_reduce.trainer import Prepared, StepOutcome, Trainer
from ddp_reduce.verdict import blown_up


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
class _Progress:
    """How the run is going: what the summary reports besides the trainer's own state."""

    status: Status = Status.completed
    diverged_at: int | None = None
    diverged_why: str | None = None
    steps_to_target: int | None = None
    last_loss: float | None = None  # the all-reduced training loss of the last logged step
    noise: NoiseEstimate | None = None
    window: _Window = field(default_factory=_Window)
    reduce_overflow_at: int | None = None  # the reduction itself made the gradient non-finite
    amp_skipped: int = 0  # fp16: steps the loss scaler skipped (a non-finite gradient)
    lossy_logged: int = 0  # logged steps whose low-precision reduction was off by more than
    rel_error_max: float | None = None  # ... reduce.lossy_threshold; the largest such error


def train(
    cfg: RunConfig, run_dir: Path, ctx: DistContext, prepared: Prepared | None = None
) -> RunSummary:
    """Train one run; rank 0 writes the run directory. Returns the summary (on every rank)."""
    start = time.perf_counter()
    trainer = Trainer(cfg, ctx, prepared)
    _check_same_data(trainer)
    if ctx.is_main:
        _open_run_dir(cfg, run_dir)
    resumed_from = checkpoint.resume(run_dir, trainer)
    logger = _logger(trainer, run_dir, ctx)
    bar = _progress_bar(trainer, ctx)
    if resumed_from is None:  # the loss over the whole training set before the first step
        trainer.initial_loss = trainer.evaluate(trainer.train_split)[0]
    progress = _Progress()
    try:
        while trainer.step < cfg.train.steps:
            step = trainer.step + 1
            _maybe_crash(cfg, ctx, step)
            scalars, reached = _train_step(trainer, step, progress), False
            if progress.status is Status.diverged:
                if scalars:
                    logger.log(step, scalars)
                break
            if _eval_due(cfg, step):
                reached = _evaluate(trainer, scalars)
            if scalars:
                logger.log(step, scalars)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                checkpoint.save_trainer(run_dir, trainer, cfg.train.keep_checkpoints)
            if bar is not None:
                bar.update(1)
                if "train/loss" in scalars:
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4g}")
            if reached:
                progress.steps_to_target = step
                break
        summary = _finish(trainer, progress, logger, run_dir, resumed_from, start)
        return summary
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        trainer.close()


def _check_same_data(trainer: Trainer) -> None:
    """Your data (data._target_) are made on every rank: splits of different lengths would
    give each rank another global batch (or hang a collective), so they are refused on every
    rank alike. The built-in data sets are made from the seed alone."""
    cfg, ctx = trainer.cfg, trainer.ctx
    if cfg.data.target is None or ctx.world_size == 1:
        return
    lengths: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(lengths, (len(trainer.train_split), len(trainer.test_split)))
    if len(set(lengths)) > 1:
        shown = ", ".join(f"rank {r}: {a} and {b}" for r, (a, b) in enumerate(lengths))
        raise ConfigError(
            "data._target_",
            cfg.data.target,
            f"the same (train, eval) splits on every rank; their lengths differ ({shown})",
        )


def _open_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    try:
        previous = read_summary(run_dir)
    except ValueError:
        previous = None  # checked by the launcher; a failure's record replaces it
    if cfg.train.overwrite and previous and previous.status.finished:
        clear_results(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, to_dict(cfg))


def _logger(trainer: Trainer, run_dir: Path, ctx: DistContext) -> MetricsLogger | NullLogger:
    if not ctx.is_main:
        return NullLogger()
    reduce_cfg = trainer.cfg.reduce
    return MetricsLogger(
        run_dir,
        resume_step=trainer.step,
        mode=f"{reduce_cfg.loss.name}-{reduce_cfg.op.name}",
        global_batch=trainer.geom.global_batch_size,
    )


def _progress_bar(trainer: Trainer, ctx: DistContext):
    if not (ctx.is_main and trainer.cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(
        total=trainer.cfg.train.steps, initial=trainer.step, unit="step", dynamic_ncols=True
    )


def _train_step(trainer: Trainer, step: int, progress: _Progress) -> dict[str, float | None]:
    """One optimizer step; returns its scalars (empty on steps that are not logged)."""
    cfg, ctx = trainer.cfg, trainer.ctx
    log = step % cfg.train.log_every == 0 or step == cfg.train.steps
    # The verdict is read (the device waited for) only where the state is read or saved next;
    # a step found diverged then is rolled back (Trainer.train_step).
    every = cfg.train.checkpoint_every
    settle = log or _eval_due(cfg, step) or bool(every and step % every == 0)
    t0 = time.perf_counter()
    before = parallel.snapshot(trainer.params) if log else None
    lr = trainer.optimizer.param_groups[0]["lr"]
    outcome = trainer.train_step(log=log, settle=settle)
    if settle or outcome.why:
        progress.noise = trainer.noise() or progress.noise
    verdicts = trainer.verdicts
    progress.amp_skipped, progress.reduce_overflow_at = (
        verdicts.amp_skipped,
        verdicts.reduce_overflow_at,
    )
    if outcome.why:  # the step was not taken: the weights stay the last sound ones
        progress.status = Status.diverged
        progress.diverged_at, progress.diverged_why = outcome.diverged_at, outcome.why
        this_step = outcome.loss is not None and outcome.diverged_at == step
        return {"train/loss": outcome.loss} if this_step else {}
    if settle and ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)  # the window's time: its steps done on the device
    progress.window.add(time.perf_counter() - t0, outcome.report.global_items)
    if not log:
        return {}
    progress.last_loss = outcome.loss
    scalars = _step_scalars(trainer, outcome, progress, lr, before)
    progress.window = _Window()
    return scalars


def _step_scalars(
    trainer: Trainer,
    outcome: StepOutcome,
    progress: _Progress,
    lr: float,
    before: list[torch.Tensor],
) -> dict[str, float | None]:
    report, window = outcome.report, progress.window
    grad_norm = report.grad_norm.item()
    scalars: dict[str, float | None] = {
        "train/loss": outcome.loss,
        "optim/lr": lr,
        "grad/global_norm": grad_norm,
        "grad/global_norm_c1": grad_norm / report.c,
        "grad/local_norm_mean": outcome.local_norm_mean,
        "reduce/grad_scale": report.c,
        "reduce/comm_rel_error": _lossy(trainer, report.comm_rel_error, progress),
        "reduce/lossy_logged_steps": progress.lossy_logged
        if report.comm_rel_error is not None
        else None,
        "optim/update_to_weight": parallel.update_to_weight(before, trainer.params),
        "perf/items_per_s": window.items / window.time_s,
        "perf/step_time_s": window.time_s / window.steps,
        "perf/rss_mb": rss_mb(),
    }
    noise = report.noise
    if noise is not None:
        scalars.update(
            {
                "noise/grad_sq": noise.grad_sq,
                "noise/trace_sigma": noise.trace_sigma,
                "noise/b_simple": noise.b_simple,
            }
        )
    return scalars


def _lossy(trainer: Trainer, rel_error: float | None, progress: _Progress) -> float | None:
    """Count a logged step whose low-precision reduction lost more than reduce.lossy_threshold
    against the float64 one (measured on logged steps only: it costs a collective)."""
    if rel_error is None:
        return None
    progress.rel_error_max = max(progress.rel_error_max or 0.0, rel_error)
    if not rel_error <= trainer.cfg.reduce.lossy_threshold:
        progress.lossy_logged += 1
    return rel_error


def _eval_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.train.eval_every
    return bool(every) and step % every == 0 and step != cfg.train.steps


def _evaluate(trainer: Trainer, scalars: dict[str, float | None]) -> bool:
    """Evaluate into ``scalars``; returns whether the target loss is reached."""
    eval_loss, eval_acc = trainer.evaluate(trainer.test_split)
    scalars.update({"eval/loss": eval_loss, "eval/accuracy": eval_acc})
    target = trainer.cfg.train.target_loss
    if target is None:
        return False
    full_loss, _ = trainer.evaluate(trainer.train_split)
    scalars["train/full_loss"] = full_loss
    return full_loss <= target


def _finish(
    trainer: Trainer,
    progress: _Progress,
    logger: MetricsLogger | NullLogger,
    run_dir: Path,
    resumed_from: int | None,
    start: float,
) -> RunSummary:
    """Final evaluation, the summary, the weights and the HParams record."""
    cfg, ctx = trainer.cfg, trainer.ctx
    train_loss, train_acc = trainer.evaluate(trainer.train_split)
    why = blown_up(train_loss, trainer.initial_loss, cfg.train.blowup_factor)
    if why and progress.status is Status.completed:
        progress.status, progress.diverged_at, progress.diverged_why = (
            Status.diverged,
            trainer.step,
            why,
        )
    eval_loss, eval_acc = trainer.evaluate(trainer.test_split)
    target = cfg.train.target_loss
    if (
        target is not None
        and progress.steps_to_target is None
        and progress.status is Status.completed
    ):
        progress.steps_to_target = trainer.step if train_loss <= target else None
    logger.log(trainer.step, {"eval/loss": eval_loss, "eval/accuracy": eval_acc})
    peaks: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(peaks, round(peak_rss_mb(), 1))
    summary = _summary(trainer, progress, run_dir, resumed_from)
    summary.final_train_loss, summary.final_train_accuracy = train_loss, train_acc
    summary.final_eval_loss, summary.final_eval_accuracy = eval_loss, eval_acc
    summary.peak_rss_mb_per_rank = peaks
    summary.wall_time_s = time.perf_counter() - start
    weights = trainer.model_state()  # a collective under FSDP: every rank takes part
    if ctx.is_main:
        save_model(run_dir, weights)
        final = {
            "final/train_loss": train_loss,
            "final/eval_loss": eval_loss,
            "final/eval_accuracy": eval_acc,
            "final/diverged": float(progress.status is Status.diverged),
        }
        logger.hparams(_hparams(trainer, summary), final, trainer.step)
        write_summary(run_dir, summary)
    return summary


def _summary(
    trainer: Trainer,
    progress: _Progress,
    run_dir: Path,
    resumed_from: int | None,
) -> RunSummary:
    cfg, ctx, geom, reduce_cfg = trainer.cfg, trainer.ctx, trainer.geom, trainer.cfg.reduce
    return RunSummary(
        status=progress.status,
        diverged_at_step=progress.diverged_at,
        diverged_why=progress.diverged_why,
        steps_done=trainer.step,
        steps_planned=cfg.train.steps,
        resumed_from_step=resumed_from,
        grad_scale=nominal_scale(
            reduce_cfg.loss, reduce_cfg.op, geom.world_size, geom.local_batch_size, geom.accum_steps
        ),
        grad_scale_rule=scale_rule(reduce_cfg.loss, reduce_cfg.op),
        grad_scale_range=[trainer.c_range.low, trainer.c_range.high],
        grad_scale_exact=trainer.c_range.exact,
        reduce_loss=reduce_cfg.loss.name,
        reduce_op=reduce_cfg.op.name,
        strategy=cfg.dist.strategy.name,
        reduce_impl=reduce_cfg.impl.name,
        reduce_route=trainer.reducer.route.name if trainer.reducer.route else None,
        reduce_dtype=reduce_cfg.dtype.name,
        reduce_predivide=reduce_cfg.predivide,
        reduce_overflow_at_step=progress.reduce_overflow_at,
        reduce_lossy_logged_steps=progress.lossy_logged,
        reduce_comm_rel_error_max=progress.rel_error_max,
        precision=cfg.train.precision.name,
        amp_skipped_steps=progress.amp_skipped if trainer.scaler is not None else None,
        world_size=geom.world_size,
        local_batch_size=geom.local_batch_size,
        accum_steps=geom.accum_steps,
        global_batch_size=geom.global_batch_size,
        train_items=len(trainer.train_split),
        last_logged_train_loss=progress.last_loss,
        initial_train_loss=trainer.initial_loss,
        target_loss=cfg.train.target_loss,
        steps_to_target=progress.steps_to_target,
        optim_effective=asdict(effective_optim(cfg.optim, geom.global_batch_size)),
        **_noise_summary(trainer, progress),
        device=str(ctx.device),
        backend=ctx.backend,
        threads_per_rank=ctx.threads if ctx.device.type == "cpu" else None,
        run_dir=str(run_dir),
    )


def _noise_summary(trainer: Trainer, progress: _Progress) -> dict[str, Any]:
    if trainer.noise_source is None or progress.noise is None:
        return {"noise_scale": None, "noise_unavailable": trainer.noise_unavailable}
    est = progress.noise
    return {
        "noise_scale": {
            "b_simple": est.b_simple,
            "grad_sq": est.grad_sq,
            "trace_sigma": est.trace_sigma,
            "small_batch_from": trainer.noise_source.name,
        }
    }


def _maybe_crash(cfg: RunConfig, ctx: DistContext, step: int) -> None:
    """fault.crash_*: kill this rank as an outside fault would, in the first attempt only."""
    fault = cfg.fault
    if fault.crash_at_step != step or fault.crash_rank != ctx.rank:
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        print(f"ddp-reduce: fault injected: killing rank {ctx.rank} at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _hparams(trainer: Trainer, summary: RunSummary) -> list[HParam]:
    """The HParams view's columns: the axes of the sum-or-mean question first (c, the step)."""
    cfg, geom, reduce_cfg = trainer.cfg, trainer.geom, trainer.cfg.reduce
    return [
        HParam(
            "reduce.loss",
            reduce_cfg.loss.name,
            str,
            tuple(m.name for m in type(reduce_cfg.loss)),
            axis=True,
        ),
        HParam(
            "reduce.op",
            reduce_cfg.op.name,
            str,
            tuple(m.name for m in type(reduce_cfg.op)),
            axis=True,
        ),
        HParam("lr", cfg.optim.lr, axis=True),
        HParam(
            "global_batch_size",
            geom.global_batch_size,
            axis=True,
            display_name="N (global_batch_size)",
        ),
        HParam("world_size", geom.world_size, axis=True, display_name="W (world_size)"),
        HParam("grad_scale", summary.grad_scale, axis=True, display_name="c (grad_scale)"),
        HParam("local_batch_size", geom.local_batch_size),
        HParam("accum_steps", geom.accum_steps),
        HParam("data", cfg.data.name, str),
        HParam("model", cfg.model.name, str),
        HParam("optim", cfg.optim.name.name, str, tuple(m.name for m in type(cfg.optim.name))),
        HParam("momentum", cfg.optim.momentum),
        HParam("weight_decay", cfg.optim.weight_decay),
        HParam("clip_norm", cfg.optim.clip_norm),  # null: no clipping, an empty cell (not 0)
        HParam("seed", cfg.seed),
        HParam("status", summary.status.value, str, tuple(s.value for s in Status)),
    ]
