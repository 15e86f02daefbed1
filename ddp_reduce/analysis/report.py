"""``ddp-reduce report DIR``: report.md, runs.csv and PNG plots for a study, a sweep or a run.

ddp-reduce report studies/lr_batch/2026-11-26_10-00-00     a study: its own analysis too
ddp-reduce report multirun/2026-11-26/10-00-00            a Hydra sweep
ddp-reduce report outputs/2026-11-26/10-00-00-123456      one run
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ddp_reduce.analysis.tables import table  # noqa: E402
from ddp_reduce.run.compose import override_key  # noqa: E402
from ddp_reduce.run.rundir import (  # noqa: E402
    SUMMARY,
    atomic_write,
    read_metrics,
    read_refused,
    read_regular,
    write_text,
)
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
    loss's own counts); the b*A-items figure where the run took no step. Marked where it is not
    exact: a mean of means over unequal counts is no constant multiple of G."""
    low, high = s.get("grad_scale_range") or (None, None)
    if low is None or high is None:
        c = s.get("grad_scale")
    else:
        c = low if low == high else f"{low:g} to {high:g}"
    return f"{c} (not exact)" if s.get("grad_scale_exact") is False and c is not None else c


UNREADABLE = "unreadable"  # a run whose summary.json cannot be read
SMALL_FILE_BYTES = 1 << 20  # overrides.yaml, study.json: a few hundred bytes each
INDEX_MAX_BYTES = 256 << 20
SCALAR = (str, int, float, bool, type(None))
# what the report reads of a summary, and the types it takes them as
TEXT_KEYS = ("status", "error", "reduce_loss", "reduce_op")


def _unreadable(error: str) -> dict[str, Any]:
    return {"status": UNREADABLE, "error": error}


def checked_summary(summary: Any, where: str) -> dict[str, Any]:
    """``summary`` where it has the shape of a run's summary (what the report reads of it),
    else an unreadable one naming the key and what it holds."""
    if not isinstance(summary, dict):
        return _unreadable(f"{where} holds a {type(summary).__name__}, not a run's summary")
    for key in TEXT_KEYS:
        if not isinstance(summary.get(key), (str, type(None))):
            return _unreadable(f"{where}: {key} is a {type(summary[key]).__name__}, not text")
    for key in CSV_FIELDS:
        if not isinstance(summary.get(key), SCALAR):
            return _unreadable(f"{where}: {key} is a {type(summary[key]).__name__}, not a value")
    scale_range = summary.get("grad_scale_range")
    if scale_range is not None and not (
        isinstance(scale_range, list)
        and len(scale_range) == 2
        and all(isinstance(x, (int, float, type(None))) for x in scale_range)
    ):
        return _unreadable(f"{where}: grad_scale_range is not a pair [low, high]")
    return summary


def read_records(study_dir: Path) -> list[dict[str, Any]]:
    """A study's ``runs.jsonl``: one record per run; a line that is not such a record is a run
    reported as unreadable."""
    path = Path(study_dir) / INDEX
    if not os.path.lexists(path):
        return []
    try:
        lines = read_regular(path, INDEX_MAX_BYTES).decode("utf-8", errors="replace")
    except ValueError as exc:
        return [_unreadable_record(f"{INDEX}", str(exc))]
    records = []
    for number, line in enumerate(lines.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):
            r = None
        fields = {"name": str, "overrides": list, "labels": dict}
        if not isinstance(r, dict) or not all(isinstance(r.get(k), t) for k, t in fields.items()):
            records.append(_unreadable_record(f"{INDEX} line {number}", "not a run's record"))
            continue
        if not all(isinstance(o, str) for o in r["overrides"]) or not _plain_name(r["name"]):
            records.append(_unreadable_record(f"{INDEX} line {number}", "not a run's record"))
            continue
        records.append({**r, "summary": checked_summary(r.get("summary"), f"{INDEX} {number}")})
    return records


def _plain_name(name: str) -> bool:
    """A run's folder name under ``runs/``: one folder, never a path out of it."""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _unreadable_record(name: str, error: str) -> dict[str, Any]:
    return {"name": name, "overrides": [], "labels": {}, "summary": _unreadable(error)}


def _runs_of(path: Path) -> list[dict[str, Any]]:
    """Each run under ``path``: name, directory, config overrides (if known), summary.

    The runs of a Hydra sweep are named by the overrides that differ between them (what was
    swept), with those keys and values in ``labels``.
    """
    records = read_records(path)
    if records:
        return [{**r, "dir": path / "runs" / r["name"]} for r in records]
    if os.path.lexists(path / SUMMARY):
        candidates = [path]
    else:
        found = (p.parent for p in path.glob("*/" + SUMMARY) if not p.parent.is_symlink())
        candidates = sorted(found, key=_sweep_order)
    runs = []
    for p in candidates:
        overrides, error = _hydra_overrides(p)
        summary = _summary_of(p) if error is None else _unreadable(error)
        runs.append(
            {"name": p.name, "dir": p, "overrides": overrides, "labels": {}, "summary": summary}
        )
    swept = swept_keys([r["overrides"] for r in runs])
    for r in runs:
        values = _override_values(r["overrides"])
        r["labels"] = {k: values.get(k) for k in swept}
        if swept:
            r["name"] = " ".join(f"{k}={values[k]}" for k in swept if k in values) or r["name"]
    return runs


def _summary_of(run_dir: Path) -> dict[str, Any]:
    """A run's summary; one that cannot be read is reported as such, not skipped."""
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError) as exc:
        return _unreadable(str(exc))
    if summary is None:
        return _unreadable("no summary")
    return checked_summary(summary.to_dict(), str(Path(run_dir) / SUMMARY))


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


def _hydra_overrides(run_dir: Path) -> tuple[list[str], str | None]:
    """The run's overrides (Hydra's ``.hydra/overrides.yaml``), and why they cannot be read
    (None where they can, or where there are none)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not os.path.lexists(path):
        return [], None
    import yaml

    try:
        overrides = yaml.safe_load(read_regular(path, SMALL_FILE_BYTES))
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        return [], f"{path} cannot be read: {str(exc).splitlines()[0]}"
    overrides = [] if overrides is None else overrides
    if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        return [], f"{path} is not a list of overrides"
    return overrides, None


def _write_csv(path: Path, runs: list[dict[str, Any]]) -> None:
    label_keys = sorted({k for r in runs for k in r.get("labels", {})})
    out = io.StringIO(newline="")
    w = csv.writer(out)
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
    write_text(path / CSV, out.getvalue())


def _loss_curves(path: Path, runs: list[dict[str, Any]], limit: int = 12) -> str | None:
    shown = [(r, read_metrics(r["dir"])) for r in runs if "dir" in r][: limit * 4]
    shown = [(r, m) for r, m in shown if m][:limit]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, metrics in shown:
        points = [(m["step"], m.get("train/loss")) for m in metrics]
        points = [(s, v) for s, v in points if isinstance(v, float) and math.isfinite(v)]
        if points:
            ax.plot(*zip(*points, strict=True), label=r["name"])
    ax.set(xlabel="step", ylabel="train loss (all-reduced, per item)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "loss_curves.png"
    atomic_write(path / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


MAX_TABLE_ROWS = 200


def _is_study(name: Any) -> bool:
    """Whether ``name`` names one of the studies' analysis modules (and nothing else)."""
    from importlib import resources

    if not (isinstance(name, str) and name.isidentifier() and not name.startswith("_")):
        return False
    return (resources.files("ddp_reduce.analysis.studies") / f"{name}.py").is_file()


def read_spec(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A study directory's ``study.json`` (None where there is none), and why it cannot be
    read (then the runs are reported as a plain set)."""
    spec_path = Path(path) / SPEC
    if not os.path.lexists(spec_path):
        return None, None
    try:
        spec = json.loads(read_regular(spec_path, SMALL_FILE_BYTES))
    except (ValueError, RecursionError) as exc:
        return None, f"{spec_path} cannot be read: {str(exc).splitlines()[0]}"
    if not (
        isinstance(spec, dict)
        and _is_study(spec.get("study"))
        and isinstance(spec.get("quick"), bool)
        and isinstance(spec.get("spec"), dict)
        and isinstance(spec.get("common", []), list)
        and all(isinstance(o, str) for o in spec.get("common", []))
    ):
        return None, f"{spec_path} is not a study's record (study, quick, spec, common)"
    return spec, None


def _study_part(path: Path, spec: dict, runs: list[dict], failed: list[dict], module) -> list[str]:
    """The study's title and its own analysis (``module``'s)."""
    title = f"# Study: {spec['study']}" + (" (quick variant)" if spec["quick"] else "")
    parts = [title, ""]
    if isinstance(spec.get("stopped"), str):
        parts += [
            f"**This study was stopped: {spec['stopped']}. What follows is computed from the "
            "runs it did, not from the whole study.**",
            "",
        ]
    if spec.get("common"):
        parts += [f"Overrides for every run: `{' '.join(spec['common'])}`.", ""]
    readable = [r for r in runs if r["summary"].get("status") != UNREADABLE]
    if len(failed) == len(runs):
        parts.append(f"**Every run failed ({len(runs)}): there is nothing to analyse.**")
    else:
        # common: the overrides for every run (README, "Extending": every analyze takes it)
        common = spec.get("common", [])
        parts.append(module.analyze(path, spec["spec"], readable, common=common))
    return parts


def _sweep_part(path: Path, runs: list[dict], spec_error: str | None) -> list[str]:
    """A sweep's (or a run's) title, and what was swept."""
    parts = [f"# Runs in {path}"]
    if spec_error:
        parts += ["", f"**{spec_error}; its runs are reported as a plain set.**"]
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
    return parts


def _failed_part(failed: list[dict], runs: list[dict]) -> list[str]:
    if not failed:
        return []
    first_lines = [
        [r["name"], (str(r["summary"].get("error") or "?").strip().splitlines() or ["?"])[0]]
        for r in failed
    ]
    return [
        "",
        "## Failed runs",
        "",
        f"{len(failed)} of {len(runs)} runs failed or could not be read; each error's first line:",
        "",
        table(["run", "error"], first_lines),
    ]


def _refused_part(refused: list[dict]) -> list[str]:
    if not refused:
        return []
    return [
        "",
        "## Refused points",
        "",
        f"{len(refused)} points of the sweep were refused before they ran (no folder was "
        "left for them); each refusal:",
        "",
        table(["point", "error"], [[r["point"], r["error"]] for r in refused]),
    ]


def _all_runs_part(path: Path, runs: list[dict], refused: list[dict], module) -> list[str]:
    """The count of runs by status, and one row per run."""
    counts: dict[str, int] = {}
    for r in runs:
        status = r["summary"].get("status") or "?"
        counts[status] = counts.get(status, 0) + 1
    n_refused = len(refused)
    parts = [
        "",
        "## All runs",
        "",
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + (
            f"; {n_refused} more point{'s' if n_refused != 1 else ''} refused before "
            f"{'they' if n_refused != 1 else 'it'} ran"
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
                *(fn(s) if s.get("status") != UNREADABLE else None for fn in extra.values()),
                f"{s['reduce_loss']}/{s.get('reduce_op')}" if s.get("reduce_loss") else None,
                s.get("world_size"),
                s.get("global_batch_size"),
                _measured_c(s),
                s.get("final_train_loss"),
                s.get("final_eval_accuracy"),
            ]
        )
    header = ["run", *swept, "status", *extra, "loss/op", "W", "N", "c"]
    header += ["final train loss", "eval accuracy"]
    if len(rows) <= MAX_TABLE_ROWS:
        parts.append(table(header, rows))
    else:
        parts.append(f"({len(rows)} runs: the table is in [{CSV}]({CSV}).)")
    return parts


def write_report(path: Path) -> Path:
    """Write report.md (with runs.csv and plots) into ``path`` and return its path. Every file
    is written under a temporary name and renamed: a symbolic link planted at one of these
    names is replaced, never written through."""
    path = Path(path)
    runs = _runs_of(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run (no {SUMMARY} in it or its sub-folders)")
    _write_csv(path, runs)
    spec, spec_error = read_spec(path)
    failed = [r for r in runs if r["summary"].get("status") in ("failed", UNREADABLE)]
    module = None
    if spec is not None:
        module = importlib.import_module(f"ddp_reduce.analysis.studies.{spec['study']}")
        parts = _study_part(path, spec, runs, failed, module)
    else:
        parts = _sweep_part(path, runs, spec_error)
    refused = read_refused(path)
    parts += _failed_part(failed, runs) + _refused_part(refused)
    parts += _all_runs_part(path, runs, refused, module)
    curves = _loss_curves(path, runs) if spec is None else None
    if curves:
        parts += ["", f"![training loss]({curves})"]
    write_text(path / REPORT, "\n".join(parts) + "\n")
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
    spec_error = read_spec(a.path)[1]
    if spec_error:
        print(f"ddp-reduce: error: {spec_error}", file=sys.stderr)
    unreadable = [r for r in _runs_of(a.path) if r["summary"].get("status") == UNREADABLE]
    for r in unreadable:
        print(f"ddp-reduce: error: run {r['name']}: {r['summary']['error']}", file=sys.stderr)
    return 1 if unreadable or spec_error else 0
