"""A step that is not logged reads nothing from the device; one found diverged late is undone.

The reads are counted where every host read of a tensor's value goes through: ``item``,
``tolist``, ``numpy`` and the conversions to bool, float and int, patched on ``torch.Tensor`` for
the steps under test (on CUDA each of these waits for the device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from ddp_reduce.distributed import distributed
from ddp_reduce.trainer import Trainer
from tests.helpers import config, spawn

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def counted_reads() -> Iterator[list[str]]:
    """Every read of a tensor's value on the host while inside, by the method's name."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            seen.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


SMALL = ("model=mlp", "model.hidden=[16]", "data.batch_size=8", "train.eval_every=0")


def _reads_per_step(init: str, overrides: tuple[str, ...]) -> dict[str, list[str]]:
    cfg = config(*SMALL, *overrides)
    with distributed(cfg.dist, init) as ctx:
        trainer = Trainer(cfg, ctx)
        trainer.train_step(log=True)  # the route is chosen and the hook registered
        with counted_reads() as unlogged:
            for _ in range(3):
                trainer.train_step(settle=False)
        with counted_reads() as logged:
            trainer.train_step(log=True)
        trainer.close()
    return {"unlogged": unlogged, "logged": logged}


def test_unlogged_steps_read_nothing_from_the_device(tmp_path):
    # the defaults (noise estimate on, fed on logged steps); clipping, accumulation, and the
    # noise estimate fed on every step
    for overrides in [(), ("optim.clip_norm=1.0", "train.accum_steps=2", "noise.steps=every")]:
        for rank in spawn(_reads_per_step, 2, tmp_path, overrides):
            assert rank["unlogged"] == [], overrides
            assert rank["logged"], "the counter sees the logged step's reads"


def _diverged_late(init: str) -> dict:
    """Step 3 poisoned on rank 1, steps 1-5 taken unsettled, the verdict read at step 5; and a
    run that stops after step 2, for the weights."""
    # every step feeds the noise estimate, so that the unsettled steps' part of it is undone too
    cfg = config(
        *SMALL, "fault.nan_at_step=3", "fault.nan_rank=1", "optim=adam", "noise.steps=every"
    )
    with distributed(cfg.dist, init) as ctx:
        trainer = Trainer(cfg, ctx)
        trainer.train_step(log=True)
        for _ in range(3):
            trainer.train_step(settle=False)
        outcome = trainer.train_step(log=True)
        late = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        noise = trainer.noise()
        step = trainer.step
        trainer.close()
        reference = Trainer(cfg, ctx)
        for _ in range(2):
            reference.train_step(log=True)
        weights = reference.model.state_dict()
        same = all(torch.equal(late[k], weights[k]) for k in weights)
        reference_noise = reference.noise()
        reference.close()
    return {
        "diverged_at": outcome.diverged_at,
        "why": outcome.why,
        "step": step,
        "same_weights": same,
        "noise": (noise.grad_sq, noise.trace_sigma),
        "reference_noise": (reference_noise.grad_sq, reference_noise.trace_sigma),
    }


def test_a_divergence_read_late_is_named_exactly_and_its_update_undone(tmp_path):
    for rank in spawn(_diverged_late, 2, tmp_path):
        assert (rank["diverged_at"], rank["step"]) == (3, 2)
        assert "loss" in rank["why"]
        assert rank["same_weights"], "the weights are those after step 2, bit for bit"
        assert rank["noise"] == rank["reference_noise"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unlogged_steps_do_not_synchronize_on_cuda():
    cfg = config(*SMALL, "dist.device=cuda", "dist.nproc=1", "train.accum_steps=2")
    with distributed(cfg.dist) as ctx:
        trainer = Trainer(cfg, ctx)
        trainer.train_step(log=True)
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
        try:
            for _ in range(3):
                trainer.train_step(settle=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        trainer.close()
