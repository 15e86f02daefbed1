"""The global batch of step t depends on (seed, t) only; ranks take disjoint slices of it."""

import pytest
import torch

from ddp_reduce.config import LastBatch
from ddp_reduce.data import GlobalBatchSampler


def _all_items(sampler, step, world, accum):
    parts = [
        idx for rank in range(world) for idx in sampler.micro_batches(step, rank, world, accum)
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (1, 4), (4, 2), (8, 1)])
def test_same_global_batch_for_every_layout(world, accum):
    n_items, n = 1000, 64
    s = GlobalBatchSampler(n_items, n, seed=3, last_batch=LastBatch.drop)
    ref = GlobalBatchSampler(n_items, n, seed=3, last_batch=LastBatch.drop)
    for step in (0, 5, 15, 16, 40):
        items = _all_items(s, step, world, accum)
        # the same items in the same order: rank r holds [r·b·A, (r+1)·b·A)
        assert torch.equal(items, ref.global_batch(step))
        sizes = {len(idx) for r in range(world) for idx in s.micro_batches(step, r, world, accum)}
        assert sizes == {n // (world * accum)}


def test_an_epoch_visits_items_without_duplicates():
    s = GlobalBatchSampler(1000, 64, seed=0, last_batch=LastBatch.drop)
    assert s.steps_per_epoch == 15
    epoch = torch.cat([s.global_batch(t) for t in range(15)])
    assert len(epoch) == len(set(epoch.tolist())) == 960
    other = torch.cat([s.global_batch(t) for t in range(15, 30)])
    assert not torch.equal(epoch, other)  # a new permutation each epoch


def test_ragged_last_batch_is_kept_without_padding():
    s = GlobalBatchSampler(1000, 64, seed=0, last_batch=LastBatch.keep)
    assert s.steps_per_epoch == 16
    last = s.global_batch(15)
    assert len(last) == 1000 - 960
    epoch = torch.cat([s.global_batch(t) for t in range(16)])
    assert sorted(epoch.tolist()) == list(range(1000))  # every item once, none twice
    parts = [len(i) for r in range(3) for i in s.micro_batches(15, r, 3, 2)]
    assert sum(parts) == 40 and max(parts) - min(parts) <= 1


def test_seed_changes_the_order():
    a = GlobalBatchSampler(1000, 64, seed=0, last_batch=LastBatch.drop).global_batch(0)
    b = GlobalBatchSampler(1000, 64, seed=1, last_batch=LastBatch.drop).global_batch(0)
    assert not torch.equal(a, b)
