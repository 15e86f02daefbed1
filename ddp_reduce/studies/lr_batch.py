"""Best learning rate and divergence boundary vs global batch, per reduction convention."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ddp_reduce.studies import blew_up, finite, overrides_for


def lr_grid(low: float, high: float, per_decade: int) -> list[float]:
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (i / per_decade) for i in range(n + 1)]


def run(spec, runner) -> None:
    grid = lr_grid(spec.lr.low, spec.lr.high, spec.lr.per_decade)
    for mode in spec.modes:
        for n in spec.global_batch:
            world = 1 if n == 1 else 2
            for lr in grid:
                runner.run(
                    f"{mode.replace('/', '-')}_N{n}_lr{lr:.3g}",
                    [
                        *spec.common,
                        f"train.steps={spec.steps}",
                        *overrides_for(mode),
                        f"dist.nproc={world}",
                        f"data.batch_size={n // world}",
                        f"optim.lr={lr:.10g}",
                    ],
                    mode=mode,
                    global_batch=n,
                    lr=lr,
                )


def _best(group: list[dict]) -> dict[str, Any]:
    ok = [r for r in group if not blew_up(r["summary"])]
    bad = sorted(r["labels"]["lr"] for r in group if blew_up(r["summary"]))
    best = min(ok, key=lambda r: r["summary"]["final_train_loss"]) if ok else None
    c = group[0]["summary"].get("grad_scale") or 1.0
    largest_ok = max((r["labels"]["lr"] for r in ok), default=None)
    boundary = min((lr for lr in bad if largest_ok is None or lr > largest_ok), default=None)
    return {
        "c": c,
        "best_lr": best["labels"]["lr"] if best else None,
        "best_loss": best["summary"]["final_train_loss"] if best else None,
        "boundary": boundary,
        "noise": (best["summary"].get("noise_scale") or {}).get("b_simple") if best else None,
    }


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    from ddp_reduce.report import table

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["labels"]["mode"], r["labels"]["global_batch"]), []).append(r)
    results = {key: _best(g) for key, g in groups.items()}
    rows = []
    for (mode, n), b in sorted(
        results.items(), key=lambda kv: (spec["modes"].index(kv[0][0]), kv[0][1])
    ):
        c = b["c"]
        rows.append(
            [
                mode,
                n,
                c,
                b["best_lr"],
                b["best_lr"] * c if b["best_lr"] else None,
                b["boundary"],
                b["boundary"] * c if b["boundary"] else None,
                b["best_loss"],
            ]
        )
    noise = [b["noise"] for (m, n), b in results.items() if finite(b["noise"]) and n > 1]
    b_simple = statistics.median(noise) if noise else None

    colors = {mode: f"C{i}" for i, mode in enumerate(spec["modes"])}
    # optimal lr in c = 1 units against N, with linear and square-root references
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in spec["modes"]:
        pts = sorted((n, b) for (m, n), b in results.items() if m == mode and b["best_lr"])
        if not pts:
            continue
        ns, col = [n for n, _ in pts], colors[mode]
        axes[0].plot(
            ns, [b["best_lr"] * b["c"] for _, b in pts], "o-", color=col, label=f"{mode} (lr x c)"
        )
        axes[1].plot(ns, [b["best_lr"] for _, b in pts], "o-", color=col, label=f"{mode} best")
        bnd = [(n, b["boundary"]) for n, b in pts if b["boundary"]]
        if bnd:
            axes[1].plot(
                [n for n, _ in bnd],
                [v for _, v in bnd],
                "x--",
                color=col,
                alpha=0.6,
                label=f"{mode} divergence",
            )
    ref = sorted((n, b) for (m, n), b in results.items() if m == spec["modes"][0] and b["best_lr"])
    if ref:
        n0, b0 = ref[0]
        lr0 = b0["best_lr"] * b0["c"]
        xs = [n for n, _ in ref]
        axes[0].plot(xs, [lr0 * n / n0 for n in xs], ":", color="gray", label="linear (lr ~ N)")
        axes[0].plot(
            xs,
            [lr0 * math.sqrt(n / n0) for n in xs],
            "--",
            color="gray",
            label="square root (lr ~ sqrt N)",
        )
    if b_simple:
        label = f"measured B_simple ~ {b_simple:.0f}"
        axes[0].axvline(b_simple, color="red", alpha=0.6, label=label)
    titles = ("best lr in c = 1 units", "best raw lr, and where runs diverge")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="global batch N", ylabel="lr", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "lr_vs_batch.png", dpi=110)
    plt.close(fig)

    # final loss against lr x c: one curve per mode, per batch; the curves coincide
    batches = sorted({n for _, n in groups})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 3.4), squeeze=False)
    for ax, n in zip(axes[0], batches, strict=True):
        for mode in spec["modes"]:
            pts = sorted(
                (
                    r["labels"]["lr"] * (r["summary"].get("grad_scale") or 1.0),
                    r["summary"]["final_train_loss"],
                )
                for r in groups.get((mode, n), [])
                if not blew_up(r["summary"])
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[mode], ms=3, label=mode)
        ax.set(xscale="log", yscale="log", title=f"N = {n}", xlabel="lr x c")
    axes[0][0].set_ylabel("final train loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "loss_vs_lr.png", dpi=110)
    plt.close(fig)

    # where linear scaling stops: the first step in N where the best lr (c = 1) grows slower
    # than the square root of N
    mm = [
        (n, b["best_lr"] * b["c"])
        for (m, n), b in sorted(results.items())
        if m == spec["modes"][0] and b["best_lr"]
    ]
    stop = None
    for (n1, l1), (n2, l2) in zip(mm, mm[1:], strict=False):
        growth = math.log(l2 / l1) / math.log(n2 / n1)  # exponent: 1 linear, 0.5 sqrt, 0 flat
        if growth < 0.5:
            stop = (n1, n2, growth)
            break
    text = [
        f"{spec['steps']} SGD steps per run, lr on a log grid ({spec['lr']['per_decade']} per "
        f"decade from {spec['lr']['low']:g} to {spec['lr']['high']:g}); "
        "best = lowest final training-set loss among runs that did not blow up; divergence "
        "boundary = the smallest lr above the largest stable one that blew up (NaN/inf, or "
        "ended above its initial loss). c is the run's factor: the raw lr of sum/sum must "
        "shrink like 1/N, and lr x c is the step in c = 1 units.",
        "",
        table(
            [
                "mode",
                "N",
                "c",
                "best lr",
                "best lr x c",
                "divergence lr",
                "divergence lr x c",
                "best final loss",
            ],
            rows,
        ),
        "",
        f"Measured gradient noise scale (median over the best runs, W=2): "
        f"B_simple ~ {b_simple:.0f}."
        if b_simple
        else "No noise-scale estimate (W=1 only).",
    ]
    if stop:
        text.append(
            f"Scaling of the best lr (c = 1 units) with N flattens between N={stop[0]} and "
            f"N={stop[1]} (local exponent {stop[2]:.2f}; 1 = linear, 0.5 = square root)."
        )
    text += [
        "",
        "![best lr vs global batch](lr_vs_batch.png)",
        "",
        "Final loss against lr x c (runs that did not blow up): the three conventions lie on "
        "one curve, the same steps written in other units.",
        "",
        "![final loss vs lr x c](loss_vs_lr.png)",
    ]
    return "\n".join(text)
