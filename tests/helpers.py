"""Test helpers: real multi-process groups (gloo over a FileStore, no ports) and configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from ddp_reduce.config import RunConfig, load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.distributed import distributed, exit_now
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.parallel import local_state_bytes
from ddp_reduce.run.compose import compose_config
from ddp_reduce.run.launch import rank_main
from ddp_reduce.run.rank_server import start_rank_server
from ddp_reduce.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# The layout of the c·G tests (DDP and FSDP): W ranks of B items, A micro-steps. Each
# (reduce.loss, reduce.op) pair with its c, written out by hand: the reference the layer's c
# and its gradients are checked against.
W, B, A = 2, 8, 2
N = W * B * A
PAIRS = [
    ("mean", "mean", 1),
    ("mean", "sum", W),
    ("sum", "mean", B * A),
    ("sum", "sum", N),
    ("sum", "global_mean", 1),
]
RTOL = 1e-5  # relative: the received gradient against c·G


def config_dict(*overrides: str) -> dict:
    """The composed config, exactly as the launchers see it."""
    cfg, _ = compose_config(list(overrides))
    return cfg


def config(*overrides: str) -> RunConfig:
    return load_config(config_dict(*overrides))


def _entry(rank: int, fn: Callable, world_size: int, store: str, out: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    result = fn(f"file://{store}", *args)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # As the project's ranks end (exit_now): the group is torn down and the result written;
    # the interpreter's own teardown of PyTorch's collective threads can abort (SIGABRT).
    exit_now(0)


def spawn(fn: Callable, world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``fn(init_method, *args)`` on ``world_size`` ranks; return each rank's result."""
    out = tmp_path / f"results-{os.urandom(4).hex()}"
    out.mkdir()
    store = tmp_path / f"store-{os.urandom(4).hex()}"
    # forked from the project's rank server (a fresh interpreter that has imported torch and
    # nothing else has run in): a rank costs a fork, where a spawned one imports torch anew
    start_rank_server()
    mp.start_processes(
        _entry,
        args=(fn, world_size, str(store), str(out), args),
        nprocs=world_size,
        start_method="forkserver",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want|, the measure every c·G check uses."""
    return ((got - want).norm() / want.norm()).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    err = rel_error(got, want)
    assert err < rtol, f"relative error {err:.2e} >= {rtol}"


def reference_gradient(
    cfg_dict: dict, world_size: int = W
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """G = (1/N)·Σ g_i over the global batch of step 1 (N items, N = world_size·b·A samples),
    computed in one process with no process group and no reduction layer: the reference c·G
    is checked against. Also each rank's own mean gradient over its share of that batch, for
    the mean-of-means predictions."""
    cfg = load_config(cfg_dict)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    n = world_size * cfg.data.batch_size * cfg.train.accum_steps
    idx = GlobalBatchSampler(len(data.train), n, cfg.seed, cfg.data.last_batch).global_batch(0)

    def mean_gradient(rows: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        batch = data.train.batch(rows)
        loss, _ = loss_sums(data.task, model(batch.x), batch)
        (loss / data.train.items(rows)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g = mean_gradient(idx)
    return g, [mean_gradient(share) for share in torch.tensor_split(idx, world_size)]


def _float(t: torch.Tensor | float | None) -> float:
    return 0.0 if t is None else float(t)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard: all of it


def first_step(
    init: str, cfg_dicts: list[dict], before: Callable[[Trainer], None] | None = None
) -> list[dict]:
    """On every rank, for each config: step 1 through the trainer up to the gradient the
    optimizer receives (whole, under FSDP too) and what the reduction reported. ``before``:
    called with the trainer first (to plant a fault)."""
    out = []
    with distributed(load_config(cfg_dicts[0]).dist, init) as ctx:
        for cfg_dict in cfg_dicts:
            trainer = Trainer(load_config(cfg_dict), ctx)
            if before is not None:
                before(trainer)
            report = trainer.forward_backward(1, log=True).report
            micro = trainer.sampler.micro_batches(
                0, ctx.rank, ctx.world_size, trainer.geom.accum_steps
            )
            out.append(
                {
                    "grad": torch.cat([_whole(p.grad).flatten() for p in trainer.params]),
                    "c": report.c,
                    "exact": report.exact,
                    "route": report.route.name,
                    "items": sum(trainer.train_split.items(idx) for idx in micro),
                    "global_items": report.global_items,
                    # statistics of the reduction: 0 where the route has none (DDP's own mean)
                    "local_sq": _float(report.local_sq),
                    "ranks_sq": _float(report.ranks_sq_mean) * report.world_size,
                    "rel_error": report.comm_rel_error,
                    "memory": local_state_bytes(trainer.wrapped, trainer.optimizer),
                }
            )
            trainer.close()
    return out


def train_runs(init: str, jobs: list[tuple[dict, str]]) -> list[dict | None]:
    """On every rank: train each (config, run directory) in turn, each in a process group of
    its own; the summaries as written to disk (rank 0's, None elsewhere)."""
    out = []
    for i, (cfg, run) in enumerate(jobs):
        summary = rank_main(load_config(cfg), run, f"{init}-{i}")
        out.append(summary.to_dict() if summary is not None else None)
    return out


VENV_BIN = Path(sys.executable).parent


def project_env(extra: dict | None = None) -> dict:
    """The environment a user's shell would have: the project's bin folder on PATH."""
    path = str(VENV_BIN) + os.pathsep + os.environ["PATH"]
    return {**os.environ, "PATH": path, **(extra or {})}


def run_cli(
    *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command of the project (``ddp-reduce`` or ``torchrun``) as a user would."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=project_env(env)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_reduce(*overrides: str, **kw: Any) -> subprocess.CompletedProcess:
    exe = str(VENV_BIN / "ddp-reduce")
    return run_cli(exe, *overrides, **kw)


def torchrun(
    nproc: int, *overrides: str, extra_args: tuple[str, ...] = (), **kw: Any
) -> subprocess.CompletedProcess:
    exe = str(VENV_BIN / "torchrun")
    launcher = [exe, "--standalone", f"--nproc-per-node={nproc}", *extra_args]
    return run_cli(*launcher, "-m", "ddp_reduce.train", *overrides, **kw)
