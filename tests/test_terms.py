"""Loss terms with their own units: each term's factor and c by hand, then the example's token
cross-entropy + per-sequence load balance in real gloo groups at W in {1, 2, 4} and A in
{1, 2} against a one-process float64 reference, and the three usual mistakes measured."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.distributed as dist

from ddp_reduce.data import GlobalBatchSampler
from ddp_reduce.layer.reduction import LossReduction, ReduceOp, plan_terms
from ddp_reduce.optim import build_optimizer, build_schedule
from tests.helpers import REPO, config, ddp_reduce, spawn

_spec = importlib.util.spec_from_file_location("moe_aux", REPO / "examples" / "moe_aux.py")
moe_aux = sys.modules.setdefault("moe_aux", importlib.util.module_from_spec(_spec))
if not hasattr(moe_aux, "check"):
    _spec.loader.exec_module(moe_aux)

WEIGHTS = {"tokens": 1.0, "sequences": 0.01}

# W = 2; this rank holds 30 of 50 tokens (unequal) and 3 of 6 sequences (equal)
LOCAL, GLOBAL = {"tokens": 30, "sequences": 3}, {"tokens": 50, "sequences": 6}
EQUAL = {"tokens": False, "sequences": True}
BY_HAND = {  # (loss, op): ({unit: factor}, {unit: c}), written out from the rule
    ("sum", "global_mean"): ({"tokens": 1.0, "sequences": 50 / 6}, {"tokens": 1, "sequences": 1}),
    ("sum", "sum"): ({"tokens": 1.0, "sequences": 1.0}, {"tokens": 50, "sequences": 6}),
    ("sum", "mean"): ({"tokens": 1.0, "sequences": 1.0}, {"tokens": 25, "sequences": 3}),
    ("mean", "mean"): ({"tokens": 1 / 30, "sequences": 1 / 3}, {"tokens": 1, "sequences": 1}),
    ("mean", "sum"): ({"tokens": 1 / 30, "sequences": 1 / 3}, {"tokens": 2, "sequences": 2}),
}


@pytest.mark.parametrize("pair", list(BY_HAND), ids=lambda p: "-".join(p))
def test_each_term_gets_its_own_factor_and_c(pair):
    loss, op = LossReduction[pair[0]], ReduceOp[pair[1]]
    plans = plan_terms(loss, op, 2, LOCAL, GLOBAL, EQUAL)
    factors, cs = BY_HAND[pair]
    for unit, plan in plans.items():
        assert plan.factor == pytest.approx(factors[unit], rel=1e-12)
        assert plan.c == pytest.approx(cs[unit], rel=1e-12)
        assert plan.global_units == GLOBAL[unit]
        # a mean of means over unequal token counts has no exact c
        assert plan.exact == (loss is LossReduction.sum or EQUAL[unit])


def test_micro_mean_has_no_factor_per_term():
    with pytest.raises(ValueError, match="micro_mean"):
        plan_terms(LossReduction.micro_mean, ReduceOp.mean, 2, LOCAL, GLOBAL, EQUAL)


def _checks(init: str, accums: list[int]) -> list[dict]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        return [moe_aux.check(a, WEIGHTS) for a in accums]
    finally:
        dist.barrier()
        dist.destroy_process_group()


ACCUMS = [1, 2]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"W{w}")
def world_runs(request, tmp_path_factory):
    world = request.param
    return world, spawn(_checks, world, tmp_path_factory.mktemp(f"terms{world}"), ACCUMS)


def test_main_plus_aux_equals_the_one_process_reference(world_runs):
    world, ranks = world_runs
    data = moe_aux.make_sequences()
    want = moe_aux.counts(data[1][:13])
    for results in ranks:
        for got in results:
            right = got["term_scales"]
            assert right["rel_error"] < 1e-5
            assert right["c"] == {"tokens": 1.0, "sequences": 1.0}
            assert right["global_units"] == want


def test_the_usual_mistakes_bias_the_aux_term(world_runs):
    """|g - reference| over the aux term's own share: float rounding (< 1e-3) where a mistake
    changes nothing, its bias (> 1e-2) where it does; times W is off by exactly W - 1."""
    world, ranks = world_runs
    for a, got in zip(ACCUMS, ranks[0], strict=True):
        assert got["times_w"]["aux_error"] == pytest.approx(world - 1, abs=1e-3)
        # 13 sequences split unequally over the ranks (and over the micro-batches)
        biased = {"rank_mean": world > 1, "micro_mean": world * a > 1}
        for name, is_biased in biased.items():
            err = got[name]["aux_error"]
            assert (err > 1e-2) if is_biased else (err < 1e-3), (name, world, a, err)


TERMS_RUN = (
    "+data._target_=moe_aux.splits",
    "+model._target_=moe_aux.TinyMoE",
    "+loss._target_=moe_aux.TokensAndBalance",
    "+loss.aux_weight=0.5",  # large enough that a wrong factor on it shows in the weights
    "reduce.loss=sum",
    "reduce.op=global_mean",
    "train.steps=10",
    "train.eval_every=0",
    "train.log_every=5",
)


def _terms_run(tmp_path, name: str, *overrides: str) -> dict:
    env = {"PYTHONPATH": str(REPO / "examples")}
    proc = ddp_reduce(*TERMS_RUN, *overrides, f"hydra.run.dir={tmp_path / name}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / name / "model.pt")


def reference_weights(*overrides: str) -> dict:
    """The run's 10 steps in one process, in float64, without the reduction layer: the
    gradient of Σ_u w_u · (term u summed over the global batch) / (its units), with the
    run's own optimizer, schedule and global batches."""
    cfg = config(*TERMS_RUN, *overrides)
    train = moe_aux.splits()[0]
    torch.manual_seed(cfg.seed)
    model = moe_aux.TinyMoE().double()
    n = cfg.dist.nproc * cfg.data.batch_size * cfg.train.accum_steps  # N = W·b·A
    optimizer = build_optimizer(cfg.optim, model, n)
    schedule = build_schedule(cfg.optim, optimizer, cfg.train.steps)
    sampler = GlobalBatchSampler(len(train), n, cfg.seed, cfg.data.last_batch)
    weights = moe_aux.TokensAndBalance(cfg.loss.kwargs["aux_weight"]).weights
    for t in range(cfg.train.steps):
        x, y = train[sampler.global_batch(t)]
        sums, units = moe_aux.term_sums(model, x, y), moe_aux.counts(y)
        optimizer.zero_grad()
        sum(w * sums[u] / units[u] for u, w in weights.items()).backward()
        optimizer.step()
        schedule.step()
    return {k: v.float() for k, v in model.state_dict().items()}


def test_a_loss_of_several_terms_through_hydra_matches_one_process(tmp_path):
    """16 sequences a step, as W=2 x A=2 x b=4 through ddp-reduce and its ranks, against the
    weighted sum of the terms' global means in one process (float64)."""
    run = _terms_run(tmp_path, "w2a2", "dist.nproc=2", "train.accum_steps=2", "data.batch_size=4")
    want = reference_weights("dist.nproc=2", "train.accum_steps=2", "data.batch_size=4")
    for k in want:
        torch.testing.assert_close(run[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
