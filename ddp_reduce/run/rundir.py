"""What a run leaves behind: resolved config, metrics (TensorBoard, JSON lines), summary, weights.

Only rank 0 writes; the other ranks get a logger that does nothing. Files that mark a result
(``summary.json``, ``model.pt``) are written to a temporary name and renamed, so a crash never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
MODEL = "model.pt"
TB_DIR = "tb"
CHECKPOINTS = "checkpoints"
REFUSED = "refused.jsonl"  # in a sweep's folder: its points refused before they ran


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


def _drop_link(path: Path) -> None:
    """Remove a symbolic link planted where the run writes one of its own files or folders:
    the link itself, never what it points to; the run then writes its own in its place."""
    if path.is_symlink():
        print(
            f"ddp-reduce: warning: {path} is a symbolic link; removed (never written through)",
            file=sys.stderr,
        )
        path.unlink()


def own_folder(path: Path) -> Path:
    """``path`` as a folder of the run's own, created: a symbolic link there is removed first,
    so nothing is written through it into another folder."""
    _drop_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_append(path: Path):
    """``path`` opened for appending text, created if missing, never through a symbolic link
    (``O_NOFOLLOW``: one planted there is removed first; one planted meanwhile is an error)."""
    _drop_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (read and write, created), never opened through
    a symbolic link."""
    _drop_link(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def write_text(path: Path, text: str) -> None:
    """Write a whole text file under a temporary name and rename it: a symbolic link at
    ``path`` is replaced, never written through."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
    import torch  # here: the checks and reports this module serves need no torch (2 s to load)

    atomic_write(run_dir / MODEL, lambda tmp: torch.save(state_dict, tmp))


SUMMARY_MAX_BYTES = 8 << 20  # a summary is a few kB (a traceback included); read no more


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file of the run's own: ValueError, naming it, where it
    is a symbolic link, a FIFO, a device or a folder, or holds over ``limit`` bytes. (Opened
    without following a link and without blocking, so a planted FIFO cannot hang the reader
    nor a link to ``/dev/zero`` feed it without end.)"""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link, not a file of the run's own") from None
        raise ValueError(f"{path} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"{path} holds over {limit} bytes: not a file the project writes")
    return data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the run's ``metrics.jsonl``; none, with a warning, where it is no
    regular file of the run's own."""
    path = Path(run_dir) / METRICS
    if not os.path.lexists(path):
        return []
    try:
        return [record for _, record in _records(path)]
    except ValueError as exc:
        print(f"ddp-reduce: warning: {exc}: its metrics are not read", file=sys.stderr)
        return []


def record_refused(sweep_dir: str | Path, point: str, overrides: list[str], error: str) -> None:
    """Note a sweep point refused before it ran (its folder is removed: discard_refused), so
    the sweep's report can list it beside the runs."""
    record = {"point": point, "overrides": overrides, "error": error}
    with open_append(Path(sweep_dir) / REFUSED) as f:
        f.write(json.dumps(record) + "\n")


REFUSED_MAX_BYTES = 16 << 20


def read_refused(sweep_dir: str | Path) -> list[dict[str, str]]:
    """The refused points :func:`record_refused` noted; a line that is not such a record is
    shown as unreadable, never trusted further."""
    path = Path(sweep_dir) / REFUSED
    if not os.path.lexists(path):
        return []
    try:
        text = read_regular(path, REFUSED_MAX_BYTES).decode("utf-8", errors="replace")
    except ValueError as exc:
        return [{"point": "?", "error": str(exc)}]
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict):
            record = {"point": "?", "error": f"an unreadable line in {REFUSED}"}
        # one line each, whatever the file holds (the report prints them in a table)
        out.append({k: " ".join(str(record.get(k, "?")).split()) for k in ("point", "error")})
    return out


SWEEP_RECORD = "multirun.yaml"  # Hydra's record of a sweep, in its folder


def check_sweep_dir(sweep_dir: str, task: list[str]) -> None:
    """Refuse a ``--multirun`` into a folder that holds another sweep (a ``multirun.yaml``
    recording other overrides than ``task``) before Hydra rewrites its records. The same
    sweep again is let through: its finished points are refused one by one, the others
    resume from their checkpoints."""
    import yaml

    from ddp_reduce.config import ConfigError

    path = Path(sweep_dir) / SWEEP_RECORD
    if not os.path.lexists(path):
        return
    try:
        recorded = yaml.safe_load(read_regular(path, 16 << 20))["hydra"]["overrides"]["task"]
    except (ValueError, yaml.YAMLError, TypeError, KeyError, RecursionError):
        recorded = None
    if not isinstance(recorded, list) or sorted(map(str, recorded)) != sorted(task):
        held = " ".join(map(str, recorded)) if isinstance(recorded, list) else "unreadable"
        raise ConfigError(
            "hydra.sweep.dir",
            sweep_dir,
            f"a folder of no other sweep (it holds one with the overrides: {held}); "
            "choose another hydra.sweep.dir",
        )


def discard_refused(run_dir: str | Path) -> None:
    """Remove the folder Hydra made for a run that was then refused, when it holds nothing but
    Hydra's own record (``.hydra/``): a refused run leaves no directory that looks like a run.
    A folder with anything else in it is left as it is."""
    import shutil

    path = Path(run_dir)
    if not str(run_dir).strip() or not path.is_dir() or path.is_symlink():
        return
    if {entry.name for entry in path.iterdir()} - {".hydra"}:
        return
    hydra = path / ".hydra"
    if hydra.is_dir() and not hydra.is_symlink():
        shutil.rmtree(hydra, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def clear_results(run_dir: Path) -> None:
    """Remove a previous run's results (asked for with train.overwrite=true)."""
    import shutil

    for name in (SUMMARY, MODEL, METRICS):
        (run_dir / name).unlink(missing_ok=True)
    for folder in (TB_DIR, CHECKPOINTS):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def versions() -> dict[str, str]:
    """The installed versions a run records (a copy: each run's summary holds its own)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    # read once per process: package metadata is parsed from disk, 15-20 ms a run, and a
    # process's installed packages do not change under it
    out = {"python": platform.python_version()}
    for dist_name in ("ddp-reduce", "torch", "hydra-core", "omegaconf", "tensorboard", "numpy"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    import torch

    out["cuda"] = torch.version.cuda or "none"
    return out


RUN_NAME_MAX_BYTES = 120  # a folder name may hold 255; TensorBoard's legends want far fewer


def sweep_run_name(num: int, overrides: str) -> str:
    """A sweep point's folder: its job number, then its overrides: ``2_optim.lr=0.1,reduce.op=sum``.

    The number keeps the names unique and in the sweep's order. A ``/`` (from a path in a value)
    becomes ``_``, so that every point is one folder, not a tree. A name over
    ``RUN_NAME_MAX_BYTES`` is cut and ends in ``...`` and a digest of the whole list; the point's
    exact overrides are in its ``.hydra/overrides.yaml``.
    """
    import hashlib

    name = f"{num}_{overrides}".replace("/", "_").rstrip("_")
    raw = name.encode()
    if len(raw) <= RUN_NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:8]
    head = raw[: RUN_NAME_MAX_BYTES - len(digest) - 3].decode(errors="ignore")
    return f"{head}...{digest}"


def register_resolvers() -> None:
    """``${ddp_reduce.run_name:num,overrides}`` for Hydra's ``hydra.sweep.subdir``."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ddp_reduce.run_name", sweep_run_name, replace=True)


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
    for number, raw in enumerate(read_regular(path).splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")  # a byte that is not UTF-8: not a whole record either
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except (ValueError, RecursionError):
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


@dataclass(frozen=True)
class HParam:
    """One column of TensorBoard's HParams view, and this run's value in it."""

    name: str
    value: str | int | float | bool | None  # None: not set (clip_norm: null); the cell stays empty
    kind: type = float  # the column's type whatever this run's value is: float, str or bool
    choices: tuple[str, ...] = ()  # every value a str column can take: its filter's checkboxes
    axis: bool = False  # an axis of the sum-or-mean question: listed first and shown by default
    display_name: str = ""


def hparams_summaries(hparams: list[HParam], metric_tags: list[str]) -> list:
    """The HParams plugin's three records: experiment, session start and session end.

    The experiment record declares every column, in ``hparams``' order, whatever this run's
    values are (the same in every run of a sweep: TensorBoard takes one run's record for all).
    The axes are marked ``differs``: TensorBoard's server orders the columns by that flag, then
    by name, and its HParams table shows the first five; the others are one checkbox away.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import (
        HParamsPluginData,
        SessionEndInfo,
        SessionStartInfo,
    )

    types = {
        float: api_pb2.DATA_TYPE_FLOAT64,
        str: api_pb2.DATA_TYPE_STRING,
        bool: api_pb2.DATA_TYPE_BOOL,
    }
    infos = []
    start = SessionStartInfo()
    for hp in hparams:
        info = api_pb2.HParamInfo(
            name=hp.name, display_name=hp.display_name, type=types[hp.kind], differs=hp.axis
        )
        if hp.choices:
            info.domain_discrete.extend(hp.choices)
        infos.append(info)
        if hp.value is None:
            continue
        if hp.kind is str:
            start.hparams[hp.name].string_value = str(hp.value)
        elif hp.kind is bool:
            start.hparams[hp.name].bool_value = bool(hp.value)
        else:
            start.hparams[hp.name].number_value = float(hp.value)
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags],
    )
    end = SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    records = [
        (metadata.EXPERIMENT_TAG, HParamsPluginData(experiment=experiment)),
        (metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start)),
        (metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end)),
    ]
    return [
        Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])
        for tag, data in records
    ]


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
        if resume_step and path.is_file() and not path.is_symlink():
            kept = _lines_up_to(path, resume_step)
        write_text(path, "".join(x + "\n" for x in kept))  # a link there is replaced
        self._jsonl = open_append(path)
        purge = {"purge_step": resume_step + 1} if resume_step else {}
        tb = own_folder(run_dir / TB_DIR)
        self.tb = SummaryWriter(log_dir=str(tb), **purge)
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

    def hparams(self, hparams: list[HParam], metrics: dict[str, float | None], step: int) -> None:
        """The run's hyperparameters against its final metrics, for TensorBoard's HParams view.

        Called once, at the end, into this run's own events file (``add_hparams`` would open a
        second writer, in a sub-run named by the clock unless ``run_name="."``). The metrics are
        logged at ``step``, the run's last; a metric that is not a finite number is left out.
        """
        for tag, value in metrics.items():
            if value is not None and math.isfinite(value):
                self.tb.add_scalar(tag, float(value), step)
        for summary in hparams_summaries(hparams, list(metrics)):
            self.tb.file_writer.add_summary(summary, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        self._jsonl.close()


class NullLogger:
    """What the ranks other than 0 log: nothing."""

    def log(self, step: int, scalars: dict[str, float | None]) -> None:
        pass

    def hparams(self, hparams: list[HParam], metrics: dict[str, float | None], step: int) -> None:
        pass

    def close(self) -> None:
        pass
