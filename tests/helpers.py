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
from ddp_reduce.distributed import exit_now
from ddp_reduce.run.compose import compose_config

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
    mp.start_processes(
        _entry,
        args=(fn, world_size, str(store), str(out), args),
        nprocs=world_size,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


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
