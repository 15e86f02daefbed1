"""B_simple over training, and steps to a target loss against the global batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import LogSearch, finite, minimize_log
from ddp_reduce.analysis.tables import table
from ddp_reduce.run.rundir import read_metrics

SETS = (
    "data.batch_size",
    "optim.lr",
    "train.steps",
    "train.target_loss",
    "train.eval_every",
)


def planned_runs(spec) -> int:
    return 1 + len(spec["global_batch"]) * len(spec["lr"])


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


def run(spec, runner) -> None:
    runner.run("trace", [*spec.common, *spec.trace], role="trace")
    for n in spec.global_batch:

        def probe(lr: float, n=n) -> tuple:
            summary = runner.run(
                f"N{n}_lr{lr:.3g}",
                [
                    *spec.common,
                    f"data.batch_size={n // 2}",
                    f"optim.lr={lr!r}",
                    f"train.steps={spec.max_steps}",
                    f"train.target_loss={spec.target_loss}",
                    f"train.eval_every={spec.eval_every}",
                ],
                role="target",
                global_batch=n,
                lr=lr,
            )
            return score(summary)

        minimize_log(probe, list(spec.lr), extend=spec.extend)


def searches(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[int, LogSearch | None]:
    """Each N's search, replayed from the recorded runs (None where a probe is missing)."""
    by: dict[int, dict[float, dict]] = {}
    for r in runs:
        if r["labels"]["role"] == "target":
            by.setdefault(r["labels"]["global_batch"], {})[r["labels"]["lr"]] = r["summary"]
    out = {}
    for n, probes in by.items():
        try:
            out[n] = minimize_log(
                lambda lr, probes=probes: score(probes[lr]), list(spec["lr"]), extend=spec["extend"]
            )
        except KeyError:
            out[n] = None
    return out


def fit_critical_batch(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of S = S_min + (S_min·B_crit)·(1/N): returns (S_min, B_crit)."""
    if len(points) < 2:
        return None
    xs = [1.0 / n for n, _ in points]
    ys = [s for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    s_min = my - slope * mx
    if s_min <= 0 or slope <= 0:
        return None
    return s_min, slope / s_min


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    import matplotlib.pyplot as plt

    trace = next((r for r in runs if r["labels"]["role"] == "trace"), None)
    curve = []
    if trace:
        curve = [
            (m["step"], m["noise/b_simple"])
            for m in read_metrics(trace["dir"])
            if finite(m.get("noise/b_simple"))
        ]
    found = searches(spec, runs)
    by_lr = {
        (r["labels"]["global_batch"], r["labels"]["lr"]): r["summary"]
        for r in runs
        if r["labels"]["role"] == "target"
    }
    best: dict[int, dict[str, Any]] = {}
    rows, edges = [], []
    for n in sorted(found):
        search = found[n]
        if search is None:
            rows.append([n, None, None, None, None, None, "probes missing"])
            continue
        s = by_lr[(n, search.best)]
        tried = sorted(search.scores)
        note = ""
        if search.edge:
            edges.append(n)
            note = f"**on the {search.edge} edge** of the lrs tried"
        elif search.extended:
            note = f"grid extended by {search.extended}"
        steps = s.get("steps_to_target")
        if steps is not None:
            best[n] = {
                "steps": steps,
                "lr": search.best,
                "b_simple": (s.get("noise_scale") or {}).get("b_simple"),
            }
        rows.append(
            [
                n,
                search.best if steps is not None else None,
                ", ".join(f"{lr:.3g}" for lr in tried),
                steps,
                n * steps if steps is not None else None,
                (s.get("noise_scale") or {}).get("b_simple"),
                note,
            ]
        )
    points = sorted((n, b["steps"]) for n, b in best.items())
    fit = fit_critical_batch(points)
    missing = sorted(set(spec["global_batch"]) - set(best))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if curve:
        axes[0].plot(*zip(*curve, strict=True), label="B_simple (online estimate)")
        if fit:
            axes[0].axhline(fit[1], color="red", ls="--", label=f"B_crit fit ~ {fit[1]:.0f}")
        axes[0].set(
            xlabel="step", ylabel="batch size", yscale="log", title="noise scale over training"
        )
        axes[0].legend(fontsize=8)
    if points:
        inner = [(n, v) for n, v in points if n not in edges]
        outer = [(n, v) for n, v in points if n in edges]
        if inner:
            axes[1].plot(*zip(*inner, strict=True), "o", label="steps to target (best lr)")
        if outer:
            axes[1].plot(
                *zip(*outer, strict=True),
                "o",
                mfc="none",
                label="best lr on an edge of those tried (an upper bound)",
            )
        if fit:
            ns = [n for n, _ in points]
            axes[1].plot(
                ns,
                [fit[0] * (1 + fit[1] / n) for n in ns],
                "-",
                label=f"S_min(1 + B_crit/N): S_min={fit[0]:.0f}, B_crit={fit[1]:.0f}",
            )
            axes[1].axvline(fit[1], color="red", ls="--", alpha=0.6)
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="global batch N",
            ylabel="steps to target",
            title=f"steps to train loss {spec['target_loss']}",
        )
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study_dir / "noise_scale.png", dpi=110)
    plt.close(fig)

    late = [v for s, v in curve[len(curve) // 2 :]] if curve else []
    b_simple = sorted(late)[len(late) // 2] if late else None
    # B_simple where the trace run's (all-reduced batch) loss first reaches the target: the
    # point of training that the steps-to-target fit describes
    at_target = None
    if trace:
        for m in read_metrics(trace["dir"]):
            if finite(m.get("train/loss")) and m["train/loss"] <= spec["target_loss"]:
                at_target = (m["step"], m.get("noise/b_simple"))
                break
    lines = [
        f"Target: loss {spec['target_loss']} on the whole training set (checked every "
        f"{spec['eval_every']} steps, at most {spec['max_steps']} steps); for each global batch "
        f"the best of lr in {list(spec['lr'])} (fewest steps to the target; among runs that "
        "miss it, the lowest final loss), the grid extended by one point at its spacing while "
        f"the best lr is on an edge of those tried (at most {spec['extend']} times). Perfect "
        "scaling is S ~ 1/N (examples N*S constant), saturation is S ~ S_min.",
        "",
        table(
            [
                "N",
                "best lr",
                "lrs tried",
                "steps to target",
                "examples (N x steps)",
                "B_simple at the end",
                "note",
            ],
            rows,
        ),
    ]
    if edges:
        lines += [
            "",
            f"**The best lr is on an edge of the lrs tried at N = {edges}**: the optimum may lie "
            "beyond it, and those steps to target are an upper bound.",
        ]
    if missing:
        lines += ["", f"Not reached within the step budget: N = {missing}."]
    lines.append("")
    if fit:
        lines.append(
            f"Fit S(N) = S_min (1 + B_crit/N): S_min = {fit[0]:.0f} steps, "
            f"B_crit = {fit[1]:.0f}. Regimes: N << B_crit perfect scaling, N ~ B_crit "
            "diminishing returns, N >> B_crit saturation."
        )
    else:
        lines.append("Too few batches reached the target to fit S(N).")
    if at_target and finite(at_target[1]):
        ratio = f" (B_crit / B_simple = {fit[1] / at_target[1]:.2f})" if fit else ""
        lines.append(
            f"B_simple when the trace run's training loss first reaches {spec['target_loss']} "
            f"(step {at_target[0]}): {at_target[1]:.0f}{ratio}. The noise scale grows as the "
            "loss falls, so B_crit is to be compared with B_simple at the target."
        )
    if b_simple:
        ratio = f" (B_crit / B_simple = {fit[1] / b_simple:.2f})" if fit else ""
        lines.append(
            f"B_simple over the second half of the trace run: median {b_simple:.0f}{ratio}."
        )
    lines += ["", "![noise scale](noise_scale.png)"]
    return "\n".join(lines)
