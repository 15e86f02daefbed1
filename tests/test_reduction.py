"""The arithmetic of docs/design.md §1, checked against the table written out by hand."""

import pytest

from ddp_reduce.layer.reduction import LossReduction as L
from ddp_reduce.layer.reduction import (
    ReduceImpl,
    check_combination,
    divisor,
    nominal_scale,
    plan_step,
)
from ddp_reduce.layer.reduction import ReduceOp as O

W, B, A = 4, 8, 3
N = W * B * A


def step_scale(loss, op, world_size, counts):
    """c and exactness of a step whose ranks hold ``counts`` items."""
    return plan_step(loss, op, world_size, counts[0], counts)


def loss_scale(loss, local_items):
    return plan_step(loss, O.sum, 1, local_items, [local_items]).loss_scale


@pytest.mark.parametrize(
    "loss,op,c",
    [
        (L.mean, O.mean, 1),
        (L.mean, O.sum, W),
        (L.sum, O.mean, B * A),
        (L.sum, O.sum, N),
        (L.sum, O.global_mean, 1),
    ],
)
def test_nominal_scale_matches_design_table(loss, op, c):
    assert nominal_scale(loss, op, W, B, A) == c


def test_unequal_counts():
    counts = [10, 30]
    # sum-loss modes stay exact; their c follows the actual counts
    assert step_scale(L.sum, O.sum, 2, counts).c == 40
    assert step_scale(L.sum, O.mean, 2, counts).c == 20
    assert step_scale(L.sum, O.global_mean, 2, counts).c == 1
    assert all(step_scale(L.sum, op, 2, counts).exact for op in O)
    # a mean of means has no exact c
    assert not step_scale(L.mean, O.mean, 2, counts).exact
    assert not step_scale(L.mean, O.sum, 2, counts).exact
    assert step_scale(L.mean, O.mean, 2, [20, 20]).exact


def test_micro_mean_is_exact_only_with_every_micro_batch_equal():
    mm = L.micro_mean
    # one rank sees every micro-batch itself
    assert plan_step(mm, O.mean, 1, 6, micro_items=[3, 3]).exact
    assert not plan_step(mm, O.mean, 1, 5, micro_items=[3, 2]).exact
    # several ranks: told, or not known before the reduction (learned with the counts)
    assert plan_step(mm, O.mean, 2, 6, [6, 6], micro_items=[3, 3], micro_equal=True).exact
    assert not plan_step(mm, O.mean, 2, 6, [6, 6], micro_items=[3, 3], micro_equal=False).exact
    assert not plan_step(mm, O.mean, 2, 6, [6, 6], micro_items=[3, 3]).exact  # not known
    assert plan_step(mm, O.mean, 2, 6, micro_items=[3, 3]).equal_counts is None
    # one micro-batch: equal ranks are enough, as for mean
    assert plan_step(mm, O.mean, 2, 6, [6, 6]).exact
    assert not plan_step(mm, O.mean, 2, 6, [6, 5]).exact


def test_refused_combinations():
    assert check_combination(L.mean, O.global_mean, ReduceImpl.hook) is not None
    assert check_combination(L.sum, O.sum, ReduceImpl.builtin) is not None
    assert check_combination(L.sum, O.mean, ReduceImpl.builtin) is None
    assert check_combination(L.sum, O.global_mean, ReduceImpl.manual) is None


def test_divisors_and_loss_scale():
    assert divisor(O.sum, 4, 100) == 1
    assert divisor(O.mean, 4, 100) == 4
    assert divisor(O.global_mean, 4, 100) == 100
    assert loss_scale(L.sum, 17) == 1
    assert loss_scale(L.mean, 16) == 1 / 16
    assert loss_scale(L.mean, 0) == 0
