"""HSDP: FSDP2 on a 2-D mesh (replicate R, shard S; R·S = W ranks), with exactly one division.

FSDP2 reduces an HSDP gradient in two collectives: a reduce-scatter over the S ranks of a shard
group, then an all-reduce of each shard over the R replicas. Its own division is by R·S, split
between them; a second division left on top of the layer's (torchtitan divided by the
data-parallel size twice, torchtitan#2318) or a shard group of one skipping it
(pytorch#167178) gives gradients off by a constant factor. Here both collectives SUM (FSDP's
own division is set to 1) and the layer's divisor d (``reduction.DIVISORS``, over all W
ranks) is split as the ``predivide`` setting says, d = before·after:

* ``before``: in the layer's reduce-scatter (S >= 2). With S = 1 FSDP runs no reduce-scatter, so
  ``before`` is folded into the loss scale instead (gradients are linear in the loss): the
  values that enter the all-reduce are divided by it all the same. Where d is an item count
  still in flight when the loss scale is asked for, there is nothing to fold: all of d is taken
  after the all-reduce.
* ``after``: in FSDP's all-reduce hook, which runs on the all-reduced shard (R = 1 included: a
  group of one).

Torch only, like the rest of the layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddp_reduce.layer import reduction


def hsdp_shape(module: nn.Module) -> tuple[int, int] | None:
    """(R, S) of a module sharded by ``fully_shard`` on a 2-D (replicate, shard) mesh, or None
    (DDP, or FSDP on one dimension).

    Only the mesh's sizes are read, never its process groups: with torch 2.13, a mesh made in
    a later process group of the same process, equal in shape and names to an earlier one,
    can come back on the parameters as the earlier mesh, whose groups no longer exist.
    """
    for p in module.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            return (mesh.size(0), mesh.size(1)) if mesh.ndim == 2 else None
    return None


class HSDPReduction:
    """The layer's division around FSDP2's two HSDP collectives (see the module's doc)."""

    def __init__(self, shape: tuple[int, int], predivide: str | float):
        self.replicas, self.shards = shape
        self.predivide = predivide
        self.after: Any = None  # this step's division after the all-reduce (None: from d)
        self.pending_ref: torch.Tensor | None = None  # the audit's float64 shard, in between

    def plan(self, divisor: float | None) -> float:
        """Split this step's divisor (None: an item count still in flight); returns the factor
        folded into the loss scale (1/before with S = 1, else 1)."""
        if divisor is None:
            self.after = None
            return 1.0
        before, self.after = reduction.division_split(divisor, self.predivide)
        return 1.0 / before if self.shards == 1 else 1.0

    def reference_shard(
        self, reference: torch.Tensor, shard_group: Any, world_group: Any = None
    ) -> torch.Tensor:
        """The audit's float64 reduction of a logged step, this rank's shard of it: summed over
        all W ranks in one all-reduce (the two collectives' sum, without their groups)."""
        dist.all_reduce(reference, group=world_group)
        index = dist.get_group_rank(shard_group, dist.get_rank())
        return reference.view(self.shards, -1)[index].clone()

    def finish(self, reduced: torch.Tensor, divisor: Any, step: Any) -> None:
        """On one all-reduced shard: the division left for after (``divisor``: the step's d,
        once known), and the audit of a logged step (the float64 shard the reduce-scatter left,
        summed over every rank)."""
        after = self.after
        if after is None:  # d was in flight at the loss scale: nothing was folded (S = 1)
            after = (
                divisor
                if self.shards == 1
                else reduction.division_split(divisor, self.predivide)[1]
            )
        if isinstance(after, torch.Tensor) or after != 1:
            reduced.div_(after)
        ref, self.pending_ref = self.pending_ref, None
        if ref is not None:
            ref.div_(after)
            step.add_audit(reduced, ref)
