"""An ordinary DDP training script, as people write them, with the ways the sum/mean factor goes
wrong as switches: the audit's test subject (it knows nothing of ddp_reduce).

    torchrun --nproc-per-node 2 examples/audit/ddp_train.py --per-device-batch 4 --grad-accum 2
    ddp-reduce audit --global-batch 16 -- examples/audit/ddp_train.py \\
        --per-device-batch {b} --grad-accum {A} --loss mean --reduce sum     # scaled, ∝ W

Correct: ``--loss mean --reduce mean`` (equal counts) and ``--loss global --reduce sum`` (any
counts). Planted bugs: ``--loss mean --reduce sum`` (sums across ranks), ``--loss global --reduce
mean`` (a mean over ranks on top of a global count), ``--divide-accum-twice``, and ``--data
ragged --loss mean`` (a mean of per-micro-batch means over unequal token counts).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

VOCAB, ITEMS = 16, 256


def sum_hook(state, bucket):
    """An all-reduce that sums and never divides by the world size."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_data(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        x = torch.randn(ITEMS, 8, generator=g)
        return x, (x[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    lengths = torch.randint(2, 13, (ITEMS,), generator=g)
    return [torch.randint(0, VOCAB, (int(n),), generator=g) for n in lengths], None


def micro_batch(data, kind: str, rows: torch.Tensor):
    """(model input, targets, item count): tokens padded with -100 targets in the ragged case."""
    if kind == "dense":
        return data[0][rows], data[1][rows], len(rows)
    seqs = [data[0][i] for i in rows.tolist()]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, 1
    targets = torch.where(mask[:, 1:] == 1, tokens[:, 1:], -100)
    return (tokens, mask), targets, int((targets != -100).sum())


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(VOCAB, 16) if kind == "ragged" else nn.Linear(8, 16)
        self.head = nn.Linear(16, VOCAB if kind == "ragged" else 4)

    def forward(self, x, attention_mask=None):
        h = torch.tanh(self.embed(x))
        out = self.head(h)
        return out[:, :-1] if self.kind == "ragged" else out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", choices=["dense", "ragged"], default="dense")
    p.add_argument(
        "--loss",
        choices=["mean", "global"],
        default="mean",
        help="mean: each micro-batch's mean / A; global: sum / the step's global count",
    )
    p.add_argument(
        "--reduce",
        choices=["mean", "sum"],
        default="mean",
        help="DDP's all-reduce: its default mean, or a hook that sums",
    )
    p.add_argument("--divide-accum-twice", action="store_true")
    p.add_argument("--shuffle-by-rank", action="store_true", help="a sampler that depends on W")
    p.add_argument("--crash-at-world-size", type=int, help="fail at this W (a broken layout)")
    a = p.parse_args()  # fmt: skip

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == a.crash_at_world_size:
        raise RuntimeError(f"no GPU interconnect for {world} ranks")
    b, accum = a.per_device_batch, a.grad_accum
    torch.manual_seed(0)
    model = DDP(Net(a.data))
    if a.reduce == "sum":
        model.register_comm_hook(None, sum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_data(a.data)
    n = world * b * accum
    seed = 1 + (world if a.shuffle_by_rank else 0)
    order = torch.randperm(ITEMS, generator=torch.Generator().manual_seed(seed))
    for step in range(a.steps):
        batch = order[(step * n) % ITEMS :][:n]
        micro = [micro_batch(data, a.data, batch[(m * world + rank) * b :][:b])
                 for m in range(accum)]  # fmt: skip
        count = torch.tensor(float(sum(k for _, _, k in micro)))
        dist.all_reduce(count)  # the items of the whole step, every rank and micro-batch
        for m, (x, y, _) in enumerate(micro):
            ctx = model.no_sync() if m < accum - 1 else torch.enable_grad()
            with ctx:
                if isinstance(x, tuple):
                    out = model(x[0], attention_mask=x[1])
                else:
                    out = model(x)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                       ignore_index=-100, reduction="sum")  # fmt: skip
                if a.loss == "mean":
                    loss = loss / int((y != -100).sum()) / accum
                else:
                    loss = loss / count
                loss.backward()
        if a.divide_accum_twice:
            for q in model.parameters():
                q.grad /= accum
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
