"""Loss terms with their own units: each term's factor and c by hand, then the example's token
cross-entropy + per-sequence load balance in real gloo groups at W in {1, 2, 4} and A in
{1, 2} against a one-process float64 reference, and the three usual mistakes measured."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch.distributed as dist

from ddp_reduce.layer.reduction import LossReduction, ReduceOp, plan_terms
from tests.helpers import REPO, spawn

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
