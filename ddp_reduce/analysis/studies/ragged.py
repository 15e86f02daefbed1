"""Mean of means vs the count-weighted global mean on variable-length sequences."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ddp_reduce.analysis.studies import finite, relative_weight_difference
from ddp_reduce.analysis.tables import table
from ddp_reduce.config import load_config
from ddp_reduce.data import GlobalBatchSampler, load_dataset
from ddp_reduce.models import build_model, loss_sums
from ddp_reduce.run.compose import compose_config
from ddp_reduce.run.rundir import read_metrics

SETS = ("train.steps",)


def planned_runs(spec) -> int:
    return len(spec["runs"])


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


def gradient_bias(spec: dict[str, Any], common: list[str] = ()) -> list[list[Any]]:
    """|g - G| / |G| at the initial weights, g a mean of per-part means, for each layout: W
    ranks' means, and micro_mean (A micro-batches, each averaged over its own tokens, then
    divided by A: the same arithmetic over A parts)."""
    cfg = load_config(compose_config([*common, *spec["common"]])[0])
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    b, steps, a = (spec["bias"][k] for k in ("sequences_per_rank", "steps", "accum_steps"))
    layouts = [
        (w, f"mean of {w} ranks' means ({b} sequences each)") for w in spec["bias"]["world_sizes"]
    ]
    layouts.append((a, f"micro_mean: {a} micro-batches of {b}, each its own mean, then / {a}"))
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


def _verdict(diffs: dict[str, float | None], tol: float) -> list[str]:
    """Which runs match the reference, which differ, which have no weights."""
    exact = [k for k, v in diffs.items() if k != "reference" and v is not None and v <= tol]
    biased = [k for k, v in diffs.items() if v is not None and v > tol]
    missing = [k for k, v in diffs.items() if v is None]
    verdict = []
    if exact:
        verdict.append(
            f"match the per-token reference to float rounding (r <= {tol:g}): "
            + ", ".join(f"`{k}` (r = {diffs[k]:.2g})" for k in exact)
        )
    if biased:
        verdict.append(
            "differ from it: " + ", ".join(f"`{k}` (r = {diffs[k]:.2g})" for k in biased)
        )
    if missing:
        verdict.append("no weights to compare: " + ", ".join(f"`{k}`" for k in missing))
    return verdict


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    by_role = {r["labels"]["role"]: r for r in runs}
    ref = by_role.get("reference")
    rows, diffs = [], {}
    for role, r in by_role.items():
        s = r["summary"]
        dw = (
            relative_weight_difference(r["dir"], ref["dir"]) if ref and role != "reference" else 0.0
        )
        diffs[role] = dw
        dl = None
        if (
            ref
            and finite(s.get("final_train_loss"))
            and finite(ref["summary"].get("final_train_loss"))
        ):
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
    bias = gradient_bias(OmegaConf.to_container(OmegaConf.create(spec)), list(common))
    _plot(study_dir, by_role, diffs, bias, spec["exact_below"])
    verdict = _verdict(diffs, spec["exact_below"])
    return "\n".join(
        [
            f"Variable-length sequences (`{' '.join(spec['common'])}`), {spec['steps']} steps. "
            "Weights are compared with the single-process per-token reference: "
            "r = max|w - w_ref| / max|w_ref|. `accumulation` is loss=mean over the tokens of the "
            "whole step (correct); `micro_mean` divides each micro-batch by its own token count "
            "and by A, as trainers did before the 2024 accumulation fix.",
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
            "After training, " + "; ".join(verdict) + ".",
            "",
            "The bias itself, at the initial weights, over "
            f"{spec['bias']['steps']} global batches: g is the mean of the parts' per-token means, "
            "G the per-token mean of the whole global batch. micro_mean over A micro-batches is "
            "the same arithmetic as a mean of A ranks' means.",
            "",
            table(
                ["layout", "mean max/min tokens per part", "mean |g - G|/|G|", "max |g - G|/|G|"],
                bias,
            ),
            "",
            "![ragged batches](ragged.png)",
        ]
    )


def _plot(study_dir: Path, by_role: dict, diffs: dict, bias: list[list[Any]], tol: float) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    roles = [k for k in by_role if k != "reference"]
    floor = 1e-12
    values = [max(diffs[k], floor) if diffs[k] is not None else floor for k in roles]
    axes[0].barh(roles, values, color=[f"C{i}" for i in range(len(roles))])
    axes[0].axvline(tol, color="black", ls="--", alpha=0.6, label=f"{tol:g} (float rounding)")
    axes[0].set(
        xscale="log",
        xlabel="r = max|w - w_ref| / max|w_ref| after training",
        title="final weights vs the per-token reference",
    )
    axes[0].legend(fontsize=7)
    ref = by_role.get("reference")
    ref_loss = {}
    if ref:
        ref_loss = {
            m["step"]: m["train/loss"] for m in read_metrics(ref["dir"]) if "train/loss" in m
        }
    for i, k in enumerate(roles):
        pts = [
            (m["step"], m["train/loss"] - ref_loss[m["step"]])
            for m in read_metrics(by_role[k]["dir"])
            if finite(m.get("train/loss")) and finite(ref_loss.get(m.get("step")))
        ]
        if pts:
            axes[1].plot(  # thinner in turn: runs that coincide stay visible
                *zip(*pts, strict=True),
                "o-",
                ms=6 - i,
                lw=3.5 - 0.7 * i,
                color=f"C{i}",
                label=k,
            )
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set(
        xlabel="step",
        ylabel="train loss - reference's",
        title="loss of each run against the reference, same batches",
    )
    axes[1].legend(fontsize=7)
    labels = [row[0].split(":")[0].replace(" (", "\n(") for row in bias]
    ys = range(len(bias))
    axes[2].barh([y + 0.2 for y in ys], [row[2] for row in bias], height=0.4, label="mean")
    axes[2].barh([y - 0.2 for y in ys], [row[3] for row in bias], height=0.4, label="max")
    axes[2].set_yticks(list(ys), labels, fontsize=7)
    axes[2].set(xlabel="|g - G| / |G|", title="gradient bias at the initial weights")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "ragged.png", dpi=110)
    plt.close(fig)
