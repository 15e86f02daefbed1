"""B_simple over training, and steps to a target loss against the global batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import finite
from ddp_reduce.analysis.tables import table
from ddp_reduce.run.rundir import read_metrics


def run(spec, runner) -> None:
    runner.run("trace", [*spec.common, *spec.trace], role="trace")
    for n in spec.global_batch:
        for lr in spec.lr:
            runner.run(
                f"N{n}_lr{lr:g}",
                [
                    *spec.common,
                    f"data.batch_size={n // 2}",
                    f"optim.lr={lr}",
                    f"train.steps={spec.max_steps}",
                    f"train.target_loss={spec.target_loss}",
                    f"train.eval_every={spec.eval_every}",
                ],
                role="target",
                global_batch=n,
                lr=lr,
            )


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


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    trace = next((r for r in runs if r["labels"]["role"] == "trace"), None)
    curve = []
    if trace:
        curve = [
            (m["step"], m["noise/b_simple"])
            for m in read_metrics(trace["dir"])
            if finite(m.get("noise/b_simple"))
        ]
    best: dict[int, dict[str, Any]] = {}
    for r in runs:
        if r["labels"]["role"] != "target":
            continue
        s, n = r["summary"], r["labels"]["global_batch"]
        steps = s.get("steps_to_target")
        if steps is not None and (n not in best or steps < best[n]["steps"]):
            best[n] = {
                "steps": steps,
                "lr": r["labels"]["lr"],
                "b_simple": (s.get("noise_scale") or {}).get("b_simple"),
            }
    points = sorted((n, b["steps"]) for n, b in best.items())
    fit = fit_critical_batch(points)
    rows = [
        [n, b["lr"], b["steps"], n * b["steps"], b["b_simple"]] for n, b in sorted(best.items())
    ]
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
        axes[1].plot(*zip(*points, strict=True), "o", label="steps to target (best lr)")
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
        f"the best of lr in {list(spec['lr'])}. Perfect scaling is S ~ 1/N (examples N*S "
        "constant), saturation is S ~ S_min.",
        "",
        table(
            ["N", "best lr", "steps to target", "examples (N x steps)", "B_simple at the end"], rows
        ),
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
