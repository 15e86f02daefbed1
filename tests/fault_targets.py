"""Your own parts that misbehave, for the fault tests (named as ``tests.fault_targets.X``)."""

from __future__ import annotations

import os

import torch.nn.functional as F
from userpkg.data import Blobs


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class RaisesOnRank1:
    """Cross-entropy, except on rank 1 of a process group, where it raises once training has
    begun (its first call is the check of a batch of two, before the first step)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, output, target):
        self.calls += 1
        if _rank() == 1 and os.environ.get("WORLD_SIZE") == "2" and self.calls > 1:
            raise ValueError("a loss of yours that fails on rank 1")
        return F.cross_entropy(output, target, reduction="sum"), len(target)


def uneven_splits():
    """A training set one sample longer on rank 1 than on rank 0."""
    return Blobs(256 + _rank(), 12, 4, seed=0), Blobs(64, 12, 4, seed=1)


class CountedLoss:
    """Cross-entropy whose count(target) is ``factor * len(target) + offset`` items."""

    def __init__(self, factor: float = 1.0, offset: float = 0.0):
        self.factor, self.offset = factor, offset

    def count(self, target):
        return self.factor * len(target) + self.offset

    def __call__(self, output, target):
        return F.cross_entropy(output, target, reduction="sum"), self.count(target)
