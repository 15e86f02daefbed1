"""CUDA and NCCL paths. Skipped where there is no GPU; run by scripts/gpu_check.sh where there is.

One GPU allows one NCCL rank, so these check the CUDA side of the reduction layer (the hook,
DDP's own path where the arithmetic is DDP's, the scalars riding in the buckets, the comm dtype,
FSDP's own divide factor, autocast and the loss scaler, batch norm, the launchers) against CPU
references.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp_reduce.config import load_config
from ddp_reduce.distributed import distributed
from ddp_reduce.run.launch import rank_main
from ddp_reduce.trainer import Trainer
from tests.helpers import (
    assert_close,
    config,
    config_dict,
    ddp_reduce,
    reference_gradient,
    torchrun,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

B = 32
PAIRS = [
    ("mean", "mean", 1),
    ("mean", "sum", 1),
    ("sum", "mean", B),
    ("sum", "sum", B),
    ("sum", "global_mean", 1),
]


VARIANTS = {
    # name: (overrides, tolerance, expected route)
    "hook": (("noise.enabled=true", "reduce.predivide=sqrt"), 1e-5, "hook"),  # W=1: no noise
    "ddp own path": (("noise.enabled=false",), 1e-5, "ddp_builtin"),
    "bf16 comm": (("noise.enabled=false", "reduce.dtype=bf16"), 1e-2, "hook"),
    "fsdp": (("noise.enabled=false", "dist.strategy=fsdp"), 1e-5, "fsdp_native"),
    "bf16 autocast": (("noise.enabled=false", "train.precision=bf16"), 2e-2, "ddp_builtin"),
    "fp16 autocast": (
        ("noise.enabled=false", "train.precision=fp16", "train.loss_scale_init=256"),
        1e-2,
        "ddp_builtin",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss,op,c", PAIRS)
def test_received_gradient_on_cuda_is_c_times_G(loss, op, c, variant):
    overrides, tol, route = VARIANTS[variant]
    cfg = config_dict(
        "dist.device=cuda",
        f"data.batch_size={B}",
        "train.accum_steps=1",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
        *overrides,
    )
    with distributed(load_config(cfg).dist) as ctx:
        assert ctx.backend == "nccl" and ctx.device.type == "cuda"
        trainer = Trainer(load_config(cfg), ctx)
        out = trainer.forward_backward(1, log=True)
        grads = [
            p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for p in trainer.params
        ]
        grad = torch.cat([g.flatten().float() for g in grads]).cpu()
        trainer.close()
    assert out.report.c == c and out.report.route.name == route
    g, _ = reference_gradient(cfg, 1)  # on the CPU, in one process
    assert_close(grad, c * g, tol)


def test_cuda_training_matches_cpu_training(tmp_path):
    common = ("train.steps=30", "train.eval_every=0", "model.batch_norm=true", "model.sync_bn=true")
    cpu = rank_main(config(*common, "dist.device=cpu"), str(tmp_path / "cpu"))
    gpu = rank_main(config(*common, "dist.device=cuda"), str(tmp_path / "gpu"))
    assert gpu.device == "cuda:0" and gpu.backend == "nccl"
    a, b = torch.load(tmp_path / "cpu" / "model.pt"), torch.load(tmp_path / "gpu" / "model.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert gpu.final_train_loss == pytest.approx(cpu.final_train_loss, rel=1e-4)


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
    assert (summary.status, summary.backend, summary.device) == (
        "completed",
        "nccl",
        "cuda:0",
    )
    assert summary.grad_scale == 1 and summary.grad_scale_exact


@pytest.mark.parametrize(
    "overrides",
    [
        ("dist.strategy=fsdp",),
        ("train.precision=bf16",),
        ("train.precision=fp16",),
        ("reduce.dtype=bf16",),
    ],
)
def test_cuda_variants_train_end_to_end(tmp_path, overrides):
    summary = rank_main(
        config("dist.device=cuda", "train.steps=40", "train.eval_every=0", *overrides),
        str(tmp_path / "run"),
    )
    assert summary.status == "completed" and summary.device == "cuda:0"
    assert summary.final_train_loss < summary.initial_train_loss
