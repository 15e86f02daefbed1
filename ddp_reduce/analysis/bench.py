"""Benchmarks: every figure is a ratio or a median measured in one run, never a timed unit test.

    python -m ddp_reduce.bench reduce     # reduction layer vs DDP's built-in mean, interleaved;
                                          # the trainer vs a bare DDP loop
    python -m ddp_reduce.bench startup    # a one-step run vs the import floor; convert, --help
    python -m ddp_reduce.bench scaling    # items/s: W=1 vs W=2 vs one process with 2 threads
    python -m ddp_reduce.bench sweep      # start-up cost per point of a 16-point multirun
    python -m ddp_reduce.bench memory     # peak RSS per rank, growth over a 2,000-step run
    python -m ddp_reduce.bench data       # in-memory batches vs a DataLoader
    python -m ddp_reduce.bench fsdp       # sharded state and step time, FSDP vs DDP, W=2 and 4;
                                          # HSDP (R=2, S=2) at W=4
    python -m ddp_reduce.bench precision  # bf16/fp16 communication vs fp32
    python -m ddp_reduce.bench audit      # an audit of 4 layouts vs the same runs unprobed
    python -m ddp_reduce.bench all [--quick] [--device cuda] [--json results.json]

The machine is shared and noisy: variants are interleaved step by step in a shuffled order
(the same on every rank), each step timed between barriers, and medians compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_reduce import parallel
from ddp_reduce.analysis.bench_audit import audit_report, bench_audit
from ddp_reduce.analysis.intervals import median_interval
from ddp_reduce.analysis.tables import table
from ddp_reduce.config import Device, DistConfig, Strategy, load_config
from ddp_reduce.distributed import DistContext, available_cores
from ddp_reduce.layer.strategy import is_fsdp
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.optim import build_optimizer
from ddp_reduce.run.compose import compose_config
from ddp_reduce.run.pool import RankPool
from ddp_reduce.run.rundir import SUMMARY
from ddp_reduce.run.summary import read_summary
from ddp_reduce.sysinfo import peak_rss_mb, rss_mb
from ddp_reduce.trainer import Trainer

MODELS = {
    "small MLP (communication-bound)": ("model=mlp", "model.hidden=[64]", "data.batch_size=32"),
    "CNN (compute-bound)": (
        "model=cnn",
        "model.channels=[32,64]",
        "model.hidden=[256]",
        "data.batch_size=256",
    ),
}
NO_NOISE = "noise.enabled=false"
NEVER_LOGGED = "train.log_every=1000000000"
VARIANTS = {
    "builtin": ("reduce.impl=builtin", NO_NOISE),
    "mean": ("reduce.op=mean", NO_NOISE),
    "sum": ("reduce.op=sum", NO_NOISE),
    "global_mean": ("reduce.loss=sum", "reduce.op=global_mean", NO_NOISE),
    # the three above run DDP's own C++ path (DDP's arithmetic is theirs); this one the Python
    # hook without the noise norms (a split division forces it): the hook's own cost
    "mean, hook": ("reduce.op=mean", "reduce.predivide=sqrt", NO_NOISE),
    # the noise estimate as a run has it by default: its norms read on logged steps only
    "mean + noise": ("reduce.op=mean", "noise.enabled=true"),
    "mean + noise, every step": ("reduce.op=mean", "noise.enabled=true", "noise.steps=every"),
    # the trainer never logging: what its logged steps (every train.log_every) add, isolated
    "mean + noise, never logged": ("reduce.op=mean", "noise.enabled=true", NEVER_LOGGED),
    "sum + noise": ("reduce.op=sum", "noise.enabled=true"),
    "global_mean + noise": ("reduce.loss=sum", "reduce.op=global_mean", "noise.enabled=true"),
}
NOISE_TARGET = 1.05  # the noise estimate on (its default: logged steps)
TARGETS = {
    "mean": 1.02,
    "sum": 1.02,
    "global_mean": 1.05,
    "mean, hook": 1.05,
    **{name: NOISE_TARGET for name in ("mean + noise", "sum + noise", "global_mean + noise")},
}
BARE = "bare DDP loop"  # no bookkeeping at all: a reference, not a target
FSDP_ALONE = "FSDP2 alone"  # a bare FSDP2 loop, its own divide factor giving the same c
# The trainer against the bare loop: its defaults (noise estimate on) and without the estimate.
TRAINER_VS_BARE = ("mean + noise", "mean", "mean + noise, never logged")
TRAINER_TARGETS = {"cpu": 1.03, "cuda": 1.05}  # CPU at W=2; a GPU at W=1 (NCCL)


def _cfg(device: str, *overrides: str) -> dict:
    return compose_config([f"dist.device={device}", "train.eval_every=0", *overrides])[0]


def _sync(ctx: DistContext) -> None:
    dist.barrier()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


class _Stepper:
    """One optimizer step of a configured trainer, noise-scale update included."""

    def __init__(self, cfg_dict: dict, ctx: DistContext):
        self.trainer = Trainer(load_config(cfg_dict), ctx)

    def __call__(self) -> None:
        # as a run steps: the verdict read and the statistics logged every train.log_every
        log = (self.trainer.step + 1) % self.trainer.cfg.train.log_every == 0
        self.trainer.train_step(log=log, settle=log)  # the noise estimate's update included

    def close(self) -> None:
        self.trainer.close()


class _BareStepper:
    """A plain DDP step: forward, mean loss, backward, optimizer step. Nothing else. Under
    ``dist.strategy=fsdp``: FSDP2 alone, its own divide factor W (c = 1, as the layer's
    mean/mean), the configured optimizer."""

    def __init__(self, cfg_dict: dict, ctx: DistContext):
        t = Trainer(load_config(cfg_dict), ctx)  # for the same data, model and sampler
        self.data, self.sampler, self.geom, self.ctx = t.train_split, t.sampler, t.geom, ctx
        self.task = t.data.task
        t.close()
        cfg = load_config(cfg_dict)
        model = build_model(cfg.model, t.data).to(ctx.device)
        if cfg.dist.strategy is Strategy.fsdp:
            self.ddp = parallel.wrap(model, Strategy.fsdp, ctx)
            for unit in (m for m in model.modules() if is_fsdp(m)):
                unit.set_gradient_divide_factor(float(ctx.world_size))
            self.opt = build_optimizer(cfg.optim, model, self.geom.global_batch_size)
        else:
            ids = [ctx.device] if ctx.device.type == "cuda" else None
            self.ddp = DDP(model, device_ids=ids)
            self.opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
        self.step = 0

    def __call__(self) -> None:
        idx = self.sampler.micro_batches(self.step, self.ctx.rank, self.ctx.world_size, 1)[0]
        self.step += 1
        batch = self.data.batch(idx)
        loss, _ = loss_sums(self.task, self.ddp(batch.x), batch)
        (loss / len(idx)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.ddp


def _interleaved_job(
    ctx: DistContext, cfgs: dict[str, dict], warmup: int, rounds: int, block: int
) -> dict[str, list[float]]:
    """Per variant, ``rounds`` samples of the mean step time over ``block`` consecutive steps;
    the variants' blocks interleaved in a shuffled order (the same on every rank)."""
    steppers = {
        name: (_BareStepper if name in (BARE, FSDP_ALONE) else _Stepper)(cfg, ctx)
        for name, cfg in cfgs.items()
    }
    order = list(steppers)
    for _ in range(warmup):
        for name in order:
            steppers[name]()
    wall: dict[str, list[float]] = {name: [] for name in order}
    cpu: dict[str, list[float]] = {name: [] for name in order}
    rng = random.Random(0)  # the same order on every rank
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            _sync(ctx)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                steppers[name]()
            _sync(ctx)
            wall[name].append((time.perf_counter() - t0) / block)
            cpu[name].append((time.process_time() - c0) / block)
    for s in steppers.values():
        s.close()
    return {"wall": wall, "cpu": cpu}


def paired_ratio(samples: list[float], base: list[float], seed: int = 0) -> dict[str, float]:
    """Median over rounds of sample/base (the two measured in the same round, so slow drift of
    the machine cancels), with a 95% bootstrap interval."""
    return _interval([a / b for a, b in zip(samples, base, strict=True)], seed)


def _interval(samples: list[float], seed: int = 0) -> dict[str, float]:
    """Median with a 95% bootstrap interval."""
    i = median_interval(samples, seed)
    return {"ratio": i.median, "low": i.low, "high": i.high}


def verdict(interval: dict[str, float], target: float) -> str:
    if interval["high"] <= target:
        return "yes"
    if interval["low"] > target:
        return "**no**"
    return "within noise"


def bench_reduce(device: str, quick: bool, models: list[str] | None = None) -> dict[str, Any]:
    """Step time of each reduction variant against DDP's built-in mean, interleaved."""
    nproc = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    pool = RankPool(DistConfig(device=Device[device], threads_per_rank=1), nproc)
    results: dict[str, Any] = {"world_size": nproc, "device": device, "models": {}}
    try:
        for model_name, model_overrides in MODELS.items():
            if models and not any(m.lower() in model_name.lower() for m in models):
                continue
            cfgs = {name: _cfg(device, *model_overrides, *v) for name, v in VARIANTS.items()}
            cfgs[BARE] = _cfg(device, *model_overrides, NO_NOISE)
            # Blocks of steps smooth the scheduler's noise; many rounds narrow the interval.
            small = "MLP" in model_name
            block, rounds = (10, 60 if quick else 600) if small else (3, 20 if quick else 200)
            times = pool.call(_interleaved_job, cfgs, 10, rounds, block)[0]
            wall, cpu = times["wall"], times["cpu"]
            rows = {}
            for name in cfgs:
                rows[name] = {
                    "median_ms": 1e3 * statistics.median(wall[name]),
                    "steps": block * rounds,
                    **paired_ratio(wall[name], wall["builtin"]),
                    "cpu_ratio": paired_ratio(cpu[name], cpu["builtin"])["ratio"],
                }
            results["models"][model_name] = rows
            # the trainer's own bookkeeping: its step over a bare DDP loop's, same round
            results.setdefault("trainer", {})[model_name] = {
                name: paired_ratio(wall[name], wall[BARE]) for name in TRAINER_VS_BARE
            }
    finally:
        pool.close()
    return results


DATA_CASES = {
    "digits, MLP": ("model=mlp",),
    "text, seq (ragged tokens)": (
        "data=text",
        "model=seq",
        "reduce.loss=sum",
        "reduce.op=global_mean",
    ),
}
DATA_PATHS = {
    "memory": ("data.loader=memory",),
    "DataLoader": ("data.loader=loader",),
    "DataLoader, 2 workers": ("data.loader=loader", "data.num_workers=2"),
}


def bench_data(quick: bool) -> dict[str, Any]:
    """Step time of the DataLoader path against the in-memory fast path, interleaved (W=2)."""
    pool = RankPool(DistConfig(threads_per_rank=1), 2)
    out: dict[str, Any] = {}
    block, rounds = (5, 10) if quick else (5, 60)
    try:
        for case, overrides in DATA_CASES.items():
            cfgs = {
                name: _cfg("cpu", *overrides, *path, NO_NOISE, "train.steps=1000000")
                for name, path in DATA_PATHS.items()
            }
            wall = pool.call(_interleaved_job, cfgs, 5, rounds, block)[0]["wall"]
            out[case] = {
                name: {
                    "median_ms": 1e3 * statistics.median(wall[name]),
                    **paired_ratio(wall[name], wall["memory"]),
                }
                for name in cfgs
            }
    finally:
        pool.close()
    return out


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed:\n{proc.stderr[-2000:]}")
    return wall


STARTUP_TARGET = 2.5  # a one-step default run over the import floor
CALCULATOR_TARGET_S = 0.3  # ddp-reduce convert and --help, absolute


def bench_startup(quick: bool) -> dict[str, Any]:
    """Cold start: a one-step default run against the import floor, rounds interleaved, and
    where its time goes (each part timed on its own, the rest by difference)."""
    py = sys.executable
    exe = str(Path(sys.executable).parent / "ddp-reduce")
    rounds = 3 if quick else 7
    probes = {
        "import floor": [py, "-c", "import torch, torch.distributed, hydra"],
        "launcher: import + compose": [
            py,
            "-c",
            "from ddp_reduce.run.compose import compose_config; compose_config([])",
        ],
        "a rank's imports": [py, "-c", "import torch, torch._dynamo, ddp_reduce.run.launch"],
        "convert": [
            exe,
            "convert",
            "--from",
            "sum/sum",
            "--to",
            "mean/mean",
            "--world-size",
            "2",
            "--batch-size",
            "16",
            "--optim",
            "sgd",
            "--lr",
            "0.1",
        ],
        "--help": [exe, "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in [*probes, "one-step run"]}
    inside: list[float] = []
    order = list(times)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            rng.shuffle(order)
            for name in order:
                if name == "one-step run":
                    run = Path(tmp) / f"run{r}"
                    argv = [exe, "train.steps=1", "train.eval_every=0", f"hydra.run.dir={run}"]
                    times[name].append(_timed(argv))
                    inside.append(read_summary(run).wall_time_s)
                else:
                    times[name].append(_timed(probes[name]))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "rounds": rounds,
        "median_s": med,
        "ratio_to_floor": paired_ratio(times["one-step run"], times["import floor"]),
        "run_inside_ranks_s": statistics.median(inside),
        "calculator": {n: _interval(times[n]) for n in ("convert", "--help")},
    }


FSDP_TARGET = 1.05  # FSDP2 with the layer over FSDP2 alone where the layer's route runs
FSDP_MODEL = ("model=mlp", "model.hidden=[4096,4096]", "data.batch_size=16", "optim=adam")


def _fsdp_job(ctx: DistContext, cfgs: dict[str, dict], rounds: int) -> dict[str, Any]:
    """Per strategy: this rank's parameter, gradient and optimizer bytes, and step times."""
    from ddp_reduce.parallel import local_state_bytes

    trainers = {name: Trainer(load_config(cfg), ctx) for name, cfg in cfgs.items()}
    memory = {}
    for name, t in trainers.items():
        t.forward_backward(t.step + 1)  # gradients exist: measured before the step
        memory[name] = local_state_bytes(t.wrapped, t.optimizer)
        t.optimizer_step(t.forward_backward(t.step + 1))  # optimizer state exists
        memory[name]["optimizer"] = local_state_bytes(t.wrapped, t.optimizer)["optimizer"]
    wall: dict[str, list[float]] = {name: [] for name in trainers}
    order = list(trainers)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            _sync(ctx)
            t0 = time.perf_counter()
            trainers[name].train_step()
            _sync(ctx)
            wall[name].append(time.perf_counter() - t0)
    for t in trainers.values():
        t.close()
    return {"memory": memory, "wall": wall}


HSDP_REPLICAS = 2  # at W=4: 2 replicas of shard groups of 2 ranks


def bench_fsdp(quick: bool) -> dict[str, Any]:
    """Per-rank state under DDP and FSDP at W=2 and 4, and HSDP (R=2, S=2) at W=4 (an MLP of
    ~17M parameters, Adam), as ratios, and the step-time ratio fsdp/ddp, interleaved."""
    out: dict[str, Any] = {}
    for world in (2, 4):
        strategies = {"ddp": (), "fsdp": ()}
        if world % HSDP_REPLICAS == 0 and world > HSDP_REPLICAS:
            strategies["hsdp"] = (f"dist.replicate={HSDP_REPLICAS}",)
        cfgs = {
            s: _cfg(
                "cpu", *FSDP_MODEL, f"dist.strategy={s}", *extra, NO_NOISE, "train.steps=100000"
            )
            for s, extra in strategies.items()
        }
        pool = RankPool(DistConfig(threads_per_rank=1), world)
        pair = {"FSDP2 with the layer": cfgs["fsdp"], FSDP_ALONE: cfgs["fsdp"]}
        try:
            res = pool.call(_fsdp_job, cfgs, 3 if quick else 10)[0]
            alone = pool.call(_interleaved_job, pair, 2, 5 if quick else 20, 1)[0]["wall"]
        finally:
            pool.close()
        mem = res["memory"]
        total = {s: sum(mem[s].values()) for s in mem}
        out[world] = {
            "bytes": mem,
            "state_ratio": total["fsdp"] / total["ddp"],
            **({"hsdp_state_ratio": total["hsdp"] / total["ddp"]} if "hsdp" in total else {}),
            "step_ratio": paired_ratio(res["wall"]["fsdp"], res["wall"]["ddp"]),
            "median_step_ms": {s: 1e3 * statistics.median(v) for s, v in res["wall"].items()},
            # on gloo the layer's route (fsdp_comm) is the only one: no PREMUL_SUM
            "layer_over_alone": paired_ratio(*alone.values()),
            "layer_route": "fsdp_comm",
        }
    return out


def bench_precision(device: str, quick: bool) -> dict[str, Any]:
    """Step time with gradients travelling in bf16 (and fp16) against fp32, small MLP, W=2."""
    nproc = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    mlp = MODELS["small MLP (communication-bound)"]
    cfgs = {d: _cfg(device, *mlp, f"reduce.dtype={d}", NO_NOISE) for d in ("fp32", "bf16", "fp16")}
    # fp16 training with its loss scaler (gradients reduced in fp32), the defaults otherwise
    cfgs[AMP] = _cfg(device, *mlp, "train.precision=fp16")
    cfgs[AMP_BASE] = _cfg(device, *mlp, "train.precision=fp32")
    pool = RankPool(DistConfig(device=Device[device], threads_per_rank=1), nproc)
    try:
        wall = pool.call(_interleaved_job, cfgs, 10, 30 if quick else 300, 10)[0]["wall"]
    finally:
        pool.close()
    return {
        "world_size": nproc,
        "device": device,
        "median_ms": {d: 1e3 * statistics.median(v) for d, v in wall.items()},
        "ratios": {
            **{d: paired_ratio(wall[d], wall["fp32"]) for d in ("bf16", "fp16")},
            AMP: paired_ratio(wall[AMP], wall[AMP_BASE]),
        },
    }


AMP = "train.precision=fp16 (loss scaler)"  # against AMP_BASE, both with the noise estimate on
AMP_BASE = "train.precision=fp32"


_STEPPERS: dict[str, _Stepper] = {}  # kept in a pool's ranks between calls


def _throughput_block(ctx: DistContext, cfg: dict, steps: int) -> dict[str, float]:
    """Median step time over ``steps`` steps of a stepper kept alive between calls."""
    key = json.dumps(cfg, sort_keys=True)
    if key not in _STEPPERS:
        _STEPPERS[key] = _Stepper(cfg, ctx)
        for _ in range(5):  # warm-up
            _STEPPERS[key]()
    stepper = _STEPPERS[key]
    times = []
    for _ in range(steps):
        _sync(ctx)
        t0 = time.perf_counter()
        stepper()
        _sync(ctx)
        times.append(time.perf_counter() - t0)
    n = stepper.trainer.geom.global_batch_size
    return {"median_step_s": statistics.median(times), "items": n}


def bench_scaling(quick: bool) -> dict[str, Any]:
    """Items/s of the CNN: W=1 vs W=2 (one thread each) vs one process with 2 threads, at a
    per-rank batch where communication weighs (64) and where compute dominates (256).

    The three set-ups stay alive side by side (idle ones block) and take turns, block by
    block, so that the machine's slow drift hits them alike; ratios are paired per round.
    """
    model = [o for o in MODELS["CNN (compute-bound)"] if not o.startswith("data.batch_size")]
    rounds, steps = (4, 5) if quick else (12, 10)
    out: dict[str, Any] = {"cores": available_cores(), "batches": {}}
    for b in (64, 256):
        cases = {
            f"W=1, 1 thread, b={b}": (1, 1, b),
            f"W=2, 1 thread each, b={b} (N={2 * b})": (2, 1, b),
            f"W=1, 2 threads, b={2 * b} (N={2 * b})": (1, 2, 2 * b),
        }
        pools = {
            name: RankPool(DistConfig(threads_per_rank=t), n) for name, (n, t, _) in cases.items()
        }
        cfgs = {
            name: _cfg("cpu", *model, f"data.batch_size={batch}", NO_NOISE)
            for name, (_, _, batch) in cases.items()
        }
        ips: dict[str, list[float]] = {name: [] for name in cases}
        try:
            for _ in range(rounds):
                for name, pool in pools.items():
                    r = pool.call(_throughput_block, cfgs[name], steps)[0]
                    ips[name].append(r["items"] / r["median_step_s"])
        finally:
            for pool in pools.values():
                pool.close()
        names = list(cases)
        out["batches"][b] = {
            "items_per_s": {name: statistics.median(v) for name, v in ips.items()},
            "speedup_w2_over_w1": paired_ratio(ips[names[1]], ips[names[0]]),
            "w2_over_one_process_two_threads": paired_ratio(ips[names[1]], ips[names[2]]),
        }
    return out


def bench_sweep(quick: bool) -> dict[str, Any]:
    """Wall time of a multirun minus the sum of its runs' training time, per point."""
    exe = str(Path(sys.executable).parent / "ddp-reduce")
    out: dict[str, Any] = {}
    for reuse, points in ((True, 16), (False, 4 if quick else 16)):
        lrs = ",".join(f"{0.01 * (i + 1):.2f}" for i in range(points))
        with tempfile.TemporaryDirectory() as tmp:
            wall = _timed(
                [
                    exe,
                    "--multirun",
                    f"optim.lr={lrs}",
                    "train.steps=10",
                    "train.eval_every=0",
                    f"dist.reuse_ranks={str(reuse).lower()}",
                    f"hydra.sweep.dir={tmp}",
                ]
            )
            train = sum(read_summary(p.parent).wall_time_s for p in Path(tmp).glob(f"*/{SUMMARY}"))
        out["reuse_ranks" if reuse else "fresh ranks per point"] = {
            "points": points,
            "wall_s": wall,
            "training_s": train,
            "overhead_per_point_s": (wall - train) / points,
        }
    return out


def _memory_job(ctx: DistContext, cfg: dict, steps: int, warmup: int) -> dict[str, float]:
    stepper = _Stepper(cfg, ctx)
    rss_warm = None
    for step in range(1, steps + 1):
        stepper()
        if step == warmup:
            rss_warm = rss_mb()
    rss_end = rss_mb()
    stepper.close()
    return {"rss_after_warmup_mb": rss_warm, "rss_end_mb": rss_end, "peak_rss_mb": peak_rss_mb()}


def bench_memory(quick: bool) -> dict[str, Any]:
    steps = 600 if quick else 2000
    cfg = _cfg("cpu", "noise.enabled=true")
    pool = RankPool(DistConfig(threads_per_rank=1), 2)
    try:
        per_rank = pool.call(_memory_job, cfg, steps, steps // 10)
    finally:
        pool.close()
    for r in per_rank:
        r["growth"] = r["rss_end_mb"] / r["rss_after_warmup_mb"] - 1
    return {"steps": steps, "warmup_steps": steps // 10, "ranks": per_rank}


def _shown(r: dict[str, float]) -> str:
    """A ratio with its interval, as every table of the report prints it."""
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def _report_reduce(results: dict[str, Any]) -> list[str]:
    if "reduce" not in results:
        return []
    lines: list[str] = []
    r = results["reduce"]
    lines += [
        f"## Reduction overhead (W={r['world_size']}, {r['device']}, interleaved, medians)",
        "",
        "Ratio: median over rounds of the variant's step time over the built-in's in the",
        "same round, [95% bootstrap interval]; met when the whole interval is under target.",
        "",
        "| model | variant | steps | median step (ms) | ratio to built-in | CPU-time ratio "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in r["models"].items():
        for name, row in rows.items():
            target = TARGETS.get(name)  # none for the built-in, the bare loop, every step
            met = verdict(row, target) if target else ""
            shown = f"<= {target}" if target else ("reference" if name == BARE else "")
            lines.append(
                f"| {model} | {name} | {row['steps']} | {row['median_ms']:.3f} | "
                f"{_shown(row)} | {row['cpu_ratio']:.3f} | {shown} | {met} |"
            )
    lines.append("")
    return lines


def _report_scaling(results: dict[str, Any]) -> list[str]:
    if "scaling" not in results:
        return []
    lines: list[str] = []
    s = results["scaling"]
    lines += [
        f"## Scaling (CNN, {s['cores']} cores; medians, set-ups interleaved)",
        "",
        "| case | items/s |",
        "|---|---|",
    ]
    for b in s["batches"].values():
        for name, value in b["items_per_s"].items():
            lines.append(f"| {name} | {value:.0f} |")
    lines.append("")
    for batch, b in s["batches"].items():
        sp, alt = b["speedup_w2_over_w1"], b["w2_over_one_process_two_threads"]
        met = "yes" if sp["low"] >= 1.6 else ("**no**" if sp["high"] < 1.6 else "within noise")
        lines.append(
            f"- b={batch}: W=1 -> W=2 speed-up {sp['ratio']:.2f}x [{sp['low']:.2f}, "
            f"{sp['high']:.2f}] (efficiency {50 * sp['ratio']:.0f}%; target >= 1.6x: {met}); "
            f"W=2 against one process with 2 threads: {alt['ratio']:.2f}x"
        )
    lines.append("")
    return lines


def _report_sweep(results: dict[str, Any]) -> list[str]:
    if "sweep" not in results:
        return []
    lines: list[str] = []
    lines += [
        "## Sweep start-up cost",
        "",
        "| ranks | points | wall (s) | training (s) | overhead per point (s) |",
        "|---|---|---|---|---|",
    ]
    for name, w in results["sweep"].items():
        lines.append(
            f"| {name} | {w['points']} | {w['wall_s']:.1f} | {w['training_s']:.1f} | "
            f"{w['overhead_per_point_s']:.2f} |"
        )
    lines += ["", "Target: <= 1 s per point (with reuse_ranks).", ""]
    return lines


def _report_trainer(results: dict[str, Any]) -> list[str]:
    if "trainer" not in results.get("reduce", {}):
        return []
    lines: list[str] = []
    target = TRAINER_TARGETS[results["reduce"]["device"]]
    defaults = TRAINER_VS_BARE[0]  # the target is the defaults'; the others say why
    rows = [
        [
            model,
            name,
            _shown(r),
            f"<= {target}" if name == defaults else "",
            verdict(r, target) if name == defaults else "",
        ]
        for model, by in results["reduce"]["trainer"].items()
        for name, r in by.items()
    ]
    lines += [
        "## The trainer against a bare DDP loop (step time, same round, [95% interval])",
        "",
        "The trainer with everything on (the noise estimate its default), logging on",
        "logged steps only (every train.log_every), against a bare loop: forward, mean loss,",
        "backward, optimizer step, logging nothing. Without the noise estimate, and never",
        "logging: what each adds.",
        "",
        table(["model", "trainer variant", "trainer / bare", "target", "met"], rows),
        "",
    ]
    return lines


def _report_startup(results: dict[str, Any]) -> list[str]:
    if "startup" not in results:
        return []
    lines: list[str] = []
    st = results["startup"]
    r = st["ratio_to_floor"]
    rows = [[name, f"{v:.2f}"] for name, v in st["median_s"].items()]
    rows.append(
        ["  of which inside the ranks (summary wall_time_s)", f"{st['run_inside_ranks_s']:.2f}"]
    )
    calc = [
        [
            name,
            _shown(c),
            f"<= {CALCULATOR_TARGET_S}",
            verdict(c, CALCULATOR_TARGET_S),
        ]
        for name, c in st["calculator"].items()
    ]
    lines += [
        f"## Cold start ({st['rounds']} interleaved rounds, medians in seconds)",
        "",
        table(["what", "median (s)"], rows),
        "",
        f"A one-step default run over the import floor: {r['ratio']:.2f}x [{r['low']:.2f}, "
        f"{r['high']:.2f}] (target <= {STARTUP_TARGET}: {verdict(r, STARTUP_TARGET)}). The "
        "ranks' imports run beside the launcher's (a forkserver imports them once).",
        "",
        table(["calculator", "median (s) [95% interval]", "target", "met"], calc),
        "",
    ]
    return lines


def _report_fsdp(results: dict[str, Any]) -> list[str]:
    if "fsdp" not in results:
        return []
    lines: list[str] = []
    rows = []
    for world, r in results["fsdp"].items():
        for s in r["bytes"]:
            b = r["bytes"][s]
            rows.append(
                [
                    world,
                    s,
                    *(f"{b[k] / 2**20:.1f}" for k in ("parameters", "gradients", "optimizer")),
                    f"{r['median_step_ms'][s]:.1f}",
                ]
            )
    lines += [
        "## FSDP against DDP (per rank; MiB of this rank's own shards)",
        "",
        table(["W", "strategy", "parameters", "gradients", "optimizer", "median step (ms)"], rows),
        "",
    ]
    for world, r in results["fsdp"].items():
        sr = r["step_ratio"]
        lines.append(
            f"- W={world}: state fsdp/ddp {r['state_ratio']:.3f} (1/W = {1 / int(world):.3f}); "
            f"step time fsdp/ddp {sr['ratio']:.2f} [{sr['low']:.2f}, {sr['high']:.2f}]"
        )
        if "hsdp_state_ratio" in r:
            shards = int(world) // HSDP_REPLICAS
            lines.append(
                f"- W={world}: state hsdp/ddp {r['hsdp_state_ratio']:.3f} with "
                f"R={HSDP_REPLICAS} replicas of S={shards} shards (1/S = {1 / shards:.3f})"
            )
        if "layer_over_alone" in r:
            alone = r["layer_over_alone"]
            lines.append(
                f"- W={world}: FSDP2 with the layer ({r['layer_route']}) / FSDP2 alone (its "
                f"divide factor W, the same c = 1): {_shown(alone)} "
                f"(target <= {FSDP_TARGET}: {verdict(alone, FSDP_TARGET)})"
            )
    lines.append("")
    return lines


def _report_precision(results: dict[str, Any]) -> list[str]:
    if "precision" not in results:
        return []
    lines: list[str] = []
    pr = results["precision"]
    rows = [
        [
            d,
            f"{pr['median_ms'][d]:.3f}",
            _shown(pr["ratios"][d]) if d in pr["ratios"] else "1",
        ]
        for d in pr["median_ms"]
    ]
    lines += [
        f"## Gradients in low precision (small MLP, W={pr['world_size']}, {pr['device']})",
        "",
        table(["reduce.dtype or training precision", "median step (ms)", "ratio"], rows),
        "",
        f"Ratios: each reduce.dtype to fp32 (noise estimate off); {AMP} to {AMP_BASE} (the",
        "defaults otherwise: the noise estimate on).",
        "",
    ]
    return lines


def _report_data(results: dict[str, Any]) -> list[str]:
    if "data" not in results:
        return []
    lines: list[str] = []
    rows = [
        [
            case,
            name,
            f"{r['median_ms']:.2f}",
            _shown(r),
        ]
        for case, paths in results["data"].items()
        for name, r in paths.items()
    ]
    lines += [
        "## Data paths (W=2, interleaved; ratio to the in-memory path in the same round)",
        "",
        table(["data", "path", "median step (ms)", "ratio to memory"], rows),
        "",
    ]
    return lines


def _report_memory(results: dict[str, Any]) -> list[str]:
    if "memory" not in results:
        return []
    lines: list[str] = []
    m = results["memory"]
    lines += [
        f"## Memory ({m['steps']} steps, W=2; growth measured after {m['warmup_steps']})",
        "",
        "| rank | RSS after warm-up (MiB) | RSS at end (MiB) | growth | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(m["ranks"]):
        lines.append(
            f"| {i} | {r['rss_after_warmup_mb']:.1f} | {r['rss_end_mb']:.1f} | "
            f"{100 * r['growth']:+.2f}% | {r['peak_rss_mb']:.1f} |"
        )
    lines += ["", "Target: growth < 5% after warm-up.", ""]
    return lines


def _report_audit(results: dict[str, Any]) -> list[str]:
    return audit_report(results["audit"], _shown, verdict) if "audit" in results else []


_SECTIONS = (
    _report_audit,
    _report_reduce,
    _report_scaling,
    _report_sweep,
    _report_trainer,
    _report_startup,
    _report_fsdp,
    _report_precision,
    _report_data,
    _report_memory,
)


def report(results: dict[str, Any]) -> str:
    """The markdown report of whatever ``results`` holds, section by section."""
    return "\n".join(line for section in _SECTIONS for line in section(results))


LOADED_PER_CORE = 0.5  # 1-minute load average per core above which timings are suspect


def load_warning(cores: int | None = None, load: float | None = None) -> str | None:
    """A sentence when the machine is busy before a measurement (os.getloadavg() per core),
    else None; None too where the load average is not available."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    cores = cores or available_cores()
    if load / cores <= LOADED_PER_CORE:
        return None
    return (
        f"the machine is loaded (1-minute load average {load:.2f} on {cores} cores, "
        f"{load / cores:.2f} per core > {LOADED_PER_CORE}): other processes compete for the "
        "cores and the timings below may be slower and noisier than this code is"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddp_reduce.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "what",
        choices=[
            "reduce",
            "startup",
            "scaling",
            "sweep",
            "memory",
            "data",
            "fsdp",
            "precision",
            "audit",
            "all",
        ],
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--model", action="append", help="reduce: only the models whose name holds this (mlp, cnn)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    every = ["reduce", "startup", "scaling", "sweep", "memory", "data", "fsdp", "precision"]
    what = every if args.what == "all" else [args.what]
    if args.device == "cuda":
        what = [w for w in what if w in ("reduce", "precision")]  # the others are CPU figures
    results: dict[str, Any] = {}
    # before measuring only: later, the load average holds this benchmark's own ranks
    warning = load_warning()
    if warning:
        print(f"bench: warning: {warning}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    for i, w in enumerate(what, 1):
        print(f"bench: [{i}/{len(what)}] {w} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if w == "reduce":
            results[w] = bench_reduce(args.device, args.quick, args.model)
        elif w == "precision":
            results[w] = bench_precision(args.device, args.quick)
        elif w == "audit":
            results[w] = bench_audit(args.quick, paired_ratio)
        else:
            results[w] = globals()[f"bench_{w}"](args.quick)
        now = time.perf_counter()
        left = len(what) - i
        eta = f", about {(now - start) / i * left:.0f} s left" if left else ""
        print(
            f"bench: [{i}/{len(what)}] {w} done in {now - t0:.0f} s ({now - start:.0f} s in all"
            f"{eta})",
            file=sys.stderr,
            flush=True,
        )
        print(report({w: results[w]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
