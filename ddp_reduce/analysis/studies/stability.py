"""Divergence threshold of full-batch GD on a quadratic vs theory, by bisection: heavy ball
2(1+μ)/(c·λ_max), Nesterov 2(1+μ)/(c·λ_max·(1+2μ))."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import (
    BLOW_UP_COLUMN,
    blew_up,
    finite,
    grad_scale_of,
    overrides_for,
)
from ddp_reduce.analysis.tables import table
from ddp_reduce.config import load_config
from ddp_reduce.data import linear_problem
from ddp_reduce.layer.reduction import LossReduction, ReduceOp, scale_symbol
from ddp_reduce.run.compose import compose_config

RUN_COLUMNS = {BLOW_UP_COLUMN: blew_up}
SETS = ("train.steps", "reduce.loss", "reduce.op", "optim.momentum", "optim.nesterov", "optim.lr")


def predicted_threshold(c: float, lam: float, momentum: float, nesterov: bool) -> float:
    """GD with factor c on a quadratic of largest curvature lambda is stable iff lr is below
    this: heavy ball 2(1+mu)/(c lambda), Nesterov 2(1+mu)/(c lambda (1+2mu)) (docs/design.md)."""
    bound = 2 * (1 + momentum) / (c * lam)
    return bound / (1 + 2 * momentum) if nesterov else bound


def _variants(spec) -> list[tuple[float, bool]]:
    return [(float(mu), False) for mu in spec["momentum"]] + [
        (float(mu), True) for mu in spec.get("nesterov", [])
    ]


def planned_runs(spec) -> int:
    return len(spec["modes"]) * len(_variants(spec)) * (2 + spec["bisection_steps"])


def _setting(spec, mode: str, common: list[str]) -> tuple[float, float]:
    """(lambda_max of H, c) for this study's data and a mode."""
    overrides = [*common, *spec.common, *overrides_for(mode)]
    cfg = load_config(compose_config(overrides)[0])
    return linear_problem(cfg.data).lambda_max(bias=True), grad_scale_of(overrides)


def _bisect(runner, row: str, base: list[str], labels: dict, lo: float, hi: float, n: int):
    """Geometric bisection of the stability threshold in [lo, hi]; every probe is a run."""

    def stable(lr: float, i: int) -> bool:
        summary = runner.run(f"{row}_{i:02d}", [*base, f"optim.lr={lr!r}"], lr=lr, **labels)
        return not blew_up(summary)

    if not stable(lo, 0) or stable(hi, 1):
        return  # the bracket does not hold: the analysis reports it
    for i in range(n):
        mid = math.sqrt(lo * hi)
        if stable(mid, i + 2):
            lo = mid
        else:
            hi = mid


def _variant_name(mu: float, nesterov: bool) -> str:
    if nesterov:
        return "Nesterov"
    return "heavy ball" if mu > 0 else "plain GD"


def run(spec, runner) -> None:
    for mode in spec.modes:
        lam, c = _setting(spec, mode, runner.common)
        for mu, nesterov in _variants(spec):
            predicted = predicted_threshold(c, lam, mu, nesterov)
            base = [
                *spec.common,
                f"train.steps={spec.steps}",
                *overrides_for(mode),
                f"optim.momentum={mu}",
                f"optim.nesterov={str(nesterov).lower()}",
            ]
            labels = {
                "mode": mode,
                "momentum": mu,
                "nesterov": nesterov,
                "predicted": predicted,
                "c": c,
                "lambda_max": lam,
            }
            row = f"{mode.replace('/', '-')}_mu{mu:g}" + ("_nesterov" if nesterov else "")
            _bisect(runner, row, base, labels, predicted / 4, predicted * 4, spec.bisection_steps)


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[str, float, bool], list[dict]]:
    groups: dict[tuple[str, float, bool], list[dict]] = {}
    for r in runs:
        lab = r["labels"]
        key = (lab["mode"], lab["momentum"], lab.get("nesterov", False))
        groups.setdefault(key, []).append(r)
    return groups


def thresholds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: the final bracket [largest stable, smallest unstable] and its geometric middle
    (None where the initial bracket [pred/4, 4 pred] did not hold)."""
    out = []
    for (mode, mu, nesterov), group in _groups(runs).items():
        lab = group[0]["labels"]
        stable_lrs = [r["labels"]["lr"] for r in group if not blew_up(r["summary"])]
        unstable_lrs = [r["labels"]["lr"] for r in group if blew_up(r["summary"])]
        lo = max(stable_lrs) if stable_lrs and unstable_lrs else None
        hi = min(unstable_lrs) if stable_lrs and unstable_lrs else None
        out.append(
            {
                "mode": mode,
                "momentum": mu,
                "nesterov": nesterov,
                "c": lab["c"],
                "lambda_max": lab["lambda_max"],
                "predicted": lab["predicted"],
                "largest_stable": lo,
                "smallest_unstable": hi,
                "measured": math.sqrt(lo * hi) if lo and hi else None,
                "runs": group,
            }
        )
    return out


def _bound(mode: str, c: float, nesterov: bool) -> str:
    loss, op = mode.split("/")
    symbol = "1" if c == 1 else scale_symbol(LossReduction[loss], ReduceOp[op])
    c_part = "" if symbol == "1" else f"{symbol} "
    if nesterov:
        return f"2(1+mu)/({c_part}lambda (1+2mu))"
    return f"2(1+mu)/({c_part}lambda)" if c_part else "2(1+mu)/lambda"


def _table_rows(rows_data: list[dict[str, Any]]) -> list[list]:
    rows = []
    for t in rows_data:
        variant = _variant_name(t["momentum"], t["nesterov"])
        pred = t["predicted"]
        if t["measured"] is None:
            rows.append(
                [t["mode"], variant, t["momentum"], t["c"], pred, None, None, None, None, None]
            )
            continue
        lo, hi = t["largest_stable"], t["smallest_unstable"]
        rows.append(
            [
                t["mode"],
                variant,
                t["momentum"],
                t["c"],
                pred,
                lo,
                hi,
                f"[{lo / pred:.4f}, {hi / pred:.4f}]",
                t["measured"] / pred,
                _bound(t["mode"], t["c"], t["nesterov"]),
            ]
        )
    return rows


def _summary(spec: dict[str, Any], rows_data: list[dict[str, Any]]) -> list[str]:
    done = [t for t in rows_data if t["measured"] is not None]
    failed = [t for t in rows_data if t["measured"] is None]
    summary = []
    if done:
        worst = max(done, key=lambda t: abs(t["measured"] / t["predicted"] - 1))
        inside = sum(t["largest_stable"] <= t["predicted"] <= t["smallest_unstable"] for t in done)
        deviation = 100 * abs(worst["measured"] / worst["predicted"] - 1)
        summary.append(
            f"\n**The measured threshold is within {deviation:.2g}% "
            f"of the prediction in all {len(done)} rows with a bracket** (largest deviation: "
            f"{worst['mode']}, {_variant_name(worst['momentum'], worst['nesterov'])}); the "
            f"prediction lies inside the final bracket in {inside} of {len(done)} rows, whose "
            f"width is a factor {16 ** (1 / 2 ** spec['bisection_steps']):.4g}."
        )
    if failed:
        summary.append(
            f"\n**The initial bracket did not hold in {len(failed)} rows** (the run at pred/4 "
            "blew up or the run at 4 pred did not): "
            + ", ".join(
                f"{t['mode']} {_variant_name(t['momentum'], t['nesterov'])}" for t in failed
            )
            + "."
        )
    return summary


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    rows_data = thresholds(runs)
    rows = _table_rows(rows_data)
    _plot(study_dir, spec, rows_data)
    lam = rows_data[0]["lambda_max"] if rows_data else float("nan")
    n_items = runs[0]["summary"].get("global_batch_size") if runs else None
    head = (
        f"Full batch (N = {n_items}), lambda_max(H) = {lam:.6g}. Each row bisects lr over "
        f"[pred/4, 4 pred] ({spec['bisection_steps']} steps, {spec['steps']} GD steps per run); "
        "a run blew up if its loss became NaN/inf or it ended above its initial loss (the "
        "column in the table of all runs). The measured threshold is the geometric middle of the "
        "last bracket [largest stable lr, smallest unstable lr]. Heavy ball and plain GD: "
        "2(1+mu)/(c lambda); Nesterov: 2(1+mu)/(c lambda (1+2mu)).\n"
    )
    summary = _summary(spec, rows_data)
    return (
        head
        + "\n"
        + table(
            [
                "mode",
                "variant",
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
        + "\n"
        + "\n".join(summary)
        + "\n\n![final loss vs lr / lr*](stability.png)"
    )


def _plot(study_dir: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    modes = list(spec["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), squeeze=False)
    axes = axes[0]
    initial = [
        r["summary"]["initial_train_loss"]
        for t in rows
        for r in t["runs"]
        if finite(r["summary"].get("initial_train_loss"))
    ]
    top = 1e3 * max(initial, default=1.0)  # losses above (and NaN/inf) are drawn here
    for t in rows:
        ax = axes[modes.index(t["mode"])]
        variants = [(mu, nv) for mu, nv in _variants(spec)]
        color = f"C{variants.index((t['momentum'], t['nesterov']))}"
        pts = sorted(
            (
                r["labels"]["lr"] / t["predicted"],
                r["summary"].get("final_train_loss"),
                blew_up(r["summary"]),
            )
            for r in t["runs"]
        )
        xs = [x for x, _, _ in pts]
        ys = [min(y, top) if finite(y) else top for _, y, _ in pts]
        label = f"{_variant_name(t['momentum'], t['nesterov'])}, mu={t['momentum']:g}"
        ax.plot(xs, ys, "-", color=color, alpha=0.5)
        ok = [(x, y) for (x, _, b), y in zip(pts, ys, strict=True) if not b]
        bad = [(x, y) for (x, _, b), y in zip(pts, ys, strict=True) if b]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o", color=color, ms=4, label=label + " stable")
        if bad:
            ax.plot(*zip(*bad, strict=True), "x", color=color, ms=6, label=label + " blew up")
    for ax, mode in zip(axes, modes, strict=True):
        c = next((t["c"] for t in rows if t["mode"] == mode), None)
        ax.axvline(1.0, color="black", ls="--", alpha=0.6, label="predicted threshold")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="lr / predicted lr*",
            title=f"{mode}, c = {c:g}" if c else mode,
        )
        ax.set_xticks([0.25, 0.5, 1, 2, 4], ["1/4", "1/2", "1", "2", "4"])
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel(f"final train loss (NaN/inf and > {top:.2g} at {top:.2g})")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(study_dir / "stability.png", dpi=110)
    plt.close(fig)
