"""Sum or mean in low precision: the same c in bf16 and fp16, an overflowing fp16 reduction
reported as such, pre-division that avoids it, the ring simulation against a real group, and a
low-precision model (autocast, a loss scaler) trained end to end."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ddp_reduce.analysis.studies.precision import reduce_simulated, ring_sum
from ddp_reduce.config import DistConfig, load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.distributed import distributed
from ddp_reduce.models import build_model, loss_sums
from tests.helpers import (
    assert_close,
    config_dict,
    first_step,
    reference_gradient,
    spawn,
    train_runs,
)

W = 2
TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}  # relative, per comm dtype
PAIRS = [("mean", "mean", 1), ("mean", "sum", W), ("sum", "mean", 16), ("sum", "sum", 32)]


CASES = [
    (dt, prec, lo, op, c) for dt in ("bf16", "fp16") for prec in ("fp32",) for lo, op, c in PAIRS
]
CASES += [("fp32", prec, lo, op, c) for prec in ("bf16", "fp16") for lo, op, c in PAIRS[::3]]


def _case_cfg(dtype: str, precision: str, loss: str, op: str) -> dict:
    return config_dict(
        "data.batch_size=16",
        "train.loss_scale_init=1024",  # a summed loss's gradient, c x a mean's, stays in fp16
        f"reduce.dtype={dtype}",
        f"train.precision={precision}",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
    )


@pytest.fixture(scope="module")
def low(tmp_path_factory):
    cfgs = [_case_cfg(*case[:4]) for case in CASES]
    return cfgs, spawn(first_step, W, tmp_path_factory.mktemp("prec"), cfgs)


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c[:4])) for c in CASES])
def test_low_precision_reductions_and_models_keep_c(low, i):
    """bf16 and fp16 communication, and bf16/fp16 autocast (fp16 with its loss scaler, whose
    unscale leaves c·G): the same c as fp32, the gradient c·G to the dtype's tolerance."""
    cfgs, ranks = low
    dtype, precision, _, _, c = CASES[i]
    g, _ = reference_gradient(cfgs[i], W)
    tol = max(TOLERANCE[dtype], TOLERANCE[precision] * 5)
    for r in ranks:
        got = r[i]
        assert got["c"] == c
        assert_close(got["grad"], c * g, tol)
        if dtype != "fp32":  # measured on the logged step against a float64 reduction
            assert got["route"] == "hook" and got["rel_error"] < TOLERANCE[dtype]


# -- an fp16 sum that overflows ---------------------------------------------------------------

OVERFLOW = (
    "data=linear",
    "model=linear",
    "data.dim=1",
    "data.noise_std=0",
    "data.batch_size=8",
    "reduce.loss=sum",
    "reduce.op=mean",
    "reduce.dtype=fp16",
    "optim.lr=1e-12",
    "optim.momentum=0",
    "train.steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.blowup_factor=null",
    "noise.enabled=false",
)


def _summed_max(eig: float) -> float:
    """max |Σ over ranks of their own gradients| at step 1, for inputs of variance ``eig``
    (in one process, float64): what an fp16 sum over ranks must hold."""
    cfg = load_config(config_dict(*OVERFLOW, f"data.eig_max={eig}", f"data.eig_min={eig}"))
    data = load_dataset(cfg.data)
    sampler = GlobalBatchSampler(len(data.train), W * 8, cfg.seed, cfg.data.last_batch)
    total = None
    for share in sampler.rank_shares(0, W):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data).double()
        batch = data.train.batch(share)
        loss_sums(data.task, model(batch.x.double()), batch)[0].backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total = g if total is None else total + g
    return total.abs().max().item()


@pytest.fixture(scope="module")
def overflow_scale():
    """Inputs scaled so that the ranks' gradients sum to ~78000: past fp16's 65504, while
    divided by sqrt(2) first they stay below it (78000/√2 = 55154)."""
    eig = 1e4
    for _ in range(4):
        eig *= 78000 / _summed_max(eig)
    assert 74000 < _summed_max(eig) < 82000
    return eig


def test_an_fp16_sum_that_overflows_is_reported_and_sqrt_predivision_avoids_it(
    tmp_path, overflow_scale
):
    scale = (f"data.eig_max={overflow_scale}", f"data.eig_min={overflow_scale}")
    jobs = [
        (config_dict(*OVERFLOW, *scale, f"reduce.predivide={pre}"), str(tmp_path / pre))
        for pre in ("none", "sqrt")
    ]
    jobs.append((config_dict(*OVERFLOW, *scale, "reduce.dtype=fp32"), str(tmp_path / "fp32")))
    plain, split, reference = spawn(train_runs, W, tmp_path, jobs)[0]
    assert plain["status"] == "diverged" and plain["reduce_overflow_at_step"] == 1
    assert "all-reduce overflowed" in plain["diverged_why"] and "loss" not in plain["diverged_why"]
    assert split["status"] == "completed" and split["reduce_overflow_at_step"] is None
    assert split["reduce_comm_rel_error_max"] < TOLERANCE["fp16"]
    assert reference["status"] == "completed"
    assert split["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-3)


# -- the ring simulation against a real group -------------------------------------------------


def _ring_job(init: str, dtype_name: str, local: torch.Tensor) -> torch.Tensor:
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        x = local[ctx.rank].to(getattr(torch, dtype_name))
        dist.all_reduce(x)
        return x


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_ring_simulation_is_gloo_bit_for_bit(tmp_path, dtype, world):
    # 4810 elements: ceil(n/W) is odd at W = 4 and 602 at W = 8, so where gloo cuts its chunks
    # (at even counts) shows; each element a sum of magnitudes from 1e-4 to 1e4, whose rounding
    # depends on the order
    g = torch.Generator().manual_seed(0)
    local = torch.randn(world, 4810, generator=g, dtype=torch.float64)
    local *= 10 ** (8 * torch.rand(world, 4810, generator=g, dtype=torch.float64) - 4)
    got = spawn(_ring_job, world, tmp_path, dtype, local)[0]
    simulated = ring_sum(local.to(getattr(torch, dtype)))
    assert torch.equal(got, simulated), int((got != simulated).sum())
    # ... and it is the order that matters: a plain left-to-right sum differs somewhere
    plain = local.to(getattr(torch, dtype))
    assert not torch.equal(got, sum(plain))


def test_predivision_keeps_c_in_the_simulation():
    local = torch.full((8, 3), 30000.0, dtype=torch.float64)
    for pre in ("none", "sqrt", "full", 2.0):
        out = reduce_simulated(local, torch.float32, 8.0, pre)
        assert torch.allclose(out, torch.full((3,), 30000.0, dtype=torch.float64))
    assert not torch.isfinite(reduce_simulated(local, torch.float16, 8.0, "none")).all()
    assert torch.isfinite(reduce_simulated(local, torch.float16, 8.0, "full")).all()


def test_a_low_precision_model_trains_end_to_end(tmp_path):
    jobs = [
        (
            config_dict("train.steps=40", "train.eval_every=0", f"train.precision={p}", *extra),
            str(tmp_path / f"{p}-{i}"),
        )
        for p in ("bf16", "fp16")
        for i, extra in enumerate([(), ("reduce.loss=sum", "reduce.op=sum", "optim.lr=0.003125")])
    ]
    summaries = spawn(train_runs, W, tmp_path, jobs)[0]
    for s in summaries:
        assert s["status"] == "completed" and s["final_train_loss"] < s["initial_train_loss"]
    assert all(s["amp_skipped_steps"] is not None for s in summaries if s["precision"] == "fp16")
