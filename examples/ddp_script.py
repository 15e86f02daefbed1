"""A plain torchrun DDP script on its own model and data, with the reduction made explicit.

    torchrun --nproc-per-node 2 examples/ddp_script.py --loss sum --op global_mean
    python examples/ddp_script.py --batch-size 32          # one process, the same run

The lines that concern ddp_reduce are marked ``# <-``.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import ddp_reduce


class Net(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))

    def forward(self, x):
        return self.layers(x)


def make_data(n: int = 512, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loss", default="mean", choices=["sum", "mean"])
    p.add_argument("--op", default="mean", choices=["sum", "mean", "global_mean"])
    p.add_argument("--batch-size", type=int, default=16, help="per rank per micro-batch")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--out", help="save the final weights here (rank 0)")
    a = p.parse_args()

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:  # one process, no launcher
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank and world size
    model = DDP(Net())
    reducer = ddp_reduce.attach(model, loss=a.loss, op=a.op)  # <-
    optimizer = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    data = make_data()
    sampler = ddp_reduce.rank_batch_sampler(  # <- step t's global batch from (seed, t) alone
        len(data), world * a.batch_size * a.accum, rank=rank, world_size=world,
        accum_steps=a.accum, steps=a.steps,
    )  # fmt: skip
    batches = iter(DataLoader(data, batch_sampler=sampler))

    for step in range(1, a.steps + 1):
        micro = [next(batches) for _ in range(a.accum)]
        scale = reducer.loss_scale(sum(len(y) for _, y in micro))  # <- items of the whole step
        total = torch.zeros(())
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            with reducer.micro_batch(last):  # <- gradients reduced on the last micro-batch only
                loss = F.cross_entropy(model(x), y, reduction="sum")  # a sum over items
                (loss * scale).backward()  # <-
            total += loss.detach()
        report = reducer.last_step  # <- c, exact, global_items
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == a.steps:
            dist.all_reduce(total)  # the loss of the global batch, not rank 0's own
            if rank == 0:
                print(f"step {step}: c = {report.c:g} (exact: {report.exact}), "
                      f"{report.global_items} items, loss/item "
                      f"{total.item() / report.global_items:.4f}")  # fmt: skip

    if rank == 0 and a.out:
        torch.save(model.module.state_dict(), a.out)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # PyTorch (2.13 here) can abort a rank at interpreter exit even after a clean
    # destroy_process_group ("terminate called without an active exception", SIGABRT): its
    # collective threads are torn down during finalization. This script, with or without the
    # reduction layer, did so in 1 to 2 of 30 runs here. Ending the process at once skips
    # that teardown; flush or close anything of yours (files, loggers) before it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
