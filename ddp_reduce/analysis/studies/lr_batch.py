"""Best learning rate and divergence boundary vs global batch, per reduction convention, over
several seeds.

The budget: the fewest steps to a target training loss (among runs that miss it, the lowest final
loss; a run that blew up is worse than any other), the definition of McCandlish et al.'s
critical-batch analysis. The search runs in c = 1 units: a learning rate lr x c is the same step
for every convention, so each convention runs at (lr x c) / c. For each (seed, convention, N): a
coarse log grid, extended by one point while its best point is on an edge, then golden-section
refinement between the best grid point's neighbours. Each optimum is reported as the median over
seeds with a 95% bootstrap interval.

A probe runs at most as many steps as the best probe of its search so far took to reach the
target (:func:`steps_search`: the optimum is the full budget's). The grid is probed from the
likeliest optimum outwards (the convention's optimum at the previous N, else the grid's middle),
so that the cap is set early; the order is the same for every convention, and so are the runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.intervals import Interval, median_interval
from ddp_reduce.analysis.studies import (
    BLOW_UP_COLUMN,
    LogSearch,
    blew_up,
    grad_scale_of,
    minimize_log,
    overrides_for,
    steps_search,
)
from ddp_reduce.analysis.tables import table

RUN_COLUMNS = {BLOW_UP_COLUMN: blew_up}
SETS = (
    "seed",
    "train.steps",
    "train.target_loss",
    "train.eval_every",
    "reduce.loss",
    "reduce.op",
    "dist.nproc",
    "data.batch_size",
    "optim.lr",
)
SAME_CURVE = 1e-3  # relative final-loss difference at equal lr x c called "the same run"


def lr_grid(low: float, high: float, per_decade: int) -> list[float]:
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (i / per_decade) for i in range(n + 1)]


def _grid(spec) -> list[float]:
    return lr_grid(spec["lr"]["low"], spec["lr"]["high"], spec["lr"]["per_decade"])


def planned_runs(spec) -> int:
    per_search = len(_grid(spec)) + spec["refine_rounds"]
    return len(spec["seeds"]) * len(spec["modes"]) * len(spec["global_batch"]) * per_search


def _base(spec, mode: str, n: int, seed: int) -> list[str]:
    world = 1 if n == 1 else 2
    return [
        *spec.common,
        f"seed={seed}",
        f"train.target_loss={spec.target_loss}",
        f"train.eval_every={spec.eval_every}",
        *overrides_for(mode),
        f"dist.nproc={world}",
        f"data.batch_size={n // world}",
    ]


def score(summary: dict[str, Any]) -> tuple:
    """Reached the target (fewer steps, then lower loss, first), then missed it (lower final loss
    first), then blew up or failed."""
    if blew_up(summary):
        return (2, 0, 0.0)
    steps = summary.get("steps_to_target")
    if steps is None:
        return (1, 0, summary["final_train_loss"])
    return (0, steps, summary["final_train_loss"])


def run(spec, runner) -> None:
    grid = _grid(spec)
    for seed in spec.seeds:
        for mode in spec.modes:
            previous = None
            for n in spec.global_batch:
                base = _base(spec, mode, n, seed)
                c = grad_scale_of([*runner.common, *base])
                probes = iter(range(10**6))

                def probe(
                    lr_c1: float,
                    steps: int,
                    base=base,
                    c=c,
                    mode=mode,
                    n=n,
                    seed=seed,
                    probes=probes,
                ) -> tuple:
                    lr = lr_c1 / c
                    summary = runner.run(
                        f"s{seed}_{mode.replace('/', '-')}_N{n}_{next(probes):02d}_lrc{lr_c1:.4g}",
                        [*base, f"optim.lr={lr!r}", f"train.steps={steps}"],
                        seed=seed,
                        mode=mode,
                        global_batch=n,
                        c=c,
                        lr=lr,
                        lr_c1=lr_c1,
                        steps=steps,
                    )
                    return score(summary)

                _, previous = steps_search(probe, grid, spec, previous)


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
    seed: int
    mode: str
    n: int
    c: float
    search: LogSearch | None  # None: the recorded probes do not replay (an incomplete study)
    runs: dict[float, dict[str, Any]]  # lr x c -> run

    @property
    def optimum(self) -> dict[str, Any] | None:
        """The best run, if it reached the target and its lr is not on an edge of those tried."""
        if self.search is None or self.search.best is None or self.search.edge:
            return None
        run = self.runs[self.search.best]
        return run if score(run["summary"])[0] == 0 else None

    @property
    def boundary(self) -> float | None:
        """The smallest lr x c that blew up above the largest one that did not."""
        ok = [x for x, r in self.runs.items() if not blew_up(r["summary"])]
        top = max(ok, default=None)
        return min(
            (x for x, r in self.runs.items() if blew_up(r["summary"]) and (top is None or x > top)),
            default=None,
        )


def _groups(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[tuple[int, str, int], Group]:
    """Each (seed, convention, N)'s search, replayed from the recorded runs."""
    by: dict[tuple[int, str, int], dict[float, dict]] = {}
    for r in runs:
        lab = r["labels"]
        by.setdefault((lab.get("seed", 0), lab["mode"], lab["global_batch"]), {})[lab["lr_c1"]] = r
    grid = _grid(spec)
    out = {}
    for (seed, mode, n), probes in by.items():
        first = next(iter(probes.values()))

        def recorded(x: float, probes=probes) -> tuple:
            return score(probes[x]["summary"])

        try:
            search = minimize_log(
                recorded, grid, extend=spec["extend"], rounds=spec["refine_rounds"]
            )
        except KeyError:
            search = None
        out[(seed, mode, n)] = Group(seed, mode, n, first["labels"]["c"], search, probes)
    return out


@dataclass
class Optima:
    """Per (convention, N): the optimum lr x c over seeds (None where a seed has none)."""

    modes: list[str]
    seeds: list[int]
    batches: list[int]
    c: dict[tuple[str, int], float]
    per_seed: dict[tuple[str, int], list[float | None]]
    # the widest final search bracket (hi / lo) over the seeds: the search's own resolution
    resolution: dict[tuple[str, int], float | None]

    def interval(self, mode: str, n: int) -> Interval | None:
        values = [v for v in self.per_seed.get((mode, n), []) if v is not None]
        return median_interval(values) if len(values) == len(self.seeds) else None

    def pooled(self, seed_index: int) -> list[tuple[int, float]]:
        """One seed's optima per N, the geometric mean over conventions (all of them present)."""
        out = []
        for n in self.batches:
            vals = [
                self.per_seed.get((m, n), [None] * len(self.seeds))[seed_index] for m in self.modes
            ]
            if all(v is not None for v in vals):
                out.append((n, math.exp(statistics.fmean(math.log(v) for v in vals))))
        return out


def optima(spec: dict[str, Any], groups: dict[tuple[int, str, int], Group]) -> Optima:
    seeds, modes = list(spec["seeds"]), list(spec["modes"])
    batches = sorted({n for _, _, n in groups})
    per_seed, c, resolution = {}, {}, {}
    for m in modes:
        for n in batches:
            gs = [groups.get((s, m, n)) for s in seeds]
            per_seed[(m, n)] = [g.search.best if g and g.optimum else None for g in gs]
            c[(m, n)] = next((g.c for g in gs if g), math.nan)
            widths = [g.search.bracket[1] / g.search.bracket[0] for g in gs if g and g.optimum]
            resolution[(m, n)] = max(widths, default=None)
    return Optima(modes, seeds, batches, c, per_seed, resolution)


def _same_curve(groups: dict[tuple[int, str, int], Group], modes: list[str]) -> tuple[float, int]:
    """Largest relative final-loss difference between conventions at equal lr x c (probes where
    none blew up and all ran the same steps), and how many such points there are."""
    worst, count = 0.0, 0
    for seed, n in sorted({(s, n) for s, _, n in groups}):
        present = [groups[(seed, m, n)] for m in modes if (seed, m, n) in groups]
        if len(present) < 2:
            continue
        shared = set.intersection(*(set(g.runs) for g in present))
        for x in shared:
            runs = [g.runs[x]["summary"] for g in present]
            if any(blew_up(s) for s in runs) or len({s.get("steps_done") for s in runs}) > 1:
                continue  # blew up, or stopped at other steps (see run: the cap)
            losses = [s["final_train_loss"] for s in runs]
            worst = max(worst, (max(losses) - min(losses)) / min(losses))
            count += 1
    return worst, count


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    from ddp_reduce.analysis.studies import lr_batch_report as rep

    modes = list(spec["modes"])
    groups = _groups(spec, runs)
    opt = optima(spec, groups)
    pooled = rep.pooled_intervals(opt)
    knee_text, knee = rep.knee_lines(opt, groups, fit_knee)
    rep.plot_optima(study_dir, opt, knee)
    rep.plot_curves(study_dir, groups, modes, opt.seeds[0])
    same, count = _same_curve(groups, modes)
    text = [
        rep.method_text(spec),
        "",
        table(*rep.optimum_rows(opt)),
        "",
        *rep.agreement_lines(groups, opt, spec["agree_within"]),
        "",
        *rep.monotonic_lines(pooled),
        "",
        *rep.same_curve_line(same, count, SAME_CURVE),
        *knee_text,
        "",
        "Sum vs mean: the optimal raw lr per convention, and the same optima in c = 1 units "
        "(bars: 95% interval over seeds):",
        "",
        "![optimal lr vs global batch](lr_vs_batch.png)",
        "",
        f"The loss at each probe's last step against lr x c, every probe of seed {opt.seeds[0]} "
        "that did not blow up, one panel per N:",
        "",
        "![final loss vs lr x c](loss_vs_lr.png)",
        "",
        "Every search:",
        "",
        table(*rep.search_rows(groups, modes)),
    ]
    return "\n".join(text)
