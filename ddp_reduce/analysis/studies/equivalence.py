"""Each claim of docs/design.md §2 against its twin (the c = 1 run, or the same run under DDP
for a sharded row): predicted and measured verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import finite, relative_weight_difference
from ddp_reduce.analysis.tables import table


def _key(overrides: list[str]) -> str:
    return "|".join(overrides)


SETS = ("train.steps",)
BITWISE_FLOOR = 1e-12  # where r = 0 (bitwise equal weights) is drawn on the log axis


def planned_runs(spec) -> int:
    keys = {
        _key([*spec["common"], f"train.steps={spec['steps']}", *row[role]])
        for row in spec["rows"]
        for role in ("subject", "twin")
    }
    return len(keys)


def run(spec, runner) -> None:
    steps = f"train.steps={spec.steps}"
    done: dict[str, str] = {}  # twins shared by several rows run once
    for row in spec.rows:
        for role in ("subject", "twin"):
            overrides = [*spec.common, steps, *row[role]]
            key = _key(overrides)
            if key in done:
                continue
            name = f"{row.name}.{role}"
            runner.run(name, overrides, key=key)
            done[key] = name


def _measured(r: float | None, spec: dict) -> str:
    if r is None:
        return "no result"
    if r <= spec["exact_below"]:
        return "exact"
    return "approximate" if r <= spec["approx_below"] else "differs"


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:
    by_key = {r["labels"]["key"]: r for r in runs}
    steps = f"train.steps={spec['steps']}"
    rows, agree, plotted = [], 0, []
    for row in spec["rows"]:
        subject = by_key.get(_key([*spec["common"], steps, *row["subject"]]))
        twin = by_key.get(_key([*spec["common"], steps, *row["twin"]]))
        if subject is None or twin is None:
            continue
        r = relative_weight_difference(subject["dir"], twin["dir"])
        measured = _measured(r, spec)
        ok = measured == row["predicted"]
        agree += ok
        plotted.append((row["name"], r, row["predicted"], ok))
        ds, dt = subject["summary"], twin["summary"]
        dloss = None
        if finite(ds.get("final_train_loss")) and finite(dt.get("final_train_loss")):
            dloss = ds["final_train_loss"] - dt["final_train_loss"]
        rows.append(
            [
                row["name"],
                row["claim"],
                ds.get("grad_scale"),
                dt.get("grad_scale"),
                r,
                dloss,
                row["predicted"],
                measured,
                "yes" if ok else "**NO**",
            ]
        )
    head = (
        f"Each row runs a setting (subject) and its twin (the c = 1 run; for the fsdp_* rows, "
        f"the same setting under DDP) for {spec['steps']} steps and compares the final "
        f"weights: r = max|w - w_twin| / max|w_twin|. Measured verdict: "
        f"exact if r <= {spec['exact_below']:g}, approximate if r <= {spec['approx_below']:g}, "
        f"else differs.\n\n**{agree} of {len(rows)} rows agree with the prediction.**\n"
    )
    _plot(study_dir, spec, plotted)
    return (
        head
        + "\n"
        + table(
            [
                "row",
                "claim",
                "c (subject)",
                "c (twin)",
                "max|dw| / max|w|",
                "final loss diff",
                "predicted",
                "measured",
                "agree",
            ],
            rows,
        )
        + f"\n\n![r per row](equivalence.png)\n\nr = 0 (bitwise equal weights) is drawn at "
        f"{BITWISE_FLOOR:g}."
    )


def _plot(study_dir: Path, spec: dict[str, Any], plotted: list[tuple]) -> None:
    import matplotlib.pyplot as plt

    colors = {"exact": "C2", "approximate": "C1", "differs": "C3"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(plotted) + 1.6))
    ys = list(range(len(plotted)))[::-1]
    for y, (_, r, predicted, ok) in zip(ys, plotted, strict=True):
        x = BITWISE_FLOOR if r is not None and r <= BITWISE_FLOOR else r
        if x is None:
            continue
        ax.plot(
            x,
            y,
            "o" if ok else "X",
            ms=7 if ok else 10,
            color=colors.get(predicted, "C0"),
            mec="black" if not ok else None,
        )
    for name, color in colors.items():
        ax.plot([], [], "o", color=color, label=f"predicted {name}")
    ax.plot([], [], "X", color="gray", mec="black", ms=9, label="measured verdict disagrees")
    ax.axvline(spec["exact_below"], color="black", ls="--", alpha=0.6)
    ax.axvline(spec["approx_below"], color="black", ls=":", alpha=0.6)
    ax.axvspan(BITWISE_FLOOR / 3, spec["exact_below"], color="C2", alpha=0.07)
    ax.axvspan(spec["exact_below"], spec["approx_below"], color="C1", alpha=0.07)
    ax.axvspan(spec["approx_below"], 10, color="C3", alpha=0.07)
    ax.set_yticks(ys, [name for name, *_ in plotted], fontsize=8)
    ax.set(
        xscale="log",
        xlim=(BITWISE_FLOOR / 3, 10),
        xlabel=f"r = max|w - w_twin| / max|w_twin| (0 drawn at {BITWISE_FLOOR:g})\n"
        f"exact <= {spec['exact_below']:g} < approximate <= {spec['approx_below']:g} < differs",
        title="each setting against its twin (c = 1, or DDP for fsdp_*)",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(study_dir / "equivalence.png", dpi=110)
    plt.close(fig)
