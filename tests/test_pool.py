"""Ranks kept alive across sweep points: a point's result does not depend on what ran before."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_reduce.config import DistConfig
from ddp_reduce.run.pool import PoolError, RankPool
from tests.helpers import ddp_reduce

POINT = ("train.steps=20", "train.eval_every=0", "train.log_every=5")


def test_a_sweep_point_equals_the_same_run_alone(tmp_path):
    # the point under test runs after another point that trains a different model, lr and op
    sweep = ddp_reduce(
        "--multirun",
        *POINT,
        "model.hidden=[32],[64]",
        "reduce.op=sum,mean",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    alone = ddp_reduce(
        *POINT, "model.hidden=[64]", "reduce.op=mean", f"hydra.run.dir={tmp_path / 'alone'}"
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    points = {
        p.parent.name: json.loads(p.read_text())
        for p in (tmp_path / "sweep").glob("*/summary.json")
    }
    # Hydra numbers the points in order and each folder is named by its number and overrides:
    # hidden=[64], op=mean is the last one
    common = "train.eval_every=0,train.steps=20"  # train.log_every: bookkeeping, not named
    names = [
        f"{i}_model.hidden={hidden},reduce.op={op},{common}"
        for i, (hidden, op) in enumerate(
            [("[32]", "sum"), ("[32]", "mean"), ("[64]", "sum"), ("[64]", "mean")]
        )
    ]
    assert sorted(points) == sorted(names)
    last = names[3]
    assert (points[last]["reduce_op"], points[last]["world_size"]) == ("mean", 2)
    a = torch.load(tmp_path / "sweep" / last / "model.pt")
    b = torch.load(tmp_path / "alone" / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert points[last]["final_train_loss"] == summary["final_train_loss"]


def _fail_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("planted failure")
    return ctx.rank


def _rank(ctx):
    return (ctx.rank, ctx.world_size)


def test_a_failing_job_tears_the_pool_down_and_says_which_rank():
    pool = RankPool(DistConfig(threads_per_rank=1), 2)
    assert pool.call(_rank) == [(0, 2), (1, 2)]
    with pytest.raises(PoolError, match="rank 1 failed: ValueError: planted failure"):
        pool.call(_fail_on_rank_1)
    assert not pool.alive()
    fresh = RankPool(DistConfig(threads_per_rank=1), 2)
    try:
        assert fresh.call(_rank) == [(0, 2), (1, 2)]
    finally:
        fresh.close()
