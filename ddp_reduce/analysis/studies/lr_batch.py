"""Best learning rate and divergence boundary vs global batch, per reduction convention.

The search runs in c = 1 units: a learning rate lr x c is the same step for every convention, so
each convention runs at (lr x c) / c. For each (convention, N): a coarse log grid, extended by one
point while its best point is on an edge, then golden-section refinement between the best grid
point's neighbours. A run that blew up scores worse than any finite loss.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import (
    BLOW_UP_COLUMN,
    LogSearch,
    blew_up,
    finite,
    grad_scale_of,
    minimize_log,
    overrides_for,
)
from ddp_reduce.analysis.tables import fmt, table

RUN_COLUMNS = {BLOW_UP_COLUMN: blew_up}
SETS = ("train.steps", "reduce.loss", "reduce.op", "dist.nproc", "data.batch_size", "optim.lr")
SAME_CURVE = 1e-3  # relative final-loss difference at equal lr x c called "the same run"


def lr_grid(low: float, high: float, per_decade: int) -> list[float]:
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (i / per_decade) for i in range(n + 1)]


def _grid(spec) -> list[float]:
    return lr_grid(spec["lr"]["low"], spec["lr"]["high"], spec["lr"]["per_decade"])


def planned_runs(spec) -> int:
    per_search = len(_grid(spec)) + spec["refine_rounds"]
    return len(spec["modes"]) * len(spec["global_batch"]) * per_search


def _base(spec, mode: str, n: int) -> list[str]:
    world = 1 if n == 1 else 2
    return [
        *spec.common,
        f"train.steps={spec.steps}",
        *overrides_for(mode),
        f"dist.nproc={world}",
        f"data.batch_size={n // world}",
    ]


def score(summary: dict[str, Any]) -> float:
    """Final training-set loss; a run that blew up is worse than any finite loss."""
    return math.inf if blew_up(summary) else summary["final_train_loss"]


def run(spec, runner) -> None:
    grid = _grid(spec)
    for mode in spec.modes:
        for n in spec.global_batch:
            base = _base(spec, mode, n)
            c = grad_scale_of([*runner.common, *base])
            probes = iter(range(10**6))

            def probe(lr_c1: float, base=base, c=c, mode=mode, n=n, probes=probes) -> float:
                lr = lr_c1 / c
                summary = runner.run(
                    f"{mode.replace('/', '-')}_N{n}_{next(probes):02d}_lrc{lr_c1:.4g}",
                    [*base, f"optim.lr={lr!r}"],
                    mode=mode,
                    global_batch=n,
                    c=c,
                    lr=lr,
                    lr_c1=lr_c1,
                )
                return score(summary)

            minimize_log(probe, grid, extend=spec.extend, rounds=spec.refine_rounds)


@dataclass
class KneeFit:
    """lr_opt(N) = lr_max / (1 + B/N), least squares in log lr; standard errors of log lr_max
    and log B from the fit's curvature (Gauss-Newton, residual variance over n - 2 degrees of
    freedom); None where n = 2 (an exact fit) or the fit is flat in B."""

    lr_max: float
    b: float
    se_log_b: float | None
    se_log_lr_max: float | None
    n: int
    at_bound: bool  # B at the end of the scanned range: not constrained by the data
    rms_log: float = 0.0  # root mean square residual of log lr

    def b_range(self) -> tuple[float, float] | None:
        if self.se_log_b is None:
            return None
        return self.b * math.exp(-self.se_log_b), self.b * math.exp(self.se_log_b)

    def at(self, n: float) -> float:
        return self.lr_max / (1 + self.b / n)


B_SCAN = (0.1, 1e5)


def fit_knee(points: list[tuple[float, float]]) -> KneeFit | None:
    """Fit lr_opt(N) = lr_max/(1 + B/N) (McCandlish et al. 2018) in log space: B by a scan over
    a log grid (lr_max in closed form for each B), then the curvature at the minimum."""
    if len({n for n, _ in points}) < 2:
        return None
    lo, hi = (math.log10(v) for v in B_SCAN)
    best = None
    steps = 3000
    for k in range(steps + 1):
        b = 10 ** (lo + (hi - lo) * k / steps)
        logs = [math.log(lr) + math.log(1 + b / n) for n, lr in points]
        log_max = sum(logs) / len(logs)
        sse = sum((v - log_max) ** 2 for v in logs)
        if best is None or sse < best[0]:
            best = (sse, log_max, b, k)
    sse, log_max, b, k = best
    n_pts = len(points)
    # Jacobian of the model log lr_max - log(1 + B/N) in (log lr_max, log B)
    rows = [(1.0, -(b / n) / (1 + b / n)) for n, _ in points]
    s11 = sum(r[0] * r[0] for r in rows)
    s12 = sum(r[0] * r[1] for r in rows)
    s22 = sum(r[1] * r[1] for r in rows)
    det = s11 * s22 - s12 * s12
    se_b = se_max = None
    if n_pts > 2 and det > 1e-12 * max(s11 * s22, 1e-300):
        var = sse / (n_pts - 2)
        se_b = math.sqrt(var * s11 / det)
        se_max = math.sqrt(var * s22 / det)
    return KneeFit(
        math.exp(log_max), b, se_b, se_max, n_pts, k in (0, steps), math.sqrt(sse / n_pts)
    )


@dataclass
class Group:
    mode: str
    n: int
    c: float
    search: LogSearch | None  # None: the recorded probes do not replay (an incomplete study)
    runs: dict[float, dict[str, Any]]  # lr x c -> run

    @property
    def optimum(self) -> dict[str, Any] | None:
        if self.search is None or self.search.best is None:
            return None
        run = self.runs[self.search.best]
        return None if blew_up(run["summary"]) else run

    @property
    def boundary(self) -> float | None:
        """The smallest lr x c that blew up above the largest one that did not."""
        ok = [x for x, r in self.runs.items() if not blew_up(r["summary"])]
        top = max(ok, default=None)
        return min(
            (x for x, r in self.runs.items() if blew_up(r["summary"]) and (top is None or x > top)),
            default=None,
        )


def _groups(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[tuple[str, int], Group]:
    by: dict[tuple[str, int], dict[float, dict]] = {}
    for r in runs:
        lab = r["labels"]
        by.setdefault((lab["mode"], lab["global_batch"]), {})[lab["lr_c1"]] = r
    grid = _grid(spec)
    out = {}
    for (mode, n), probes in by.items():
        first = next(iter(probes.values()))

        def recorded(x: float, probes=probes) -> float:
            return score(probes[x]["summary"])

        try:
            search = minimize_log(
                recorded, grid, extend=spec["extend"], rounds=spec["refine_rounds"]
            )
        except KeyError:
            search = None
        out[(mode, n)] = Group(mode, n, first["labels"]["c"], search, probes)
    return out


def _spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def _same_curve(groups: dict[tuple[str, int], Group], modes: list[str]) -> tuple[float, int]:
    """Largest relative final-loss difference between conventions at equal lr x c (probes where
    none blew up), and how many such points there are."""
    worst, count = 0.0, 0
    for n in sorted({n for _, n in groups}):
        present = [groups[(m, n)] for m in modes if (m, n) in groups]
        if len(present) < 2:
            continue
        shared = set.intersection(*(set(g.runs) for g in present))
        for x in shared:
            runs = [g.runs[x]["summary"] for g in present]
            if any(blew_up(s) for s in runs):
                continue
            losses = [s["final_train_loss"] for s in runs]
            worst = max(worst, (max(losses) - min(losses)) / min(losses))
            count += 1
    return worst, count


def _bracket_text(search: LogSearch | None) -> str:
    if search is None:
        return "incomplete"
    lo, hi = search.bracket
    return f"[{fmt(lo, 3)}, {fmt(hi, 3)}]"


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    modes = list(spec["modes"])
    tol = spec["agree_within"]
    groups = _groups(spec, runs)
    order = sorted(groups.values(), key=lambda g: (modes.index(g.mode), g.n))
    batches = sorted({g.n for g in order})

    rows = []
    for g in order:
        opt = g.optimum
        s = opt["summary"] if opt else {}
        edge = g.search.edge if g.search else None
        note = ""
        if g.search is None:
            note = "probes missing"
        elif edge:
            note = f"**on the {edge} edge** of the lrs tried"
        elif opt is None:
            note = "every probe blew up"
        rows.append(
            [
                g.mode,
                g.n,
                g.c,
                g.search.best if opt else None,
                _bracket_text(g.search),
                opt["labels"]["lr"] if opt else None,
                len(g.runs),
                s.get("final_train_loss"),
                g.boundary,
                (s.get("noise_scale") or {}).get("b_simple"),
                note,
            ]
        )

    # agreement of the conventions' optima in c = 1 units, per N
    agreement, per_n = [], {}
    for n in batches:
        opts = {
            m: groups[(m, n)].search.best
            for m in modes
            if (m, n) in groups
            and groups[(m, n)].optimum is not None
            and not groups[(m, n)].search.edge
        }
        spread = _spread(list(opts.values())) if len(opts) == len(modes) else None
        per_n[n] = (opts, spread)
        agreement.append(
            [
                n,
                *(opts.get(m) for m in modes),
                f"{100 * spread:.2g}%" if spread is not None else "-",
                (spread <= tol) if spread is not None else "no optimum in range",
            ]
        )
    complete = [n for n, (_, s) in per_n.items() if s is not None]
    failing = [(n, s) for n, (_, s) in per_n.items() if s is not None and s > tol]
    missing = [n for n in batches if n not in complete]
    if not failing and not missing and complete:
        worst_n = max(complete, key=lambda n: per_n[n][1])
        worst = per_n[worst_n][1]
        verdict = (
            f"**In c = 1 units the {len(modes)} conventions' refined optima agree within "
            f"{100 * tol:g}% at every N** "
            + (
                f"(largest spread {100 * worst:.2g}%, at N = {worst_n})."
                if worst > 0
                else "(identical at every N)."
            )
        )
    else:
        parts = [f"N = {n}: spread {100 * s:.2g}%" for n, s in failing]
        parts += [f"N = {n}: an optimum missing or on an edge" for n in missing]
        verdict = (
            f"**In c = 1 units the conventions' refined optima do not agree within {100 * tol:g}%"
            f"** at {len(failing) + len(missing)} of {len(batches)} batch sizes ("
            + "; ".join(parts)
            + ")."
        )

    # the knee, on the per-N geometric mean of the conventions' optima
    pooled = [
        (n, math.exp(statistics.fmean(math.log(v) for v in opts.values())))
        for n, (opts, _) in per_n.items()
        if opts
    ]
    knee = fit_knee(pooled)
    noise = [
        (g.mode, g.n, g.optimum["summary"]["noise_scale"]["b_simple"])
        for g in order
        if g.optimum
        and g.n > 1
        and g.optimum["summary"].get("noise_scale")
        and finite(g.optimum["summary"]["noise_scale"].get("b_simple"))
    ]
    b_values = [v for _, _, v in noise]
    b_simple = statistics.median(b_values) if b_values else None
    b_simple_range = (min(b_values), max(b_values)) if b_values else None

    _plot_optima(study_dir, modes, order, knee, b_simple, b_simple_range)
    _plot_curves(study_dir, modes, groups, batches)

    same, same_count = _same_curve(groups, modes)
    lr = spec["lr"]
    text = [
        f"{spec['steps']} SGD steps per run. The search runs in c = 1 units (lr x c, the step per "
        "unit of the mean gradient G); each convention runs at (lr x c) / c. Per (convention, N): "
        f"a log grid of lr x c ({lr['per_decade']} per decade from {lr['low']:g} to "
        f"{lr['high']:g}), extended by one point while its best point is on an edge (at most "
        f"{spec['extend']} times), then {spec['refine_rounds']} golden-section probes between "
        "the best grid point's neighbours. Score: the final training-set loss; a run that blew "
        "up (NaN/inf, or ended above its initial loss) is worse than any finite loss. "
        "Optimum: the probe of lowest loss; bracket: the final interval around it. Divergence: "
        "the smallest lr x c that blew up above the largest that did not.",
        "",
        table(
            [
                "mode",
                "N",
                "c",
                "optimum lr x c",
                "bracket (lr x c)",
                "optimum lr (raw)",
                "probes",
                "final loss at optimum",
                "divergence lr x c",
                "B_simple at optimum",
                "note",
            ],
            rows,
        ),
        "",
        verdict,
        "",
        table(
            ["N", *(f"{m} optimum (lr x c)" for m in modes), "spread (max/min - 1)", "agree"],
            agreement,
        ),
        "",
    ]
    if same_count:
        word = "the same runs" if same <= SAME_CURVE else "not the same runs"
        text.append(
            f"At equal lr x c the conventions' final losses differ by at most {same:.2g} "
            f"(relative, over {same_count} shared probes where none blew up): {word} "
            f"(threshold {SAME_CURVE:g}), written in other units."
        )
    if knee:
        rng = knee.b_range()
        unc = (
            f" (±1 standard error from the fit's curvature, {knee.n - 2} degree(s) of "
            f"freedom: {rng[0]:.3g} to {rng[1]:.3g})"
            if rng
            else " (an exact fit through two points: no uncertainty)"
        )
        bound = " **B is at the end of the scanned range: the data do not constrain it.**"
        text.append(
            f"Fit of the optima (c = 1 units, geometric mean over the conventions at each of "
            f"{knee.n} batch sizes) to lr_opt(N) = lr_max/(1 + B/N): lr_max = {knee.lr_max:.3g}, "
            f"B = {knee.b:.3g}{unc}; the optima scatter about the fit by a factor "
            f"{math.exp(knee.rms_log):.3g} (root mean square in log lr)."
            + (bound if knee.at_bound else "")
        )
    if b_simple is not None:
        text.append(
            f"Measured B_simple at the optimum runs with N > 1 ({len(b_values)} runs, the "
            f"summary's `noise_scale.b_simple`): median {b_simple:.3g}, range "
            f"{b_simple_range[0]:.3g} to {b_simple_range[1]:.3g} (the spread over runs, "
            "not a statistical error: the noise scale moves as training proceeds)."
        )
    if knee and b_simple is not None:
        rng = knee.b_range() or (knee.b, knee.b)
        overlap = rng[0] <= b_simple_range[1] and b_simple_range[0] <= rng[1]
        text.append(
            f"Fitted B / median B_simple = {knee.b / b_simple:.2g}; the fit's range and the "
            f"measured range {'overlap' if overlap else 'do not overlap'}."
        )
    text += [
        "",
        "![optimal lr vs global batch](lr_vs_batch.png)",
        "",
        "Final loss against lr x c, every probe that did not blow up, one panel per N:",
        "",
        "![final loss vs lr x c](loss_vs_lr.png)",
    ]
    return "\n".join(text)


def _plot_optima(study_dir, modes, order, knee, b_simple, b_range) -> None:
    import matplotlib.pyplot as plt

    colors = {mode: f"C{i}" for i, mode in enumerate(modes)}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for k, mode in enumerate(modes):
        pts = [g for g in order if g.mode == mode and g.optimum]
        if not pts:
            continue
        shift = 1.06 ** (k - 1)  # side by side at each N
        for ax, c1 in ((axes[0], True), (axes[1], False)):
            scale = [1.0 if c1 else 1.0 / g.c for g in pts]
            ys = [g.search.best * k for g, k in zip(pts, scale, strict=True)]
            lo = [
                (g.search.best - (g.search.bracket[0] or g.search.best)) * k
                for g, k in zip(pts, scale, strict=True)
            ]
            hi = [
                ((g.search.bracket[1] or g.search.best) - g.search.best) * k
                for g, k in zip(pts, scale, strict=True)
            ]
            ax.errorbar(
                [g.n * shift for g in pts],
                ys,
                yerr=[lo, hi],
                fmt="o-",
                ms=4,
                capsize=3,
                color=colors[mode],
                label=f"{mode}" + (" (lr x c)" if c1 else " (raw lr)"),
            )
        bnd = [(g.n * shift, g.boundary / g.c) for g in pts if g.boundary]
        if bnd:
            axes[1].plot(
                *zip(*bnd, strict=True),
                "x--",
                color=colors[mode],
                alpha=0.6,
                label=f"{mode} diverges",
            )
    ns = sorted({g.n for g in order})
    if knee and ns:
        dense = [ns[0] * (ns[-1] / ns[0]) ** (i / 100) for i in range(101)]
        base = knee.at(ns[0])
        axes[0].plot(dense, [base * n / ns[0] for n in dense], ":", color="gray", label="linear")
        axes[0].plot(
            dense,
            [base * math.sqrt(n / ns[0]) for n in dense],
            "--",
            color="gray",
            label="square root",
        )
        axes[0].plot(
            dense,
            [knee.at(n) for n in dense],
            "-",
            color="black",
            alpha=0.6,
            label=f"fit lr_max/(1 + B/N), B = {knee.b:.3g}",
        )
        rng = knee.b_range()
        axes[0].axvline(knee.b, color="black", ls="-.", alpha=0.5)
        if rng:
            axes[0].axvspan(*rng, color="black", alpha=0.08, label="fitted B ±1 s.e.")
    if b_simple is not None:
        axes[0].axvline(b_simple, color="red", alpha=0.7, label=f"B_simple median {b_simple:.3g}")
        axes[0].axvspan(*b_range, color="red", alpha=0.08, label="B_simple range")
    titles = ("refined optimum, c = 1 units (bars: bracket)", "raw optimum lr, and divergence")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="global batch N", ylabel="lr", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "lr_vs_batch.png", dpi=110)
    plt.close(fig)


def _plot_curves(study_dir, modes, groups, batches) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    colors = {mode: f"C{i}" for i, mode in enumerate(modes)}
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 3.4), squeeze=False)
    for ax, n in zip(axes[0], batches, strict=True):
        for k, mode in enumerate(modes):
            g = groups.get((mode, n))
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
                    color=colors[mode],
                    ms=5 - 1.3 * k,
                    lw=2.5 - 0.7 * k,
                    label=mode,
                )
            if g.optimum:
                ax.axvline(g.search.best, color=colors[mode], alpha=0.4)
        ax.set(xscale="log", yscale="log", title=f"N = {n}", xlabel="lr x c")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].set_ylabel("final train loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "loss_vs_lr.png", dpi=110)
    plt.close(fig)
