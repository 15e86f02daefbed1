"""A Hugging Face Accelerate training loop with gradient accumulation, as its documentation
writes it (``accelerator.accumulate``, ``accelerator.backward``); it knows nothing of ddp_reduce.

    torchrun --nproc-per-node 2 examples/audit/accelerate_loop.py --grad-accum 2
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=a.grad_accum)
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=a.per_device_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    model, opt, loader = accelerator.prepare(model, opt, loader)
    steps = 0
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        steps += accelerator.sync_gradients
        if steps >= a.steps:
            break
    accelerator.end_training()


if __name__ == "__main__":
    main()
