"""An ordinary FSDP2 (``fully_shard``) training script on CPU (gloo): the audit's sharded test
subject; it knows nothing of ddp_reduce. Each rank's optimizer sees only its shard of the gradient.

    torchrun --nproc-per-node 2 examples/audit/fsdp2_train.py --per-device-batch 4 --grad-accum 2

Correct as it stands (FSDP2 averages over ranks, each micro-batch's mean loss is divided by A).
``--loss global`` is the planted bug (torchtitan's, 2025): the summed loss divided by the step's
global item count, and FSDP2 still averaging over ranks on top: 1/W of the mean gradient.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

ITEMS = 256


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss", choices=["mean", "global"], default="mean")
    a = p.parse_args()

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    b, accum = a.per_device_batch, a.grad_accum
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ITEMS, 8, generator=g)
    y = (x[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    # 37 rows: shards of unequal size at W=2
    model = nn.Sequential(nn.Linear(8, 37), nn.Tanh(), nn.Linear(37, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = world * b * accum
    order = torch.randperm(ITEMS, generator=torch.Generator().manual_seed(1))
    for step in range(a.steps):
        batch = order[(step * n) % ITEMS :][:n]
        for m in range(accum):
            rows = batch[(m * world + rank) * b :][:b]
            model.set_requires_gradient_sync(m == accum - 1)
            if a.loss == "mean":
                loss = F.cross_entropy(model(x[rows]), y[rows]) / accum
            else:  # the global count: n items over all ranks and micro-batches
                loss = F.cross_entropy(model(x[rows]), y[rows], reduction="sum") / n
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
