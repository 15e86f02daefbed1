"""Mean of means vs the count-weighted global mean on variable-length sequences."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ddp_reduce.config import load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.analysis.studies import relative_weight_difference
from ddp_reduce.run.compose import compose_config
from ddp_reduce.analysis.tables import table


def run(spec, runner) -> None:
    for name, overrides in spec.runs.items():
        runner.run(name, [*spec.common, f"train.steps={spec.steps}", *overrides], role=name)


def _grad(model, data, idx, mean_over: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token mean gradient over ``idx``, or the mean over the parts of per-part means."""
    parts = mean_over if mean_over is not None else [idx]
    total = None
    for part in parts:
        model.zero_grad()
        batch = data.train.batch(part)
        loss, _ = loss_sums(data.task, model(batch.x), batch)
        (loss / data.train.items(part)).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total = g if total is None else total + g
    return total / len(parts)


def gradient_bias(spec: dict[str, Any]) -> list[list[Any]]:
    """|g - G| / |G| at the initial weights, g a mean of per-part means, for each layout: W
    ranks' means, and the accumulation bug (A micro-batches, each averaged over its own tokens,
    then divided by A: the same arithmetic over A parts)."""
    cfg = load_config(compose_config(list(spec["common"]))[0])
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    b, steps, a = (spec["bias"][k] for k in ("sequences_per_rank", "steps", "accum_steps"))
    layouts = [
        (w, f"mean of {w} ranks' means ({b} sequences each)") for w in spec["bias"]["world_sizes"]
    ]
    layouts.append(
        (a, f"accumulation bug: {a} micro-batches of {b}, each its own mean, then / {a}")
    )
    rows = []
    for parts_n, label in layouts:
        sampler = GlobalBatchSampler(len(data.train), parts_n * b, cfg.seed, cfg.data.last_batch)
        errors, spreads = [], []
        for t in range(steps):
            idx = sampler.global_batch(t)
            parts = list(sampler.rank_shares(t, parts_n))  # as the ranks would hold them
            g_true = _grad(model, data, idx)
            g_parts = _grad(model, data, idx, mean_over=parts)
            errors.append(float((g_parts - g_true).norm() / g_true.norm()))
            counts = [data.train.items(p) for p in parts]
            spreads.append(max(counts) / min(counts))
        rows.append([label, statistics.mean(spreads), statistics.mean(errors), max(errors)])
    return rows


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    by_role = {r["labels"]["role"]: r for r in runs}
    ref = by_role.get("reference")
    rows = []
    for role, r in by_role.items():
        s = r["summary"]
        dw = (
            relative_weight_difference(r["dir"], ref["dir"]) if ref and role != "reference" else 0.0
        )
        dl = None
        if ref and isinstance(s.get("final_train_loss"), float):
            dl = s["final_train_loss"] - ref["summary"]["final_train_loss"]
        rows.append(
            [
                role,
                s.get("world_size"),
                s.get("accum_steps"),
                f"{s.get('reduce_loss')}/{s.get('reduce_op')}",
                s.get("grad_scale_exact"),
                dw,
                s.get("final_train_loss"),
                dl,
            ]
        )
    bias = gradient_bias(OmegaConf.to_container(OmegaConf.create(spec)))
    return "\n".join(
        [
            f"Variable-length sequences (`{' '.join(spec['common'])}`), {spec['steps']} steps. "
            "Weights are "
            "compared with the single-process per-token reference: "
            "r = max|w - w_ref| / max|w_ref|.",
            "",
            table(
                [
                    "run",
                    "W",
                    "A",
                    "loss/op",
                    "c exact every step",
                    "r vs reference",
                    "final train loss",
                    "loss - reference",
                ],
                rows,
            ),
            "",
            "The bias itself, at the initial weights, over "
            f"{spec['bias']['steps']} global batches: g is the mean of the ranks' per-token means, "
            "G the per-token mean of the whole global batch. The accumulation bug (each "
            "micro-batch averaged over its own tokens, then divided by A) is the same arithmetic "
            "as a mean of A ranks' means, so it shows the same bias.",
            "",
            table(
                ["layout", "mean max/min tokens per part", "mean |g - G|/|G|", "max |g - G|/|G|"],
                bias,
            ),
        ]
    )
