"""The critical batch of one workload measured three ways, over several seeds.

(a) McCandlish et al.'s trade-off: steps S to a target loss at each global batch N with the best
    lr per N, fitted to S = S_min(1 + B_crit/N), i.e. (S/S_min − 1)(E/E_min − 1) = 1;
(b) the noise scales: B_simple = tr(Σ)/|G|² online, and B_noise = tr(HΣ)/(GᵀHG) from
    Hessian-vector products at the trace run's checkpoints;
(c) the knee of the refined best lr: lr_opt(N) = lr_max/(1 + B/N).
Each is computed per seed; the report gives the median over seeds with a 95% bootstrap interval.
The searches for the best lr stop a probe at the steps of the best so far (``steps_search``: the
optimum is the full budget's), probing from the previous N's best lr outwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_reduce.analysis.critical_batch import fit_tradeoff
from ddp_reduce.analysis.intervals import Interval, median_interval
from ddp_reduce.analysis.studies import LogSearch, finite, minimize_log, steps_search
from ddp_reduce.analysis.studies.lr_batch import fit_knee
from ddp_reduce.analysis.studies.noise_report import (
    checkpoint_noise,
    checkpoint_rows,
    comparison_lines,
    method_lines,
    plot,
    search_rows,
)
from ddp_reduce.analysis.tables import table
from ddp_reduce.run.rundir import read_metrics

SETS = (
    "seed",
    "data.batch_size",
    "optim.lr",
    "train.steps",
    "train.target_loss",
    "train.eval_every",
)


def planned_runs(spec) -> int:
    per_n = len(spec["lr"]) + spec["refine_rounds"]
    return len(spec["seeds"]) * (1 + len(spec["global_batch"]) * per_n)


def score(summary: dict[str, Any]) -> tuple:
    """Reached the target (fewer steps, then lower loss, first), then not reached (lower final
    loss first), then blew up or failed."""
    loss = summary.get("final_train_loss")
    if summary.get("status") != "completed" or not finite(loss):
        return (2, 0, 0.0)
    steps = summary.get("steps_to_target")
    if steps is None:
        return (1, 0, loss)
    return (0, steps, loss)


def _target_run(spec, n: int, lr: float, seed: int, steps: int) -> list[str]:
    return [
        *spec.common,
        f"seed={seed}",
        f"data.batch_size={n // 2}",
        f"optim.lr={lr!r}",
        f"train.steps={steps}",
        f"train.target_loss={spec.target_loss}",
        f"train.eval_every={spec.eval_every}",
    ]


def run(spec, runner) -> None:
    for seed in spec.seeds:
        runner.run(
            f"s{seed}_trace", [*spec.common, *spec.trace, f"seed={seed}"], role="trace", seed=seed
        )
        previous = None
        for n in spec.global_batch:
            probes = iter(range(10**6))

            def probe(lr: float, steps: int, n=n, seed=seed, probes=probes) -> tuple:
                summary = runner.run(
                    f"s{seed}_N{n}_{next(probes):02d}_lr{lr:.4g}",
                    _target_run(spec, n, lr, seed, steps),
                    role="target",
                    global_batch=n,
                    lr=lr,
                    seed=seed,
                    steps=steps,
                )
                return score(summary)

            _, previous = steps_search(probe, list(spec.lr), spec, previous)


def searches(
    spec: dict[str, Any], runs: list[dict[str, Any]]
) -> dict[tuple[int, int], LogSearch | None]:
    """Each (seed, N)'s search, replayed from the recorded runs (None where a probe is missing)."""
    by: dict[tuple[int, int], dict[float, dict]] = {}
    for r in runs:
        lab = r["labels"]
        if lab["role"] == "target":
            by.setdefault((lab.get("seed", 0), lab["global_batch"]), {})[lab["lr"]] = r["summary"]
    out = {}
    for key, probes in by.items():
        try:
            out[key] = minimize_log(
                lambda lr, probes=probes: score(probes[lr]),
                list(spec["lr"]),
                extend=spec["extend"],
                rounds=spec.get("refine_rounds", 0),
            )
        except KeyError:
            out[key] = None
    return out


def _at_target(trace: dict[str, Any], target: float) -> tuple[int, float] | None:
    """(step, online B_simple) where the trace run's training loss first reaches the target."""
    for m in read_metrics(trace["dir"]):
        if finite(m.get("train/loss")) and m["train/loss"] <= target:
            b = m.get("noise/b_simple")
            return (m["step"], b) if finite(b) else None
    return None


def per_seed(spec, runs, found) -> dict[int, dict[str, Any]]:
    """Each seed's three measurements: trade-off fit, noise scales at the target, knee fit."""
    out: dict[int, dict[str, Any]] = {}
    for seed in spec["seeds"]:
        best = {}
        for (s, n), search in found.items():
            if s == seed and search is not None and not search.edge:
                steps = search.scores[search.best]
                if steps[0] == 0:
                    best[n] = (steps[1], search.best)
        trace = next(
            (
                r
                for r in runs
                if r["labels"]["role"] == "trace" and r["labels"].get("seed", 0) == seed
            ),
            None,
        )
        at = _at_target(trace, spec["target_loss"]) if trace else None
        ckpt = checkpoint_noise(trace, spec.get("hessian_items")) if trace else []
        near = min(ckpt, key=lambda c: abs(c["step"] - at[0])) if ckpt and at else None
        out[seed] = {
            "best": best,
            "tradeoff": fit_tradeoff(sorted((n, s) for n, (s, _) in best.items())),
            "knee": fit_knee(sorted((n, lr) for n, (_, lr) in best.items())),
            "at_target": at,
            "checkpoints": ckpt,
            "near": near,
        }
    return out


def estimates(seeds: dict[int, dict[str, Any]]) -> dict[str, Interval | None]:
    """The median over seeds of each critical-batch figure, with its bootstrap interval."""

    def over(values):
        values = [v for v in values if finite(v)]
        return median_interval(values) if values else None

    s = list(seeds.values())
    usable = [v["tradeoff"] for v in s if v["tradeoff"] and not v["tradeoff"].at_bound]
    knees = [v["knee"] for v in s if v["knee"] and not v["knee"].at_bound]
    return {
        "tradeoff": over([f.b_crit for f in usable]),
        "s_min": over([f.s_min for f in usable]),
        "knee": over([k.b for k in knees]),
        "b_simple": over([v["at_target"][1] for v in s if v["at_target"]]),
        "b_noise": over([v["near"]["b_noise"] for v in s if v["near"]]),
        "b_simple_exact": over([v["near"]["b_simple"] for v in s if v["near"]]),
    }


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    found = searches(spec, runs)
    seeds = per_seed(spec, runs, found)
    est = estimates(seeds)
    rows, edges = search_rows(spec, found)
    plot(study_dir, spec, runs, seeds, est)
    lines = [*method_lines(spec), "", table(*rows)]
    if edges:
        lines += [
            "",
            f"**The best lr is on an edge of the lrs tried at (seed, N) = {edges}**: those points "
            "are left out of the fits (their steps are an upper bound).",
        ]
    lines += ["", *comparison_lines(spec, seeds, est), "", "![noise scale](noise_scale.png)"]
    lines += [
        "",
        "The noise scales at the trace runs' checkpoints:",
        "",
        table(*checkpoint_rows(seeds)),
    ]
    return "\n".join(lines)
