"""The optimizer receives c·G: checked in a real process group against one process.

G is computed here, in one process, on the same global batch: the mean over all of its items of
the per-item loss gradient. The ranks compute their gradients and reduce them through the DDP
communication hook (and the manual reference); the received gradient must equal c·G with c from
docs/design.md §1's table (relative tolerance 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from ddp_reduce.config import load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.models import build_model, loss_sums
from tests.helpers import (
    PAIRS,
    A,
    B,
    N,
    W,
    assert_close,
    config_dict,
    first_step,
    reference_gradient,
    rel_error,
    spawn,
)


def _cfg(data: str, loss: str, op: str, impl: str = "hook", **extra: str) -> dict:
    model = {"digits": "mlp", "sequences": "seq", "linear": "linear"}[data]
    overrides = [
        f"data={data}",
        f"model={model}",
        f"data.batch_size={B if data != 'sequences' else 2}",
        f"train.accum_steps={A}",
        f"reduce.loss={loss}",
        f"reduce.op={op}",
        f"reduce.impl={impl}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return config_dict(*overrides)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One process group for every case (a spawn costs seconds)."""
    cases = []
    for impl in ("hook", "manual"):
        for loss, op, c in PAIRS:
            cases.append((("digits", loss, op, impl), c))
    cases.append((("digits", "mean", "mean", "builtin"), 1))
    cases.append((("digits", "sum", "mean", "builtin"), B * A))
    for loss, op in [
        ("sum", "global_mean"),
        ("mean", "mean"),
        ("sum", "sum"),
        ("mean", "sum"),
        ("micro_mean", "mean"),
    ]:
        cases.append((("sequences", loss, op, "hook"), None))
    cases.append((("digits", "micro_mean", "mean", "hook"), 1))
    ragged = {"data.min_len": "2", "data.max_len": "32"}
    cfgs = [_cfg(*key, **(ragged if key[0] == "sequences" else {})) for key, _ in cases]
    bn = {"model.batch_norm": "true", "train.accum_steps": "1"}
    for sync in ("true", "false"):
        cases.append((("digits-bn", sync), 1))
        cfgs.append(_cfg("digits", "mean", "mean", **bn, **{"model.sync_bn": sync}))
    per_rank = spawn(first_step, W, tmp_path_factory.mktemp("grads"), cfgs)
    return {
        key: (c, cfg, [r[i] for r in per_rank])
        for i, ((key, c), cfg) in enumerate(zip(cases, cfgs, strict=True))
    }


@pytest.mark.parametrize("impl", ["hook", "manual"])
@pytest.mark.parametrize("loss,op,c", PAIRS)
def test_received_gradient_is_c_times_G(results, loss, op, c, impl):
    c_expected, cfg, ranks = results[("digits", loss, op, impl)]
    g, _ = reference_gradient(cfg)
    for r in ranks:
        assert r["c"] == c_expected == c
        assert r["exact"]
        assert_close(r["grad"], c * g)
    # every rank holds the same reduced gradient
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])


@pytest.mark.parametrize("loss,c", [("mean", 1), ("sum", B * A)])
def test_builtin_ddp_mean_is_the_same_arithmetic(results, loss, c):
    _, cfg, ranks = results[("digits", loss, "mean", "builtin")]
    g, _ = reference_gradient(cfg)
    for r in ranks:
        assert_close(r["grad"], c * g)


def test_ragged_global_mean_equals_single_process_token_mean(results):
    _, cfg, ranks = results[("sequences", "sum", "global_mean", "hook")]
    counts = [r["items"] for r in ranks]
    assert counts[0] != counts[1], "the constructed case must give ranks unequal token counts"
    g, _ = reference_gradient(cfg)
    for r in ranks:
        assert r["c"] == 1 and r["exact"]
        assert_close(r["grad"], g)


def test_ragged_sum_modes_follow_actual_counts(results):
    _, cfg, ranks = results[("sequences", "sum", "sum", "hook")]
    n_tokens = sum(r["items"] for r in ranks)
    g, _ = reference_gradient(cfg)
    assert_close(ranks[0]["grad"], n_tokens * g)
    assert ranks[0]["c"] == n_tokens


def test_ragged_mean_of_means_is_biased(results):
    _, cfg, ranks = results[("sequences", "mean", "mean", "hook")]
    g, local_means = reference_gradient(cfg)
    received = ranks[0]["grad"]
    assert not ranks[0]["exact"]
    # It is exactly the unweighted mean of the ranks' own means ...
    assert_close(received, sum(local_means) / W)
    # ... which measurably differs from the true per-token mean G.
    bias = rel_error(received, g)
    assert bias > 1e-2, f"mean of means should differ from G on this case, got {bias:.2e}"
    _, _, sum_ranks = results[("sequences", "mean", "sum", "hook")]
    assert_close(sum_ranks[0]["grad"], sum(local_means))


def test_sync_batch_norm_matches_one_process_batch_norm(results):
    """DDP(W, b) with statistics over all ranks is one process with batch W·b (design §2)."""
    _, cfg, ranks = results[("digits-bn", "true")]
    reference = dict(cfg, model=dict(cfg["model"], sync_bn=False))
    g, _ = reference_gradient(reference)
    for r in ranks:
        assert_close(r["grad"], g)


def test_per_rank_batch_norm_differs_from_one_process(results):
    _, cfg, ranks = results[("digits-bn", "false")]
    g, _ = reference_gradient(cfg)
    diff = rel_error(ranks[0]["grad"], g)
    assert diff > 1e-3, f"per-rank statistics should change the gradient, got {diff:.2e}"


@pytest.mark.parametrize("loss,op,c", PAIRS)
def test_scalars_riding_along_the_gradient_all_reduce(results, loss, op, c):
    """The count (global_mean) and the ranks' squared local norms (noise scale) travel in the
    gradient buckets; the manual reference all-reduces them on their own, in float64."""
    _, _, hook = results[("digits", loss, op, "hook")]
    _, _, manual = results[("digits", loss, op, "manual")]
    local_sum = sum(r["local_sq"] for r in hook)
    for h, m in zip(hook, manual, strict=True):
        assert h["ranks_sq"] == pytest.approx(local_sum, rel=1e-5)
        assert h["ranks_sq"] == pytest.approx(m["ranks_sq"], rel=1e-5)
        if op == "global_mean":
            assert h["global_items"] == m["global_items"] == N


def _micro_means(cfg_dict: dict) -> list[torch.Tensor]:
    """Each micro-batch's own per-item mean gradient, rank by rank, micro-batch by micro-batch."""
    cfg = load_config(cfg_dict)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    n = W * cfg.data.batch_size * cfg.train.accum_steps
    sampler = GlobalBatchSampler(len(data.train), n, cfg.seed, cfg.data.last_batch)
    out = []
    for rank in range(W):
        for idx in sampler.micro_batches(0, rank, W, cfg.train.accum_steps):
            model.zero_grad()
            b = data.train.batch(idx)
            loss, _ = loss_sums(data.task, model(b.x), b)
            (loss / data.train.items(idx)).backward()
            out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return out


def test_micro_mean_is_mean_with_equal_counts(results):
    _, cfg, ranks = results[("digits", "micro_mean", "mean", "hook")]
    g, _ = reference_gradient(cfg)
    for r in ranks:
        assert r["c"] == 1 and r["exact"]
        assert_close(r["grad"], g)


def test_micro_mean_reproduces_the_accumulation_bug_on_ragged_counts(results):
    """Each micro-batch averaged over its own tokens, then over A and W: what trainers did
    before the 2024 fix; measurably off the per-token mean G."""
    _, cfg, ranks = results[("sequences", "micro_mean", "mean", "hook")]
    means = _micro_means(cfg)
    g, _ = reference_gradient(cfg)
    for r in ranks:
        assert not r["exact"]
        assert_close(r["grad"], sum(means) / len(means))
    bias = rel_error(ranks[0]["grad"], g)
    assert bias > 1e-2, f"the per-micro-batch mean should differ from G here, got {bias:.2e}"
