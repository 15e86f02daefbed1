"""Best learning rate and divergence boundary vs global batch, per reduction convention."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import blew_up, finite, overrides_for
from ddp_reduce.analysis.tables import table


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


def interpolated_optimum(points: list[tuple[float, float]]) -> float | None:
    """The lr of lowest loss: the vertex of a parabola through log(loss) against log(lr) at the
    best grid point and its two neighbours (kept within them), or the grid point at an edge."""
    if not points:
        return None
    points = sorted(points)
    i = min(range(len(points)), key=lambda k: points[k][1])
    if i == 0 or i == len(points) - 1:
        return points[i][0]
    (x0, y0), (x1, y1), (x2, y2) = (
        (math.log(lr), math.log(loss)) for lr, loss in points[i - 1 : i + 2]
    )
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denom
    if a <= 0:
        return points[i][0]
    return math.exp(min(max(-b / (2 * a), x0), x2))


def fit_knee(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Fit lr_opt(N) = lr_max/(1 + B/N) (McCandlish et al. 2018) in log space: B by a scan
    over a log grid, lr_max in closed form for each B. Returns (lr_max, B), B the batch where
    linear scaling stops."""
    if len({n for n, _ in points}) < 2:
        return None
    best = None
    for k in range(301):
        b = 10 ** (-1 + 6 * k / 300)  # 0.1 .. 1e5
        logs = [math.log(lr) + math.log(1 + b / n) for n, lr in points]
        log_max = sum(logs) / len(logs)
        sse = sum((v - log_max) ** 2 for v in logs)
        if best is None or sse < best[0]:
            best = (sse, math.exp(log_max), b)
    return best[1], best[2]


def _best(group: list[dict]) -> dict[str, Any]:
    ok = [r for r in group if not blew_up(r["summary"])]
    bad = sorted(r["labels"]["lr"] for r in group if blew_up(r["summary"]))
    best = min(ok, key=lambda r: r["summary"]["final_train_loss"]) if ok else None
    c = group[0]["summary"].get("grad_scale") or 1.0
    largest_ok = max((r["labels"]["lr"] for r in ok), default=None)
    boundary = min((lr for lr in bad if largest_ok is None or lr > largest_ok), default=None)
    curve = [(r["labels"]["lr"], r["summary"]["final_train_loss"]) for r in ok]
    return {
        "c": c,
        "best_lr": best["labels"]["lr"] if best else None,
        "opt_lr": interpolated_optimum(curve),
        "best_loss": best["summary"]["final_train_loss"] if best else None,
        "boundary": boundary,
        "noise": (best["summary"].get("noise_scale") or {}).get("b_simple") if best else None,
    }


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["labels"]["mode"], r["labels"]["global_batch"]), []).append(r)
    results = {key: _best(g) for key, g in groups.items()}
    order = sorted(results.items(), key=lambda kv: (spec["modes"].index(kv[0][0]), kv[0][1]))
    rows = []
    for (mode, n), b in order:
        c = b["c"]
        rows.append(
            [
                mode,
                n,
                c,
                b["best_lr"],
                b["opt_lr"] * c if b["opt_lr"] else None,
                b["boundary"],
                b["boundary"] * c if b["boundary"] else None,
                b["best_loss"],
            ]
        )
    noise = [b["noise"] for (m, n), b in results.items() if finite(b["noise"]) and n > 1]
    b_simple = statistics.median(noise) if noise else None
    # lr_opt(N) in c = 1 units, pooled over the conventions: they are the same steps
    pooled = [(n, b["opt_lr"] * b["c"]) for (m, n), b in results.items() if b["opt_lr"]]
    knee = fit_knee(pooled)

    colors = {mode: f"C{i}" for i, mode in enumerate(spec["modes"])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in spec["modes"]:
        pts = sorted((n, b) for (m, n), b in results.items() if m == mode and b["opt_lr"])
        if not pts:
            continue
        ns, col = [n for n, _ in pts], colors[mode]
        axes[0].plot(
            ns, [b["opt_lr"] * b["c"] for _, b in pts], "o-", color=col, label=f"{mode} (lr x c)"
        )
        axes[1].plot(ns, [b["opt_lr"] for _, b in pts], "o-", color=col, label=f"{mode} best")
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
    ns = sorted({n for n, _ in pooled})
    if ns and knee:
        lr_max, b_knee = knee
        small = lr_max / (1 + b_knee / ns[0])
        axes[0].plot(
            ns, [small * n / ns[0] for n in ns], ":", color="gray", label="linear (lr ~ N)"
        )
        axes[0].plot(
            ns,
            [small * math.sqrt(n / ns[0]) for n in ns],
            "--",
            color="gray",
            label="square root (lr ~ sqrt N)",
        )
        axes[0].plot(
            ns,
            [lr_max / (1 + b_knee / n) for n in ns],
            "-",
            color="black",
            alpha=0.5,
            label=f"fit lr_max/(1 + B/N), B ~ {b_knee:.0f}",
        )
    if b_simple:
        axes[0].axvline(
            b_simple, color="red", alpha=0.6, label=f"measured B_simple ~ {b_simple:.0f}"
        )
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

    text = [
        f"{spec['steps']} SGD steps per run, lr on a log grid ({spec['lr']['per_decade']} per "
        f"decade from {spec['lr']['low']:g} to {spec['lr']['high']:g}). Best lr: the grid "
        "point with the lowest final training-set loss among runs that did not blow up; "
        "optimum: the vertex of a parabola through it and its neighbours (log loss against "
        "log lr). Divergence boundary: the smallest lr above the largest stable one that blew "
        "up (NaN/inf, or ended above its initial loss). c is the run's factor: the raw lr of "
        "sum/sum must shrink like 1/N, and lr x c is the step in c = 1 units.",
        "",
        table(
            [
                "mode",
                "N",
                "c",
                "best lr (grid)",
                "optimum lr x c",
                "divergence lr",
                "divergence lr x c",
                "best final loss",
            ],
            rows,
        ),
        "",
    ]
    if knee:
        text.append(
            f"Fit of the optima (c = 1 units, all conventions) to lr_opt(N) = lr_max/(1 + B/N): "
            f"lr_max = {knee[0]:.3g}, B = {knee[1]:.0f}. Below B the best lr grows about "
            "linearly with N (the linear scaling rule); above it, it saturates at lr_max."
        )
    if b_simple:
        ratio = f" (fitted B / B_simple = {knee[1] / b_simple:.2f})" if knee else ""
        text.append(
            f"Measured gradient noise scale (median over the best runs at W=2): "
            f"B_simple ~ {b_simple:.0f}{ratio}."
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
