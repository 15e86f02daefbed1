"""The ``noise_scale`` study's report pieces: B_noise at the trace run's checkpoints, the table of
searches, the method, the three critical batches side by side, and the figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.intervals import Interval
from ddp_reduce.analysis.studies import finite
from ddp_reduce.run.rundir import CHECKPOINTS, CONFIG, read_metrics


def checkpoint_noise(trace: dict[str, Any], items: int | None) -> list[dict[str, float]]:
    """B_simple and B_noise over the whole training split at each checkpoint of the trace run
    (tr(HΣ) from ``items`` items' Hessian-vector products; all when None)."""
    import torch
    from omegaconf import OmegaConf

    from ddp_reduce.analysis.hessian_noise import model_hessian_noise
    from ddp_reduce.config import load_config
    from ddp_reduce.data import load_dataset
    from ddp_reduce.models import build_model

    run_dir = Path(trace["dir"])
    paths = sorted((run_dir / CHECKPOINTS).glob("step_*.pt"))
    if not paths:
        return []
    cfg = load_config(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG)))
    data = load_dataset(cfg.data)
    out = []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(cfg.model, data)
        model.load_state_dict(state["model"])
        h = model_hessian_noise(model, data.task, data.train, sample=items)
        rel_se = h.se_trace_h_sigma / h.trace_h_sigma if h.trace_h_sigma else math.nan
        out.append(
            {"step": state["step"], "b_simple": h.b_simple, "b_noise": h.b_noise, "rel_se": rel_se}
        )
    return out


def search_rows(spec, found) -> tuple[tuple[list[str], list[list]], list]:
    """The table of every (seed, N) search, and the (seed, N) whose best lr is on an edge."""
    rows, edges = [], []
    for (seed, n), search in sorted(found.items()):
        if search is None:
            rows.append([seed, n, None, None, None, None, "probes missing"])
            continue
        reached = search.scores[search.best][0] == 0
        steps = search.scores[search.best][1] if reached else None
        note = f"grid extended by {search.extended}" if search.extended else ""
        if search.edge:
            edges.append((seed, n))
            note = f"**on the {search.edge} edge** of the lrs tried"
        elif not reached:
            note = "target not reached"
        rows.append(
            [seed, n, search.best, len(search.scores), steps, n * steps if steps else None, note]
        )
    head = ["seed", "N", "best lr", "lrs tried", "steps to target", "examples (N x S)", "note"]
    return (head, rows), edges


def checkpoint_rows(seeds: dict[int, dict[str, Any]]) -> tuple[list[str], list[list]]:
    """Per seed and checkpoint of the trace run: the exact B_simple and B_noise over the split."""
    rows = []
    for seed, v in sorted(seeds.items()):
        at = v["at_target"]
        for c in v["checkpoints"]:
            near = "yes" if v["near"] is c else ""
            rows.append(
                [
                    seed,
                    c["step"],
                    c["b_simple"],
                    c["b_noise"],
                    c["rel_se"],
                    near,
                    at[0] if at and near else None,
                ]
            )
    head = [
        "seed",
        "checkpoint step",
        "B_simple (exact)",
        "B_noise",
        "tr(HΣ) rel. s.e.",
        "nearest the target",
        "target reached at step",
    ]
    return head, rows


def method_lines(spec) -> list[str]:
    return [
        f"Seeds {list(spec['seeds'])} (initialisation and data order). Target: loss "
        f"{spec['target_loss']} on the whole training set (checked every {spec['eval_every']} "
        f"steps, at most {spec['max_steps']} steps). For each (seed, N) the best lr (fewest steps "
        f"to the target; among runs that miss it, the lowest final loss) of {list(spec['lr'])}, "
        f"the grid extended by one point while its best is on an edge (at most {spec['extend']} "
        f"times), then {spec.get('refine_rounds', 0)} golden-section probes between the best "
        "point's neighbours. A probe stops once it has run the steps the best probe of its "
        "search so far needed: it can no longer be the best, so the best lr is the full "
        "budget's. Each figure below is computed per seed; the median over seeds is "
        "given with a 95% bootstrap interval over seeds [low, high] (with three seeds, about "
        "their range).",
        "",
        "- (a) trade-off: S(N) = S_min(1 + B_crit/N), i.e. (S/S_min − 1)(E/E_min − 1) = 1 with "
        "E = N·S, fitted in log S; B_crit = E_min/S_min.",
        "- (b) B_simple = tr(Σ)/|G|², online, where the seed's trace run first reaches the "
        "target; B_noise = tr(HΣ)/(GᵀHG) over the whole training split, from Hessian-vector "
        "products at the trace run's checkpoint nearest that step"
        + (
            f" (tr(HΣ) from {spec['hessian_items']} items' products)."
            if spec.get("hessian_items")
            else "."
        ),
        "- (c) knee: the best lr per N fitted to lr_opt(N) = lr_max/(1 + B/N).",
    ]


def _compare(name: str, b: Interval, ref_name: str, ref: Interval | None) -> str:
    if ref is None:
        return f"{name} against {ref_name}: no {ref_name} to compare with."
    ratio = b.median / ref.median
    if b.overlaps(ref):
        return f"{name} predicts {ref_name} within their intervals (ratio of medians {ratio:.2g})."
    return (
        f"**{name} does not predict {ref_name}**: the intervals are apart, ratio of medians "
        f"{ratio:.2g}."
    )


def comparison_lines(spec, seeds, est) -> list[str]:
    names = {
        "tradeoff": "(a) B_crit, trade-off fit",
        "knee": "(c) B, knee of lr_opt(N)",
        "b_simple": "(b) B_simple online, at the target",
        "b_noise": "(b) B_noise, Hessian, at the target",
        "b_simple_exact": "(b) B_simple exact, same checkpoint",
    }
    rows = [[names[k], est[k].text() if est[k] else "-", est[k].n if est[k] else 0] for k in names]
    from ddp_reduce.analysis.tables import table

    lines = [table(["critical batch", "median [95% interval]", "seeds"], rows), ""]
    for k in ("tradeoff", "knee"):
        if est[k] is None:
            lines.append(f"{names[k]}: no seed gave a fit inside the range searched.")
    for b in ("b_simple", "b_noise"):
        if est[b] is None:
            lines.append(f"{names[b]}: not measured.")
            continue
        for ref in ("tradeoff", "knee"):
            lines.append(_compare(names[b], est[b], names[ref], est[ref]))
    if est["tradeoff"] and est["s_min"]:
        lines.append(f"S_min (steps with an unbounded batch): {est['s_min'].text()}.")
    return lines


def plot(study_dir: Path, spec, runs, seeds, est) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, (seed, v) in enumerate(sorted(seeds.items())):
        trace = next(
            (
                r
                for r in runs
                if r["labels"]["role"] == "trace" and r["labels"].get("seed", 0) == seed
            ),
            None,
        )
        if trace:
            curve = [
                (m["step"], m["noise/b_simple"])
                for m in read_metrics(trace["dir"])
                if finite(m.get("noise/b_simple"))
            ]
            if curve:
                axes[0].plot(
                    *zip(*curve, strict=True),
                    color=f"C{k}",
                    alpha=0.6,
                    label=f"B_simple online, seed {seed}",
                )
        ck = [(c["step"], c["b_noise"]) for c in v["checkpoints"]]
        if ck:
            axes[0].plot(
                *zip(*ck, strict=True),
                "s--",
                color=f"C{k}",
                label=f"B_noise (Hessian), seed {seed}",
            )
        pts = sorted((n, s) for n, (s, _) in v["best"].items())
        if pts:
            axes[1].plot(*zip(*pts, strict=True), "o", color=f"C{k}", label=f"seed {seed}")
            f = v["tradeoff"]
            if f:
                ns = [n for n, _ in pts]
                axes[1].plot(ns, [f.steps(n) for n in ns], "-", color=f"C{k}", alpha=0.6)
        lrs = sorted((n, lr) for n, (_, lr) in v["best"].items())
        if lrs:
            axes[2].plot(*zip(*lrs, strict=True), "o", color=f"C{k}", label=f"seed {seed}")
            if v["knee"]:
                ns = [n for n, _ in lrs]
                axes[2].plot(ns, [v["knee"].at(n) for n in ns], "-", color=f"C{k}", alpha=0.6)
    for ax, key in ((axes[1], "tradeoff"), (axes[2], "knee")):
        if est[key]:
            ax.axvspan(
                est[key].low, est[key].high, color="gray", alpha=0.15, label="B, 95% interval"
            )
    axes[0].set(
        xlabel="step", ylabel="batch size", yscale="log", title="noise scales over training"
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="global batch N",
        ylabel="steps to target",
        title=f"(a) steps to train loss {spec['target_loss']}, fit per seed",
    )
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="global batch N",
        ylabel="best lr",
        title="(c) best lr, knee fit per seed",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "noise_scale.png", dpi=110)
    plt.close(fig)
