"""The same sum/mean layer under FSDP2's reduce-scatter, in real gloo groups: c·G for every pair,
the same weights as DDP (W = 2 and 4), everything around the step, sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_reduce.config import load_config
from ddp_reduce.data import load_dataset
from ddp_reduce.models import build_model
from tests.helpers import (
    PAIRS,
    A,
    B,
    W,
    assert_close,
    config_dict,
    ddp_reduce,
    first_step,
    reference_gradient,
    spawn,
    train_runs,
)


def _divide_twice(trainer) -> None:
    """FSDP's own mean left on top of ours: the factor applied twice (the public bugs)."""
    ranks = trainer.ctx.world_size
    trainer.reducer.loss_scales([1], counts=[1] * ranks)  # picks the route
    for unit in trainer.reducer._fsdp_units:
        unit.set_gradient_divide_factor(float(ranks))


def _cfg(loss: str, op: str, data: str = "digits", **extra: str) -> dict:
    model = {"digits": "mlp", "sequences": "seq"}[data]
    return config_dict(
        "dist.strategy=fsdp",
        f"data={data}",
        f"model={model}",
        f"data.batch_size={B if data == 'digits' else 2}",
        f"train.accum_steps={A}",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
        *(f"{k}={v}" for k, v in extra.items()),
    )


@pytest.fixture(scope="module")
def received(tmp_path_factory):
    cfgs = [_cfg(loss, op) for loss, op, _ in PAIRS]
    cfgs.append(_cfg("sum", "global_mean", data="sequences", **{"data.max_len": "32"}))
    return cfgs, spawn(first_step, W, tmp_path_factory.mktemp("fsdp"), cfgs)


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"{lo}-{op}" for lo, op, _ in PAIRS])
def test_the_optimizer_receives_c_times_G_under_fsdp(received, i):
    cfgs, ranks = received
    loss, op, c = PAIRS[i]
    g = reference_gradient(cfgs[i])[0]
    for r in ranks:
        got = r[i]
        assert got["c"] == c and got["exact"] and got["route"] == "fsdp_comm"
        assert_close(got["grad"], c * g)


def test_ragged_tokens_global_mean_under_fsdp(received):
    cfgs, ranks = received
    g = reference_gradient(cfgs[-1])[0]
    for r in ranks:
        assert r[-1]["c"] == 1 and r[-1]["exact"]
        assert_close(r[-1]["grad"], g)


def test_a_divide_factor_applied_twice_is_caught(tmp_path):
    """FSDP averages over the mesh by default; with ours that is 1/W too much (the public
    bugs: gradients off by exactly a factor). The check above would see it: planted here."""
    cfg = _cfg("mean", "mean")
    ranks = spawn(first_step, W, tmp_path, [cfg], _divide_twice)
    g, _ = reference_gradient(cfg)
    ratio = (ranks[0][0]["grad"].norm() / g.norm()).item()
    assert ratio == pytest.approx(1 / W, rel=1e-5)  # the double division, measured
    assert abs(ratio - 1) > 0.1  # ... which the c·G check (1e-5) refuses


STEPS = ("train.steps=20", "train.eval_every=0", "train.log_every=5", "optim.momentum=0.9")
CASES = {
    "mlp": ("data.batch_size=8",),
    "seq-global_mean": (
        "data=sequences",
        "model=seq",
        "reduce.loss=sum",
        "reduce.op=global_mean",
        "data.batch_size=2",
    ),
    "adam-clip-wd-noise": ("optim=adam", "optim.clip_norm=0.05", "optim.weight_decay=0.01"),
}


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_and_ddp_train_the_same_weights(tmp_path, world):
    jobs = []
    for name, extra in CASES.items():
        if world == 4 and name == "adam-clip-wd-noise":
            continue
        for strategy in ("ddp", "fsdp"):
            cfg = config_dict(
                *STEPS, *extra, f"dist.strategy={strategy}", "dist.threads_per_rank=1"
            )
            jobs.append((cfg, str(tmp_path / f"{name}-{strategy}")))
    summaries = spawn(train_runs, world, tmp_path, jobs)[0]
    by_dir = {run: s for (_, run), s in zip(jobs, summaries, strict=True)}
    for name in CASES:
        if world == 4 and name == "adam-clip-wd-noise":
            continue
        ddp, fsdp = by_dir[str(tmp_path / f"{name}-ddp")], by_dir[str(tmp_path / f"{name}-fsdp")]
        assert fsdp["status"] == ddp["status"] == "completed"
        assert fsdp["grad_scale"] == ddp["grad_scale"] and fsdp["reduce_route"] == "fsdp_comm"
        a = torch.load(tmp_path / f"{name}-ddp" / "model.pt")
        b = torch.load(tmp_path / f"{name}-fsdp" / "model.pt")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
        assert fsdp["final_eval_loss"] == pytest.approx(ddp["final_eval_loss"], rel=1e-5)
        if name == "adam-clip-wd-noise":  # the noise estimate from the sharded reduction
            bs = fsdp["noise_scale"]["b_simple"], ddp["noise_scale"]["b_simple"]
            assert bs[0] == pytest.approx(bs[1], rel=1e-4)


def test_sharded_state_is_about_one_over_w(received):
    _, ranks = received
    mem = ranks[0][0]["memory"]
    # the MLP's parameters are split over the ranks (rows of each weight, padded to divide)
    assert mem["parameters"] < 0.6 * sum(p.numel() * 4 for p in _mlp_params())


def _mlp_params():
    cfg = load_config(_cfg("mean", "mean"))
    return list(build_model(cfg.model, load_dataset(cfg.data)).parameters())


def test_a_killed_rank_resumes_bitwise_from_a_sharded_checkpoint(tmp_path):
    common = ("dist.strategy=fsdp", "train.steps=40", "train.eval_every=0", "train.log_every=10")
    ref = ddp_reduce(*common, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    crash = ddp_reduce(
        *common,
        "train.checkpoint_every=10",
        "fault.crash_at_step=27",
        "fault.crash_rank=1",
        "dist.max_restarts=1",
        f"hydra.run.dir={tmp_path / 'crash'}",
    )
    assert crash.returncode == 0, crash.stderr[-3000:]
    assert "step_00000020.dcp" in crash.stderr
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert (summary["status"], summary["resumed_from_step"]) == ("completed", 20)
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(tmp_path / "crash" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first,then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_checkpoint_of_one_strategy_resumes_in_the_other(tmp_path, first, then):
    base = ("train.eval_every=0", "train.checkpoint_every=10", "train.log_every=10")
    ref = ddp_reduce(
        *base, "train.steps=20", f"dist.strategy={then}", f"hydra.run.dir={tmp_path / 'ref'}"
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    half = ddp_reduce(*base, "train.steps=10", f"dist.strategy={first}", f"hydra.run.dir={run}")
    assert half.returncode == 0, half.stderr[-2000:]
    (run / "summary.json").unlink()  # as if stopped after the checkpoint
    rest = ddp_reduce(*base, "train.steps=20", f"dist.strategy={then}", f"hydra.run.dir={run}")
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 10
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(run / "model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["builtin", "manual"])
def test_fsdp_refuses_ddp_only_reductions(tmp_path, impl):
    proc = ddp_reduce(
        "dist.strategy=fsdp", f"reduce.impl={impl}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert proc.returncode == 2 and "reduce.impl" in proc.stderr and "fsdp" in proc.stderr
    assert "Traceback" not in proc.stderr
