"""HSDP (FSDP2 on a (replicate, shard) mesh) in real gloo groups of 4 ranks: c·G for every
pair at (R, S) = (1, 4), (2, 2), (4, 1), pre-division and bf16, unequal token counts, a planted
second division, the same weights as DDP after 20 momentum steps; then kill-and-resume."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_reduce.config import ConfigError
from tests.helpers import (
    assert_close,
    config,
    config_dict,
    ddp_reduce,
    first_step,
    reference_gradient,
    rel_error,
    spawn,
    train_runs,
)

W, B, A = 4, 4, 2  # 4 ranks of 4 items, 2 micro-steps: N = 32
N = W * B * A
PAIRS = [  # (reduce.loss, reduce.op, c), c written out by hand
    ("mean", "mean", 1),
    ("mean", "sum", W),
    ("sum", "mean", B * A),
    ("sum", "sum", N),
    ("sum", "global_mean", 1),
]
MESHES = [(1, 4), (2, 2), (4, 1)]
PLANTED_SEED = 7  # the config whose trainer gets FSDP's own division left on top of ours


def _cfg(replicate: int, loss: str = "mean", op: str = "mean", *extra: str) -> dict:
    return config_dict(
        "dist.strategy=hsdp",
        f"dist.replicate={replicate}",
        f"data.batch_size={B}",
        f"train.accum_steps={A}",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
        *extra,
    )


CASES: dict[str, tuple[dict, float]] = {}  # name -> (config, c)
for r, s in MESHES:
    for loss, op, c in PAIRS:
        CASES[f"{r}x{s}-{loss}-{op}"] = (_cfg(r, loss, op), c)
# S = 1: no reduce-scatter, so the division before the all-reduce rides the loss scale
CASES["4x1-sqrt"] = (_cfg(4, "sum", "global_mean", "reduce.predivide=sqrt"), 1)
CASES["2x2-tokens"] = (  # unequal token counts across ranks: only global_mean is exact
    _cfg(2, "sum", "global_mean", "data=sequences", "model=seq", "data.max_len=32"),
    1,
)
CASES["2x2-bf16-none"] = (_cfg(2, "sum", "sum", "reduce.dtype=bf16", "reduce.predivide=none"), N)
CASES["4x1-bf16-full"] = (_cfg(4, "mean", "mean", "reduce.dtype=bf16"), 1)
CASES["2x2-planted"] = (_cfg(2, "mean", "mean", f"seed={PLANTED_SEED}"), 1)

STEPS = ("train.steps=20", "train.eval_every=0", "train.log_every=5", "optim.momentum=0.9")
TRAINED = {
    "ddp": ("dist.strategy=ddp",),
    **{f"hsdp-{r}x{s}": ("dist.strategy=hsdp", f"dist.replicate={r}") for r, s in MESHES},
}


def _plant(trainer) -> None:
    """FSDP's own division by W left on top of ours: the factor applied twice (torchtitan
    #2318's bug), on the marked config only."""
    if trainer.cfg.seed != PLANTED_SEED:
        return
    trainer.reducer.loss_scales([1], counts=[1] * W)  # picks the route
    for unit in trainer.reducer._fsdp_units:
        unit.set_gradient_divide_factor(float(W))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Every case's first step, in one group of 4 ranks."""
    cfgs = [cfg for cfg, _ in CASES.values()]
    ranks = spawn(first_step, W, tmp_path_factory.mktemp("hsdp"), cfgs, _plant)
    return {name: [r[i] for r in ranks] for i, name in enumerate(CASES)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained runs, in processes of their own: in torch 2.13 a process's later group that
    makes a mesh equal to an earlier group's gets the earlier mesh (and its dead groups) on
    its DTensor parameters. A run of ddp-reduce is one group per rank process."""
    tmp = tmp_path_factory.mktemp("hsdp-trained")
    jobs = [
        (config_dict(*STEPS, *extra, "dist.threads_per_rank=1"), str(tmp / name))
        for name, extra in TRAINED.items()
    ]
    return tmp, spawn(train_runs, W, tmp, jobs)[0]


EXACT = [n for n in CASES if "bf16" not in n and "planted" not in n]


@pytest.mark.parametrize("name", EXACT)
def test_the_optimizer_receives_c_times_G_under_hsdp(group, name):
    got = group
    cfg, c = CASES[name]
    g = reference_gradient(cfg, world_size=W)[0]
    for rank in got[name]:
        assert rank["c"] == c and rank["exact"] and rank["route"] == "hsdp_comm"
        assert_close(rank["grad"], c * g)


@pytest.mark.parametrize("name", [n for n in CASES if "bf16" in n])
def test_bf16_reduction_stays_close_and_is_audited(group, name):
    got = group
    cfg, c = CASES[name]
    g = reference_gradient(cfg, world_size=W)[0]
    for rank in got[name]:
        assert rel_error(rank["grad"], c * g) < 1e-2  # bf16 keeps 8 bits of mantissa
    shards = int(name.split("x")[1].split("-")[0])
    if shards > 1:  # the float64 audit rides the reduce-scatter (none at S = 1)
        err = got[name][0]["rel_error"]
        assert err is not None and 0 < err < 1e-2


def test_a_second_division_is_caught(group):
    got = group
    cfg, _ = CASES["2x2-planted"]
    g = reference_gradient(cfg, world_size=W)[0]
    ratio = (got["2x2-planted"][0]["grad"].norm() / g.norm()).item()
    assert ratio == pytest.approx(1 / W, rel=1e-5)  # the double division, measured
    assert rel_error(got["2x2-planted"][0]["grad"], g) > 0.1  # ... which the check refuses


def test_hsdp_state_is_one_over_s(group):
    got = group
    full = got["1x4-mean-mean"][0]["memory"]["parameters"]
    assert got["2x2-mean-mean"][0]["memory"]["parameters"] == pytest.approx(2 * full, rel=0.1)
    assert got["4x1-mean-mean"][0]["memory"]["parameters"] == pytest.approx(4 * full, rel=0.1)


def test_hsdp_and_ddp_train_the_same_weights(trained):
    tmp, summaries = trained
    by_name = dict(zip(TRAINED, summaries, strict=True))
    ddp = torch.load(tmp / "ddp" / "model.pt")
    for name in TRAINED:
        assert by_name[name]["status"] == "completed"
        assert by_name[name]["grad_scale"] == by_name["ddp"]["grad_scale"]
        if name == "ddp":
            continue
        assert by_name[name]["reduce_route"] == "hsdp_comm"
        got = torch.load(tmp / name / "model.pt")
        for k in ddp:
            torch.testing.assert_close(got[k], ddp[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def test_a_killed_rank_resumes_bitwise_from_an_hsdp_checkpoint(tmp_path):
    common = (
        "dist.strategy=hsdp",
        "dist.nproc=4",
        "dist.replicate=2",
        "dist.threads_per_rank=1",
        "train.steps=16",
        "train.eval_every=0",
        "train.log_every=8",
    )
    ref = ddp_reduce(*common, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    crash = ddp_reduce(
        *common,
        "train.checkpoint_every=8",
        "fault.crash_at_step=11",
        "fault.crash_rank=3",
        "dist.max_restarts=1",
        f"hydra.run.dir={tmp_path / 'crash'}",
    )
    assert crash.returncode == 0, crash.stderr[-3000:]
    assert "step_00000008.dcp" in crash.stderr
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert (summary["status"], summary["resumed_from_step"]) == ("completed", 8)
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(tmp_path / "crash" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (("dist.strategy=hsdp",), "with dist.strategy=hsdp"),
        (("dist.strategy=hsdp", "dist.replicate=0"), "a positive integer R"),
        (("dist.strategy=fsdp", "dist.replicate=2"), "null with dist.strategy=fsdp"),
    ],
)
def test_a_bad_replicate_is_a_config_error(overrides, needle):
    with pytest.raises(ConfigError, match="dist.replicate") as err:
        config(*overrides)
    assert needle in str(err.value)


def test_a_replicate_that_does_not_divide_w_is_refused_plainly(tmp_path):
    proc = ddp_reduce("dist.strategy=hsdp", "dist.replicate=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dist.replicate" in proc.stderr and "dividing the world size 2" in proc.stderr
