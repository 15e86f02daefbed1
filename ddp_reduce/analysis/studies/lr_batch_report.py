"""The ``lr_batch`` study's report pieces: tables, verdicts computed from the intervals, figures."""

from __future__ import annotations

import math
import statistics
from itertools import pairwise
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.intervals import Interval, median_interval
from ddp_reduce.analysis.studies import blew_up, finite
from ddp_reduce.analysis.tables import fmt


def search_rows(groups: dict, modes: list[str]) -> tuple[list[str], list[list]]:
    """One row per (seed, convention, N) search."""
    rows = []
    order = sorted(groups.values(), key=lambda g: (g.seed, modes.index(g.mode), g.n))
    for g in order:
        opt = g.optimum
        s = opt["summary"] if opt else {}
        note = ""
        if g.search is None:
            note = "probes missing"
        elif g.search.edge:
            note = f"**on the {g.search.edge} edge** of the lrs tried"
        elif opt is None:
            note = "no probe reached the target"
        bracket = "incomplete"
        if g.search is not None:
            bracket = f"[{fmt(g.search.bracket[0], 3)}, {fmt(g.search.bracket[1], 3)}]"
        b_simple = (s.get("noise_scale") or {}).get("b_simple")
        rows.append(
            [
                g.seed,
                g.mode,
                g.n,
                g.c,
                g.search.best if opt else None,
                bracket,
                opt["labels"]["lr"] if opt else None,
                len(g.runs),
                s.get("steps_to_target"),
                g.boundary,
                b_simple,
                note,
            ]
        )
    head = [
        "seed",
        "mode",
        "N",
        "c",
        "optimum lr x c",
        "bracket (lr x c)",
        "optimum lr (raw)",
        "probes",
        "steps to target",
        "divergence lr x c",
        "B_simple at optimum",
        "note",
    ]
    return head, rows


def optimum_rows(opt) -> tuple[list[str], list[list]]:
    """Per (convention, N): the median optimum over seeds [95% interval], in c = 1 and raw units."""
    rows = []
    for m in opt.modes:
        for n in opt.batches:
            i = opt.interval(m, n)
            c = opt.c[(m, n)]
            raw = f"{i.median / c:.3g} [{i.low / c:.3g}, {i.high / c:.3g}]" if i else "-"
            rows.append([m, n, c, i.text() if i else "-", raw, opt.resolution[(m, n)]])
    head = ["mode", "N", "c", "optimum lr x c, median [95%]", "optimum raw lr, median [95%]"]
    return [*head, "search resolution (widest bracket hi/lo)"], rows


def agreement_lines(groups: dict, opt, tol: float) -> list[str]:
    """Do the conventions' optima agree in c = 1 units, per seed and N?"""
    spreads, missing = [], []
    for si, seed in enumerate(opt.seeds):
        for n in opt.batches:
            vals = [opt.per_seed[(m, n)][si] for m in opt.modes]
            if any(v is None for v in vals):
                missing.append((seed, n))
            else:
                spreads.append((max(vals) / min(vals) - 1, seed, n))
    if not spreads:
        return ["No (seed, N) has an optimum for every convention."]
    worst = max(spreads)
    failing = [x for x in spreads if x[0] > tol]
    if not failing and not missing:
        return [
            f"**In c = 1 units the {len(opt.modes)} conventions' refined optima agree within "
            f"{100 * tol:g}% at every (seed, N)** (largest spread {100 * worst[0]:.2g}%, seed "
            f"{worst[1]}, N = {worst[2]})."
        ]
    parts = [f"seed {s}, N = {n}: spread {100 * v:.2g}%" for v, s, n in failing]
    parts += [f"seed {s}, N = {n}: an optimum missing or on an edge" for s, n in missing]
    return [
        f"**In c = 1 units the conventions' refined optima do not agree within {100 * tol:g}%** "
        f"at {len(parts)} (seed, N): " + "; ".join(parts) + "."
    ]


def pooled_intervals(opt) -> dict[int, Interval]:
    """Per N, over seeds: the geometric mean of the conventions' optima (c = 1 units), its
    interval widened by the search's own resolution (a factor √(hi/lo) of the widest bracket
    on each side): seeds that agree on a probe say nothing finer than the probes' spacing."""
    by_n: dict[int, list[float]] = {}
    for si in range(len(opt.seeds)):
        for n, v in opt.pooled(si):
            by_n.setdefault(n, []).append(v)
    out = {}
    for n, v in sorted(by_n.items()):
        if len(v) == len(opt.seeds):
            i = median_interval(v)
            res = max((opt.resolution[(m, n)] or 1.0) for m in opt.modes)
            out[n] = Interval(i.median, i.low / math.sqrt(res), i.high * math.sqrt(res), i.n)
    return out


def monotonic_lines(pooled: dict[int, Interval]) -> list[str]:
    """Is the optimum non-decreasing in N, as far as the intervals resolve it?"""
    ns = sorted(pooled)
    if len(ns) < 2:
        return ["Fewer than two batch sizes with an optimum for every seed: no trend to judge."]
    falls = [(a, b) for a, b in pairwise(ns) if pooled[b].high < pooled[a].low]
    rises = [(a, b) for a, b in pairwise(ns) if pooled[b].low > pooled[a].high]
    flat = len(ns) - 1 - len(falls) - len(rises)
    text = "; ".join(f"N = {n}: {pooled[n].text()}" for n in ns)
    if falls:
        verdict = (
            "**not monotonic**: the optimum falls, beyond the intervals, between N = "
            + ", ".join(f"{a} and {b}" for a, b in falls)
        )
    else:
        verdict = (
            f"**monotonic within the intervals**: it rises beyond them at {len(rises)} of "
            f"{len(ns) - 1} steps in N, and the intervals overlap at the other {flat} (no fall "
            "resolved)"
        )
    return [
        f"Optimum lr x c per N (median over seeds [95% interval over seeds, widened by the "
        f"search's resolution]): {text}. The optimum is {verdict}."
    ]


def knee_lines(opt, groups: dict, fit_knee) -> tuple[list[str], Interval | None]:
    """The knee of lr_opt(N) per seed, next to the B_simple of the optimum runs."""
    fits = [fit_knee(opt.pooled(si)) for si in range(len(opt.seeds))]
    usable = [f for f in fits if f is not None and not f.at_bound]
    b_knee = median_interval([f.b for f in usable]) if usable else None
    lr_max = median_interval([f.lr_max for f in usable]) if usable else None
    per_seed_b = []
    for seed in opt.seeds:
        vals = [
            g.optimum["summary"]["noise_scale"]["b_simple"]
            for (s, _, n), g in groups.items()
            if s == seed
            and n > 1
            and g.optimum
            and finite((g.optimum["summary"].get("noise_scale") or {}).get("b_simple"))
        ]
        if vals:
            per_seed_b.append(statistics.median(vals))
    b_simple = median_interval(per_seed_b) if per_seed_b else None
    lines = []
    if b_knee:
        lines.append(
            f"Fit of each seed's optima (geometric mean over the conventions) to lr_opt(N) = "
            f"lr_max/(1 + B/N): B = {b_knee.text()}, lr_max = {lr_max.text()} (median over "
            f"{b_knee.n} seeds with a fit inside the range scanned [95%])."
        )
    else:
        lines.append("No seed's optima constrain the knee lr_opt(N) = lr_max/(1 + B/N).")
    if b_simple:
        lines.append(
            f"B_simple at the optimum runs with N > 1 (each seed's median): {b_simple.text()}."
        )
    if b_knee and b_simple:
        ratio = b_knee.median / b_simple.median
        word = "overlap" if b_knee.overlaps(b_simple) else "**do not overlap**"
        lines.append(f"Knee B / B_simple = {ratio:.2g}; their intervals {word}.")
    return lines, b_knee


def plot_optima(study_dir: Path, opt, knee: Interval | None) -> None:
    """Sum vs mean: the optimal raw lr per convention (falling as 1/N and 1/W for the sums),
    and the same optima in c = 1 units (one curve); bars: the 95% interval over seeds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for k, m in enumerate(opt.modes):
        pts = [(n, opt.interval(m, n), opt.c[(m, n)]) for n in opt.batches]
        pts = [(n, i, c) for n, i, c in pts if i]
        if not pts:
            continue
        shift = 1.06 ** (k - 1)
        for ax, raw in ((axes[0], True), (axes[1], False)):
            d = [c if raw else 1.0 for _, _, c in pts]
            ys = [i.median / c for (_, i, _), c in zip(pts, d, strict=True)]
            lo = [y - i.low / c for y, (_, i, _), c in zip(ys, pts, d, strict=True)]
            hi = [i.high / c - y for y, (_, i, _), c in zip(ys, pts, d, strict=True)]
            ax.errorbar(
                [n * shift for n, _, _ in pts],
                ys,
                yerr=[lo, hi],
                fmt="o-",
                ms=4,
                capsize=3,
                color=f"C{k}",
                label=m,
            )
    if knee is not None:
        axes[1].axvspan(
            knee.low, knee.high, color="black", alpha=0.08, label=f"knee B {knee.text()}"
        )
    titles = ("optimal raw lr (sums fall as 1/N, 1/W)", "the same optima in c = 1 units (lr x c)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="global batch N", ylabel="lr", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "lr_vs_batch.png", dpi=110)
    plt.close(fig)


def plot_curves(study_dir: Path, groups: dict, modes: list[str], seed: int) -> None:
    """Final loss against lr x c, every probe of one seed that did not blow up, a panel per N (a
    probe stopped by the best's steps shows its loss there)."""
    import matplotlib.pyplot as plt

    batches = sorted({n for s, _, n in groups if s == seed})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 3.4), squeeze=False)
    for ax, n in zip(axes[0], batches, strict=True):
        for k, mode in enumerate(modes):
            g = groups.get((seed, mode, n))
            if g is None:
                continue
            pts = sorted(
                (x, r["summary"]["final_train_loss"])
                for x, r in g.runs.items()
                if not blew_up(r["summary"])
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    "o-",
                    color=f"C{k}",
                    ms=5 - 1.3 * k,
                    lw=2.5 - 0.7 * k,
                    label=mode,
                )
            if g.optimum:
                ax.axvline(g.search.best, color=f"C{k}", alpha=0.4)
        ax.set(xscale="log", yscale="log", title=f"N = {n}", xlabel="lr x c")
    axes[0][0].set_ylabel("train loss at the probe's last step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "loss_vs_lr.png", dpi=110)
    plt.close(fig)


def method_text(spec: dict[str, Any]) -> str:
    lr = spec["lr"]
    return (
        f"Seeds {list(spec['seeds'])} (initialisation and data order). Budget: the fewest SGD "
        f"steps to a training loss of {spec['target_loss']} (the whole training set checked "
        f"every {spec['eval_every']} steps, at most {spec['max_steps']} steps); among runs that "
        "miss it, the lowest final loss; a run that blew up (NaN/inf, or ended above its initial "
        "loss) is worse than any other. A probe stops once it has run as many steps as the best "
        "probe of its search so far needed: it can no longer be the best, so the optimum is the "
        "one the full budget gives, while its final loss is the loss at that step. The search "
        "runs in c = 1 units (lr x c, the step per "
        "unit of the mean gradient G); each convention runs at (lr x c) / c. Per (seed, "
        f"convention, N): a log grid of lr x c ({lr['per_decade']} per decade from "
        f"{lr['low']:g} to {lr['high']:g}), extended by one point while its best point is on an "
        f"edge (at most {spec['extend']} times), then {spec['refine_rounds']} golden-section "
        "probes between the best grid point's neighbours. Intervals: the median over seeds with "
        "a 95% bootstrap interval over seeds (with three seeds, about their range). Divergence: "
        "the smallest lr x c that blew up (within the steps it ran) above the largest that did not."
    )


def same_curve_line(same: float, count: int, threshold: float) -> list[str]:
    if not count:
        return []
    word = "the same runs" if same <= threshold else "not the same runs"
    return [
        f"At equal lr x c the conventions' final losses differ by at most {same:.2g} (relative, "
        f"over {count} shared probes where none blew up): {word} (threshold {threshold:g}), "
        "written in other units."
    ]
