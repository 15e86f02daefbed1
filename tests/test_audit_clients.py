"""The audit on real clients, unmodified, as their users write them (the ``clients`` extra):
the Hugging Face Trainer on a tiny random GPT-2 with ragged byte sequences, an Accelerate loop
with gradient accumulation, a Lightning Trainer with accumulate_grad_batches."""

from __future__ import annotations

import pytest

from ddp_reduce.auditing.runner import audit
from tests.helpers import REPO

EXAMPLES = REPO / "examples" / "audit"
LAYOUTS = ["1x2", "2x1"]  # W and A both change: a factor of either shows


def _hf(*flags: str) -> list[str]:
    return [str(EXAMPLES / "hf_trainer.py"), "--per-device-batch", "{b}", "--grad-accum", "{A}",
            *flags]  # fmt: skip


def test_hf_trainer_is_layout_invariant_yet_not_the_per_token_mean():
    """Transformers 5.24 divides the summed loss by a token count that includes each sequence's
    first label, which the shifted loss never scores: c = T/(T + n) for T scored tokens and n
    sequences, the same at every layout (tokens averaged across devices)."""
    pytest.importorskip("transformers")
    result = audit(_hf(), global_batch=8, layouts=LAYOUTS, reference="causal-lm")
    assert result.verdict == "invariant", result.diagnosis
    c = result.layouts[0].c[0]
    scored = 8 / (1 / c - 1)  # c = T/(T + 8): T, the scored tokens, is a whole number
    assert c < 0.99 and scored == pytest.approx(round(scored), abs=1e-3), c
    assert all(r.c[0] == pytest.approx(c, rel=1e-6) for r in result.layouts)
    assert all(r.residual[0] < 1e-5 for r in result.layouts)
    assert result.layouts[0].clipped == [True]  # max_grad_norm=1.0 bit; the pre-clip was kept
    assert "clipping bit" in result.diagnosis and "neither the per-item mean" in result.diagnosis


def test_hf_trainer_without_token_averaging_across_devices_differs():
    """Each rank divides by its own token count: items are weighted unequally once W > 1."""
    pytest.importorskip("transformers")
    result = audit(_hf("--average-tokens-across-devices", "false"), global_batch=8,
                   layouts=LAYOUTS, reference="causal-lm")  # fmt: skip
    assert result.verdict == "differs", result.diagnosis
    one_rank, two_ranks = result.layouts
    assert one_rank.residual[0] < 1e-5 < 1e-3 < two_ranks.residual[0]
    assert "between 1x2 and 2x1" in result.diagnosis


def test_hf_trainer_with_the_first_label_masked_gives_the_per_token_mean():
    pytest.importorskip("transformers")
    result = audit(_hf("--mask-first-label"), global_batch=8, layouts=LAYOUTS,
                   reference="causal-lm")  # fmt: skip
    assert result.verdict == "invariant", result.diagnosis
    assert all(r.c[0] == pytest.approx(1.0, abs=1e-5) for r in result.layouts)
    assert "the optimizer receives the per-item mean gradient" in result.diagnosis


def test_accelerate_loop_with_gradient_accumulation_is_invariant():
    pytest.importorskip("accelerate")
    cmd = [str(EXAMPLES / "accelerate_loop.py"), "--per-device-batch", "{b}", "--grad-accum", "{A}"]
    result = audit(cmd, global_batch=16, layouts=LAYOUTS)
    assert result.verdict == "invariant", result.diagnosis


def test_lightning_trainer_with_accumulate_grad_batches_is_invariant():
    pytest.importorskip("lightning")
    cmd = [str(EXAMPLES / "lightning_train.py"), "--per-device-batch", "{b}", "--grad-accum", "{A}"]
    result = audit(cmd, global_batch=16, layouts=LAYOUTS)
    assert result.verdict == "invariant", result.diagnosis
