"""Divergence threshold of full-batch GD on a quadratic vs 2(1+μ)/(c·λ_max), by bisection."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddp_reduce.config import load_config
from ddp_reduce.data import linear_problem
from ddp_reduce.reduction import LossReduction, ReduceOp, nominal_scale
from ddp_reduce.analysis.studies import blew_up, overrides_for
from ddp_reduce.run.compose import compose_config
from ddp_reduce.analysis.tables import table


def _setting(spec, mode: str) -> tuple[float, float]:
    """(lambda_max of H, c) for this study's data and a mode."""
    cfg = load_config(compose_config([*spec.common, *overrides_for(mode)])[0])
    lam = linear_problem(cfg.data).lambda_max(bias=True)
    w = cfg.dist.nproc
    n = cfg.data.global_batch_size
    loss, op = mode.split("/")
    c = nominal_scale(LossReduction[loss], ReduceOp[op], w, n // w, cfg.train.accum_steps)
    return lam, c


def _bisect(runner, row: str, base: list[str], labels: dict, lo: float, hi: float, n: int):
    """Geometric bisection of the stability threshold in [lo, hi]; every probe is a run."""

    def stable(lr: float, i: int) -> bool:
        summary = runner.run(f"{row}_{i:02d}", [*base, f"optim.lr={lr:.10g}"], lr=lr, **labels)
        return not blew_up(summary)

    if not stable(lo, 0) or stable(hi, 1):
        return  # the bracket does not hold: the analysis reports it
    for i in range(n):
        mid = math.sqrt(lo * hi)
        if stable(mid, i + 2):
            lo = mid
        else:
            hi = mid


def run(spec, runner) -> None:
    for mode in spec.modes:
        lam, c = _setting(spec, mode)
        for mu in spec.momentum:
            predicted = 2 * (1 + mu) / (c * lam)
            base = [
                *spec.common,
                f"train.steps={spec.steps}",
                *overrides_for(mode),
                f"optim.momentum={mu}",
            ]
            labels = {
                "mode": mode,
                "momentum": mu,
                "predicted": predicted,
                "c": c,
                "lambda_max": lam,
            }
            row = f"{mode.replace('/', '-')}_mu{mu:g}"
            _bisect(runner, row, base, labels, predicted / 4, predicted * 4, spec.bisection_steps)


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    rows = []
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        lab = r["labels"]
        groups.setdefault((lab["mode"], lab["momentum"]), []).append(r)
    for (mode, mu), group in groups.items():
        lab = group[0]["labels"]
        stable_lrs = [r["labels"]["lr"] for r in group if not blew_up(r["summary"])]
        unstable_lrs = [r["labels"]["lr"] for r in group if blew_up(r["summary"])]
        predicted = lab["predicted"]
        if not stable_lrs or not unstable_lrs:
            rows.append([mode, mu, lab["c"], predicted, None, None, None, None, "bracket failed"])
            continue
        lo, hi = max(stable_lrs), min(unstable_lrs)
        measured = math.sqrt(lo * hi)
        formula = {"1": "2(1+mu)/lambda", "W": "2(1+mu)/(W lambda)", "N": "2(1+mu)/(N lambda)"}
        which = "1" if lab["c"] == 1 else ("W" if mode == "mean/sum" else "N")
        rows.append(
            [
                mode,
                mu,
                lab["c"],
                predicted,
                lo,
                hi,
                f"[{lo / predicted:.4f}, {hi / predicted:.4f}]",
                measured / predicted,
                formula[which],
            ]
        )
    lam = runs[0]["labels"]["lambda_max"] if runs else float("nan")
    head = (
        f"Full batch (N = {runs[0]['summary'].get('global_batch_size') if runs else '?'}), "
        f"lambda_max(H) = {lam:.6g}. Each row bisects lr over [pred/4, 4 pred] "
        f"({spec['bisection_steps']} steps, {spec['steps']} GD steps per run); a run is stable "
        "if it ends below its initial loss. The measured threshold is the geometric middle of "
        "the last bracket [largest stable lr, smallest unstable lr].\n"
    )
    return (
        head
        + "\n"
        + table(
            [
                "mode",
                "momentum",
                "c",
                "predicted lr*",
                "largest stable",
                "smallest unstable",
                "bracket / predicted",
                "middle / predicted",
                "bound",
            ],
            rows,
        )
    )
