"""What every rank runs, and the local launcher behind ``ddp-reduce``.

The run directory is decided once: by Hydra in ``ddp-reduce`` (before any rank starts), or by
rank 0 under torchrun, which broadcasts it, so the ranks never each make one from their own clock.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ddp_reduce.config import ConfigError, RunConfig, load_config
from ddp_reduce.distributed import (
    DistContext,
    die_with_parent,
    distributed,
    resolve_device,
    under_launcher,
)
from ddp_reduce.run.job import train
from ddp_reduce.run.pool import shared_pool
from ddp_reduce.run.rundir import SUMMARY, read_summary, versions, write_json
from ddp_reduce.trainer import prepare


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite a completed run unless asked to."""
    previous = read_summary(run_dir)
    if previous is not None and previous.get("status") == "completed" and not overwrite:
        raise ConfigError(
            "hydra.run.dir",
            str(run_dir),
            "a directory without a completed run (it holds one; pass train.overwrite=true "
            "to replace it)",
        )


def validate(cfg_dict: dict, world_size: int, local_world_size: int | None = None) -> RunConfig:
    """Everything that can be refused before a process group exists."""
    cfg = load_config(cfg_dict)
    prepare(cfg, world_size)
    resolve_device(cfg.dist, (local_world_size or world_size) - 1)  # enough devices here?
    return cfg


class Stopped(RuntimeError):
    """A signal stopped this rank: SIGTERM (the launcher stops every rank when one fails) or
    SIGINT (Ctrl-C)."""

    def __init__(self, signum: int):
        self.status = "interrupted" if signum == signal.SIGINT else "failed"
        what = (
            "interrupted (SIGINT, Ctrl-C)"
            if signum == signal.SIGINT
            else ("stopped by SIGTERM (the launcher stops every rank when one fails)")
        )
        super().__init__(what)


@contextmanager
def _signals_as_errors() -> Iterator[dict[str, bool]]:
    """SIGTERM and SIGINT become :class:`Stopped`, so a stopped run still records its status.

    torchrun and the elastic agent stop the surviving ranks with SIGTERM when one dies; by
    default Python would exit at once (and Ctrl-C raises KeyboardInterrupt, which ``except
    Exception`` misses), leaving no summary behind. While the status is being written
    (``recording``) a further signal waits: the write is what the signal would have lost.
    """
    state = {"recording": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def stop(signum: int, frame: Any) -> None:
        if not state["recording"]:
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# A run directory whose summary says this holds a result: nothing may replace it but a run
# asked to (train.overwrite=true), which clears it first.
FINISHED = ("completed", "diverged")


def run_job(ctx: DistContext, cfg_dict: dict, run_dir: str) -> dict[str, Any] | None:
    """One run in an existing process group. Returns the summary on rank 0, None elsewhere."""
    cfg = load_config(cfg_dict)
    agreed = [run_dir]
    dist.broadcast_object_list(agreed, src=0)  # the run directory is rank 0's
    path = Path(agreed[0])
    with _signals_as_errors() as signals:
        try:
            summary = train(cfg, path, ctx)
        except BaseException as exc:
            signals["recording"] = True
            previous = read_summary(path) if ctx.is_main else None
            if ctx.is_main and (previous or {}).get("status") not in FINISHED:
                write_json(
                    path / SUMMARY,
                    {
                        "status": getattr(exc, "status", "failed"),
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "world_size": ctx.world_size,
                        "versions": versions(),
                    },
                )
            raise
    return summary if ctx.is_main else None


def rank_main(
    cfg_dict: dict, run_dir: str, init_method: str | None = None
) -> dict[str, Any] | None:
    """Entry point of one rank: form the group, run, tear down."""
    if under_launcher() and init_method is None:
        die_with_parent()  # a launcher killed outright takes its ranks with it
    cfg = load_config(cfg_dict)
    with distributed(cfg.dist, init_method) as ctx:
        return run_job(ctx, cfg_dict, run_dir)


def launch_local(
    cfg_dict: dict, run_dir: str, nproc: int, max_restarts: int = 0, reuse_ranks: bool = False
) -> dict[str, Any]:
    """Run ``nproc`` ranks on this machine and return rank 0's summary.

    One rank runs in this process. More go through PyTorch's elastic launcher, the one torchrun
    wraps, with its defaults set explicitly (its own are etcd and three restarts); or, with
    ``reuse_ranks`` (sweeps), through a pool of ranks kept alive from one run to the next.
    """
    if nproc == 1:
        summary = rank_main(cfg_dict, run_dir)
        assert summary is not None
        return summary
    if reuse_ranks and max_restarts == 0:
        pool = shared_pool(load_config(cfg_dict).dist, nproc)
        return pool.call(run_job, cfg_dict, run_dir)[0]
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # gloo restarts hang or fail to connect without it (pytorch/pytorch#135712)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    results = elastic_launch(config, rank_main)(cfg_dict, run_dir)
    return results[0]


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    head = f"ddp-reduce: {s['status']}"
    if s["status"] == "diverged":
        head += f" at step {s['diverged_at_step']} (a NaN or inf in the loss or gradient)"
    head += f", {s['steps_done']} steps in {s['wall_time_s']:.1f} s"

    def metric(name: str, loss: float, acc: float | None) -> str:
        text = f"  {name:<5} loss {loss:.4f}"
        return text + (f"  accuracy {acc:.4f}" if acc is not None else "")

    exact = "" if s["grad_scale_exact"] else " (unequal counts: a mean of means, not exactly c*G)"
    lines = [
        head,
        f"  W={s['world_size']} b={s['local_batch_size']} A={s['accum_steps']} "
        f"N={s['global_batch_size']}  reduce: loss={s['reduce_loss']} op={s['reduce_op']}",
        f"  gradient factor c = {s['grad_scale']:g}  [{s['grad_scale_rule']}]{exact}",
        metric("train", s["final_train_loss"], s["final_train_accuracy"]),
        metric("test", s["final_eval_loss"], s["final_eval_accuracy"]),
        f"  run directory: {s['run_dir']}",
        f"  TensorBoard:   tensorboard --logdir {s['run_dir']} --host 127.0.0.1",
    ]
    return "\n".join(lines)


def error_message(exc: BaseException) -> str:
    """The exception's message with those of its causes (Hydra keeps OmegaConf's detail there)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip()
        if text and text not in parts:
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def fail(message: str, code: int = 2) -> None:
    print(f"ddp-reduce: error: {message}", file=sys.stderr)
    sys.exit(code)
