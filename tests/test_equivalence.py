"""Equivalent settings give the same weights: more ranks vs accumulation vs one big batch, and
sum modes with lr/c vs mean with lr (docs/design.md §2), through the full training path."""

from __future__ import annotations

import pytest
import torch

from ddp_reduce.run.launch import rank_main
from tests.helpers import config, config_dict, spawn, train_runs

STEPS = 20
LR = 0.1
TOL = dict(rtol=1e-5, atol=1e-6)
BASE = (
    "data=digits",
    "model=mlp",
    "optim=sgd",
    f"optim.lr={LR}",
    "optim.momentum=0.9",
    f"train.steps={STEPS}",
    "train.eval_every=0",
    "train.log_every=5",
)


def weights(run_dir) -> torch.Tensor:
    state = torch.load(run_dir / "model.pt")
    return torch.cat([v.flatten() for v in state.values()])


W2_CASES = {
    # name: (b, A, loss, op, lr)
    "mean_mean": (16, 1, "mean", "mean", LR),
    "sum_sum_lr_over_N": (16, 1, "sum", "sum", LR / 32),
    "sum_mean_lr_over_bA": (16, 1, "sum", "mean", LR / 16),
    "mean_sum_lr_over_W": (16, 1, "mean", "sum", LR / 2),
    "sum_global_mean": (16, 1, "sum", "global_mean", LR),
    "ranks_and_accum": (8, 2, "mean", "mean", LR),
    "sum_sum_same_lr": (16, 1, "sum", "sum", LR),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("equiv")
    out = {}
    # one process: W=1 b=32, and W=1 b=8 A=4
    for name, extra in {
        "w1_b32": ("data.batch_size=32",),
        "w1_b8_a4": ("data.batch_size=8", "train.accum_steps=4"),
    }.items():
        out[name] = rank_main(config(*BASE, *extra), str(root / name)).to_dict()
    jobs = []
    for name, (b, a, loss, op, lr) in W2_CASES.items():
        cfg = config_dict(
            *BASE,
            f"data.batch_size={b}",
            f"train.accum_steps={a}",
            f"reduce.loss={loss}",
            f"reduce.op={op}",
            f"optim.lr={lr}",
        )
        jobs.append((cfg, str(root / name)))
    summaries = spawn(train_runs, 2, root, jobs)[0]
    out.update(dict(zip(W2_CASES, summaries, strict=True)))
    return root, out


def test_world_size_and_accumulation_give_the_same_weights(runs):
    root, summaries = runs
    ref = weights(root / "w1_b32")
    for name in ("w1_b8_a4", "mean_mean", "ranks_and_accum"):
        assert summaries[name]["global_batch_size"] == 32
        torch.testing.assert_close(weights(root / name), ref, **TOL, msg=name)


@pytest.mark.parametrize(
    "name,c",
    [
        ("sum_sum_lr_over_N", 32),
        ("sum_mean_lr_over_bA", 16),
        ("mean_sum_lr_over_W", 2),
        ("sum_global_mean", 1),
    ],
)
def test_sum_modes_with_lr_over_c_match_mean(runs, name, c):
    root, summaries = runs
    assert summaries[name]["grad_scale"] == c
    assert summaries[name]["status"] == "completed"
    torch.testing.assert_close(weights(root / name), weights(root / "mean_mean"), **TOL)


def test_sum_mode_without_lr_conversion_differs(runs):
    """The check above can fail: c = 32 at an unconverted lr is another run (or diverges)."""
    root, summaries = runs
    if summaries["sum_sum_same_lr"]["status"] == "diverged":
        return
    diff = (weights(root / "sum_sum_same_lr") - weights(root / "mean_mean")).abs().max()
    assert diff > 1e-2


def test_summary_fields(runs):
    _, summaries = runs
    s = summaries["ranks_and_accum"]
    for key in (
        "status",
        "grad_scale",
        "world_size",
        "local_batch_size",
        "accum_steps",
        "global_batch_size",
        "steps_done",
        "final_train_loss",
        "final_eval_loss",
        "final_eval_accuracy",
        "diverged_at_step",
        "wall_time_s",
        "versions",
    ):
        assert key in s
    assert (s["world_size"], s["local_batch_size"], s["accum_steps"]) == (2, 8, 2)
    assert s["steps_done"] == STEPS and s["diverged_at_step"] is None
