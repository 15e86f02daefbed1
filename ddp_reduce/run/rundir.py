"""What a run leaves behind: resolved config, metrics (TensorBoard, JSON lines), summary, weights.

Only rank 0 writes; the other ranks get a logger that does nothing. Files that mark a result
(``summary.json``, ``model.pt``) are written to a temporary name and renamed, so a crash never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
MODEL = "model.pt"
TB_DIR = "tb"


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)``, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


NONFINITE = "nonfinite"  # {key: "nan" | "inf" | "-inf"} of the values written as null


def _json_safe(x: Any, flags: dict[str, str], path: str = "") -> Any:
    """JSON has no NaN or infinity: such a number is written as null, and ``flags`` records
    which it was under its dotted key, so null never hides what happened."""
    if isinstance(x, float) and not math.isfinite(x):
        flags[path] = str(x)
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v, flags, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, flags, f"{path}[{i}]") for i, v in enumerate(x)]
    return x


def json_ready(obj: dict) -> dict:
    """``obj`` with its non-finite numbers as null, flagged under ``nonfinite``."""
    flags: dict[str, str] = {}
    safe = _json_safe(obj, flags)
    if flags:
        safe[NONFINITE] = flags
    return safe


def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(json_ready(obj), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_config(run_dir: Path, cfg: dict) -> None:
    text = yaml.safe_dump(cfg, sort_keys=False)
    atomic_write(run_dir / CONFIG, lambda tmp: tmp.write_text(text))


def save_model(run_dir: Path, state_dict: dict) -> None:
    atomic_write(run_dir / MODEL, lambda tmp: torch.save(state_dict, tmp))


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    return json.loads(path.read_text())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [record for _, record in _records(path)] if path.exists() else []


def clear_results(run_dir: Path) -> None:
    """Remove a previous run's results (asked for with train.overwrite=true)."""
    import shutil

    for name in (SUMMARY, MODEL, METRICS):
        (run_dir / name).unlink(missing_ok=True)
    for folder in (TB_DIR, "checkpoints"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist_name in ("ddp-reduce", "torch", "hydra-core", "omegaconf", "tensorboard", "numpy"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


# Metrics that TensorBoard's custom-scalars dashboard groups across the runs of a sweep.
GROUPED = {
    "train/loss": "train_loss",
    "eval/loss": "eval_loss",
    "eval/accuracy": "eval_accuracy",
    "grad/global_norm_c1": "grad_norm_c1",
}


def custom_scalars_layout(mode: str, global_batch: int) -> dict:
    """Charts of this run's group: one per reduce mode and one per global batch, per metric.

    TensorBoard merges the categories of all runs by title, so in a sweep each chart gathers
    every run of its reduce mode (or of its global batch).
    """
    layout: dict = {}
    for tag, short in GROUPED.items():
        by_mode = {mode: ["Multiline", [rf"^grouped/{short}/{mode}/"]]}
        by_batch = {
            f"N={global_batch}": ["Multiline", [rf"^grouped/{short}/[^/]+/N{global_batch}$"]]
        }
        layout[f"{tag} by reduce mode (loss-op)"] = by_mode
        layout[f"{tag} by global batch"] = by_batch
    return layout


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The lines of a ``metrics.jsonl`` and their records. A line that is not a whole record
    (half-written when a process died) is skipped with a warning."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            print(
                f"ddp-reduce: warning: {path} line {number} is not a whole record "
                "(cut by a crash?): skipped",
                file=sys.stderr,
            )
            continue
        out.append((line, record))
    return out


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``step``: what a resumed run keeps."""
    return [line for line, record in _records(path) if record["step"] <= step]


class MetricsLogger:
    """Rank 0's metrics: TensorBoard events and a machine-readable copy, one JSON object a line."""

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        mode: str | None = None,
        global_batch: int | None = None,
    ):
        """A resumed run (from ``resume_step``) drops what the lost attempt logged after it.

        ``mode`` ("loss-op", e.g. "sum-mean") and ``global_batch`` name this run's group in the
        custom-scalars dashboard.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        path = run_dir / METRICS
        kept = []
        if resume_step and path.exists():
            kept = _lines_up_to(path, resume_step)
        self._jsonl = open(path, "w")
        self._jsonl.writelines(x + "\n" for x in kept)
        purge = {"purge_step": resume_step + 1} if resume_step else {}
        self.tb = SummaryWriter(log_dir=str(run_dir / TB_DIR), **purge)
        self._group = None
        if mode is not None and global_batch is not None:
            self._group = f"{mode}/N{global_batch}"
            self.tb.add_custom_scalars(custom_scalars_layout(mode, global_batch))

    def log(self, step: int, scalars: dict[str, float | None]) -> None:
        present = {k: v for k, v in scalars.items() if v is not None}
        for tag, value in present.items():
            self.tb.add_scalar(tag, value, step)
            if self._group and tag in GROUPED:
                self.tb.add_scalar(f"grouped/{GROUPED[tag]}/{self._group}", value, step)
        self._jsonl.write(json.dumps(json_ready({"step": step, **present})) + "\n")
        self._jsonl.flush()

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float | None]) -> None:
        """The run's hyperparameters against its final metrics, for TensorBoard's HParams view.

        Called once, at the end, into this run's own events file (``add_hparams`` would open a
        second writer, in a sub-run named by the clock unless ``run_name="."``).
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        plain = (int, float, str, bool)
        h = {k: (v if isinstance(v, plain) else str(v)) for k, v in hparams.items()}
        m = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for summary in hparams_summary(h, m):
            self.tb.file_writer.add_summary(summary)
        for tag, value in m.items():
            self.tb.add_scalar(tag, value)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        self._jsonl.close()


class NullLogger:
    """What the ranks other than 0 log: nothing."""

    def log(self, step: int, scalars: dict[str, float | None]) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float | None]) -> None:
        pass

    def close(self) -> None:
        pass
