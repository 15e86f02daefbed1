"""CUDA and NCCL paths. Skipped where there is no GPU; run by scripts/gpu_check.sh where there is.

One GPU allows one NCCL rank, so these check the CUDA side of the reduction layer (the hook's
AVG path, the scalars riding in the buckets, batch norm, the launchers) against CPU references.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp_reduce.config import load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.distributed import distributed
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.run.launch import rank_main
from ddp_reduce.trainer import Trainer
from tests.helpers import config_dict, ddp_reduce, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

B = 32
PAIRS = [
    ("mean", "mean", 1),
    ("mean", "sum", 1),
    ("sum", "mean", B),
    ("sum", "sum", B),
    ("sum", "global_mean", 1),
]


def _reference(cfg_dict: dict) -> torch.Tensor:
    """G on the CPU, in one process, over the global batch of step 1."""
    cfg = load_config(cfg_dict)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    idx = GlobalBatchSampler(len(data.train), B, cfg.seed, cfg.data.last_batch).global_batch(0)
    batch = data.train.batch(idx)
    loss, _ = loss_sums(data.task, model(batch.x), batch)
    (loss / data.train.items(idx)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("noise", ["true", "false"])
@pytest.mark.parametrize("loss,op,c", PAIRS)
def test_received_gradient_on_cuda_is_c_times_G(loss, op, c, noise):
    cfg = config_dict(
        "dist.device=cuda",
        f"data.batch_size={B}",
        "train.accum_steps=1",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
        f"noise.enabled={noise}",
    )
    with distributed(load_config(cfg).dist) as ctx:
        assert ctx.backend == "nccl" and ctx.device.type == "cuda"
        trainer = Trainer(load_config(cfg), ctx)
        out = trainer.forward_backward(1, log=True)
        grad = torch.cat([p.grad.flatten() for p in trainer.params]).cpu()
        trainer.close()
    assert out.report.c == c
    g = _reference(cfg)
    err = ((grad - c * g).norm() / (c * g).norm()).item()
    assert err < 1e-5, err


def test_cuda_training_matches_cpu_training(tmp_path):
    common = ("train.steps=30", "train.eval_every=0", "model.batch_norm=true", "model.sync_bn=true")
    cpu = rank_main(config_dict(*common, "dist.device=cpu"), str(tmp_path / "cpu"))
    gpu = rank_main(config_dict(*common, "dist.device=cuda"), str(tmp_path / "gpu"))
    assert gpu["device"] == "cuda:0" and gpu["backend"] == "nccl"
    a, b = torch.load(tmp_path / "cpu" / "model.pt"), torch.load(tmp_path / "gpu" / "model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert gpu["final_train_loss"] == pytest.approx(cpu["final_train_loss"], rel=1e-4)


@pytest.mark.parametrize("launcher", ["ddp-reduce", "torchrun"])
def test_launchers_on_cuda(tmp_path, launcher):
    args = (
        "dist.device=cuda",
        "train.steps=20",
        "data=sequences",
        "model=seq",
        "reduce.loss=sum",
        "reduce.op=global_mean",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    proc = ddp_reduce("dist.nproc=1", *args) if launcher == "ddp-reduce" else torchrun(1, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["backend"], summary["device"]) == (
        "completed",
        "nccl",
        "cuda:0",
    )
    assert summary["grad_scale"] == 1 and summary["grad_scale_exact"]
