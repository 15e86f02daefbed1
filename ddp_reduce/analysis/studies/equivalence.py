"""Each claim of docs/design.md §2 against its c = 1 twin: predicted and measured verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_reduce.analysis.studies import finite, relative_weight_difference
from ddp_reduce.analysis.tables import table


def _key(overrides: list[str]) -> str:
    return "|".join(overrides)


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


def analyze(study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    by_key = {r["labels"]["key"]: r for r in runs}
    steps = f"train.steps={spec['steps']}"
    rows, agree = [], 0
    for row in spec["rows"]:
        subject = by_key.get(_key([*spec["common"], steps, *row["subject"]]))
        twin = by_key.get(_key([*spec["common"], steps, *row["twin"]]))
        if subject is None or twin is None:
            continue
        r = relative_weight_difference(subject["dir"], twin["dir"])
        measured = _measured(r, spec)
        ok = measured == row["predicted"]
        agree += ok
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
        f"Each row runs a setting (subject) and its c = 1 twin for {spec['steps']} steps and "
        f"compares the final weights: r = max|w - w_twin| / max|w_twin|. Measured verdict: "
        f"exact if r <= {spec['exact_below']:g}, approximate if r <= {spec['approx_below']:g}, "
        f"else differs.\n\n**{agree} of {len(rows)} rows agree with the prediction.**\n"
    )
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
    )
