"""``ddp-reduce report DIR``: report.md, runs.csv and PNG plots for a study, a sweep or a run.

ddp-reduce report studies/lr_batch/2026-11-26_10-00-00     a study: its own analysis too
ddp-reduce report multirun/2026-11-26/10-00-00            a Hydra sweep
ddp-reduce report outputs/2026-11-26/10-00-00-123456      one run
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ddp_reduce.analysis.tables import table  # noqa: E402
from ddp_reduce.run.compose import override_key  # noqa: E402
from ddp_reduce.run.rundir import SUMMARY, read_metrics, read_refused  # noqa: E402
from ddp_reduce.run.summary import read_summary  # noqa: E402

REPORT = "report.md"
CSV = "runs.csv"
SPEC = "study.json"  # a study directory: its name, variant and sweep ...
INDEX = "runs.jsonl"  # ... and one record per run (name, overrides, labels, summary)
CSV_FIELDS = (
    "status",
    "reduce_loss",
    "reduce_op",
    "world_size",
    "local_batch_size",
    "accum_steps",
    "global_batch_size",
    "grad_scale",
    "grad_scale_exact",
    "steps_done",
    "diverged_at_step",
    "initial_train_loss",
    "final_train_loss",
    "final_eval_loss",
    "final_eval_accuracy",
    "steps_to_target",
    "wall_time_s",
)


def _measured_c(s: dict[str, Any]) -> Any:
    """c as the run's steps measured it, a range where it varied (tokens, ragged batches, a
    loss's own counts); the b*A-items figure where the run took no step."""
    low, high = s.get("grad_scale_range") or (None, None)
    if low is None or high is None:
        return s.get("grad_scale")
    return low if low == high else f"{low:g} to {high:g}"


def read_records(study_dir: Path) -> list[dict[str, Any]]:
    path = Path(study_dir) / INDEX
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _runs_of(path: Path) -> list[dict[str, Any]]:
    """Each run under ``path``: name, directory, config overrides (if known), summary.

    The runs of a Hydra sweep are named by the overrides that differ between them (what was
    swept), with those keys and values in ``labels``.
    """
    records = read_records(path)
    if records:
        return [{**r, "dir": path / "runs" / r["name"]} for r in records]
    if (path / SUMMARY).exists():
        candidates = [path]
    else:
        candidates = sorted((p.parent for p in path.glob("*/" + SUMMARY)), key=_sweep_order)
    runs = [
        {
            "name": p.name,
            "dir": p,
            "overrides": _hydra_overrides(p),
            "labels": {},
            "summary": _summary_of(p),
        }
        for p in candidates
    ]
    swept = swept_keys([r["overrides"] for r in runs])
    for r in runs:
        values = _override_values(r["overrides"])
        r["labels"] = {k: values.get(k) for k in swept}
        if swept:
            r["name"] = " ".join(f"{k}={values[k]}" for k in swept if k in values) or r["name"]
    return runs


UNREADABLE = "unreadable"  # a run whose summary.json cannot be read


def _summary_of(run_dir: Path) -> dict[str, Any]:
    """A run's summary; one that cannot be read is reported as such, not skipped."""
    try:
        summary = read_summary(run_dir)
        return summary.to_dict() if summary else {"status": UNREADABLE, "error": "no summary"}
    except (OSError, ValueError) as exc:
        return {"status": UNREADABLE, "error": str(exc)}


def _override_values(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key = override_key(o)
        if key is not None:
            out[key] = o.split("=", 1)[1]
    return out


def swept_keys(overrides: list[list[str]]) -> list[str]:
    """The keys whose value is not the same in every run (in the order first seen)."""
    if len(overrides) < 2:
        return []
    values = [_override_values(o) for o in overrides]
    keys = list(dict.fromkeys(k for v in values for k in v))
    return [k for k in keys if len({v.get(k) for v in values}) > 1]


def _sweep_order(run_dir: Path) -> tuple:
    """A sweep's points in Hydra's order: by the job number their folders start with."""
    num = run_dir.name.split("_", 1)[0]
    return (0, int(num), run_dir.name) if num.isdigit() else (1, len(run_dir.name), run_dir.name)


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    return list(yaml.safe_load(path.read_text()) or [])


def _write_csv(path: Path, runs: list[dict[str, Any]]) -> None:
    label_keys = sorted({k for r in runs for k in r.get("labels", {})})
    with open(path / CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *label_keys, *CSV_FIELDS, "overrides"])
        for r in runs:
            s = r["summary"]
            w.writerow(
                [
                    r["name"],
                    *(r["labels"].get(k) for k in label_keys),
                    *(s.get(k) for k in CSV_FIELDS),
                    " ".join(r.get("overrides", [])),
                ]
            )


def _loss_curves(path: Path, runs: list[dict[str, Any]], limit: int = 12) -> str | None:
    shown = [r for r in runs if read_metrics(r["dir"])][:limit]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in shown:
        points = [(m["step"], m["train/loss"]) for m in read_metrics(r["dir"]) if "train/loss" in m]
        points = [(s, v) for s, v in points if isinstance(v, float) and math.isfinite(v)]
        if points:
            ax.plot(*zip(*points, strict=True), label=r["name"])
    ax.set(xlabel="step", ylabel="train loss (all-reduced, per item)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "loss_curves.png"
    fig.savefig(path / name, dpi=110)
    plt.close(fig)
    return name


MAX_TABLE_ROWS = 200


def write_report(path: Path) -> Path:
    """Write report.md (with runs.csv and plots) into ``path`` and return its path."""
    path = Path(path)
    runs = _runs_of(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run (no {SUMMARY} in it or its sub-folders)")
    _write_csv(path, runs)
    parts = []
    spec_path = path / SPEC
    module = None
    failed = [r for r in runs if r["summary"].get("status") in ("failed", UNREADABLE)]
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        title = f"# Study: {spec['study']}" + (" (quick variant)" if spec["quick"] else "")
        module = importlib.import_module(f"ddp_reduce.analysis.studies.{spec['study']}")
        parts += [title, ""]
        if spec.get("common"):
            parts += [f"Overrides for every run: `{' '.join(spec['common'])}`.", ""]
        if len(failed) == len(runs):
            parts.append(f"**Every run failed ({len(runs)}): there is nothing to analyse.**")
        else:
            # common: the overrides for every run (README, "Extending": every analyze takes it)
            common = spec.get("common", [])
            parts.append(module.analyze(path, spec["spec"], runs, common=common))
    else:
        parts.append(f"# Runs in {path}")
        swept = list(runs[0]["labels"])
        if swept:
            fixed = _override_values(runs[0]["overrides"])
            same = [k for k in fixed if k not in swept]
            parts += [
                "",
                "Swept (each run's `.hydra/overrides.yaml`): "
                + ", ".join(f"`{k}`" for k in swept)
                + (
                    "; the same in every run: " + " ".join(f"`{k}={fixed[k]}`" for k in same)
                    if same
                    else ""
                )
                + ".",
            ]
    if failed:
        parts += [
            "",
            "## Failed runs",
            "",
            f"{len(failed)} of {len(runs)} runs failed or could not be read; each error's "
            "first line:",
            "",
            table(
                ["run", "error"],
                [
                    [
                        r["name"],
                        (str(r["summary"].get("error") or "?").strip().splitlines() or ["?"])[0],
                    ]
                    for r in failed
                ],
            ),
        ]
    refused = read_refused(path)
    if refused:
        parts += [
            "",
            "## Refused points",
            "",
            f"{len(refused)} points of the sweep were refused before they ran (no folder was "
            "left for them); each refusal:",
            "",
            table(["point", "error"], [[r["point"], r["error"]] for r in refused]),
        ]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["summary"].get("status", "?")] = counts.get(r["summary"].get("status", "?"), 0) + 1
    parts += [
        "",
        "## All runs",
        "",
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + (
            f"; {len(refused)} more point{'s' if len(refused) != 1 else ''} refused before "
            f"{'they' if len(refused) != 1 else 'it'} ran"
            if refused
            else ""
        )
        + f". Every run's numbers: [{CSV}]({CSV}); TensorBoard (HParams view): "
        f"`tensorboard --logdir {path} --host 127.0.0.1`.",
        "",
    ]
    extra = dict(getattr(module, "RUN_COLUMNS", {})) if module else {}
    swept = [] if module else list(runs[0]["labels"]) if runs else []
    rows = []
    for r in runs:
        s = r["summary"]
        rows.append(
            [
                r["name"],
                *(r["labels"].get(k) for k in swept),
                s.get("status"),
                *(fn(s) for fn in extra.values()),
                f"{s['reduce_loss']}/{s.get('reduce_op')}" if s.get("reduce_loss") else None,
                s.get("world_size"),
                s.get("global_batch_size"),
                _measured_c(s),
                s.get("final_train_loss"),
                s.get("final_eval_accuracy"),
            ]
        )
    header = [
        "run",
        *swept,
        "status",
        *extra,
        "loss/op",
        "W",
        "N",
        "c",
        "final train loss",
        "eval accuracy",
    ]
    if len(rows) <= MAX_TABLE_ROWS:
        parts.append(table(header, rows))
    else:
        parts.append(f"({len(rows)} runs: the table is in [{CSV}]({CSV}).)")
    curves = _loss_curves(path, runs) if not spec_path.exists() else None
    if curves:
        parts += ["", f"![training loss]({curves})"]
    text = "\n".join(parts) + "\n"
    (path / REPORT).write_text(text)
    return path / REPORT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ddp-reduce report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a study, sweep or run directory")
    a = p.parse_args(argv)
    if not a.path.is_dir():
        p.error(f"{a.path} is not a directory")
    try:
        out = write_report(a.path)
    except FileNotFoundError as exc:
        print(f"ddp-reduce: error: {exc}", file=sys.stderr)
        return 2
    print(f"ddp-reduce: report: {out}")
    unreadable = [r for r in _runs_of(a.path) if r["summary"].get("status") == UNREADABLE]
    for r in unreadable:
        print(f"ddp-reduce: error: run {r['name']}: {r['summary']['error']}", file=sys.stderr)
    return 1 if unreadable else 0
