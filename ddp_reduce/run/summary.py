"""A run's summary: what ``summary.json`` holds, typed, and its printed form.

Written by rank 0 at the end of a run (or by whoever records its failure), read back by the
launcher, by a resumed or refused run and by the reports. On disk it is a JSON object with the
fields below; a summary written by an earlier version (fewer fields) still reads, missing fields
being None. A field of the wrong type (a hostile or damaged file) is a ValueError naming it.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from ddp_reduce.run.rundir import (
    NONFINITE,
    SUMMARY,
    SUMMARY_MAX_BYTES,
    read_regular,
    versions,
    write_json,
)


class Status(str, Enum):
    """How a run ended. A str, so that it is written (and compared) as its plain name."""

    completed = "completed"
    diverged = "diverged"  # a result too: the run blew up, its last sound weights are saved
    failed = "failed"
    interrupted = "interrupted"  # Ctrl-C (SIGINT) or a closed terminal (SIGHUP)

    @property
    def finished(self) -> bool:
        """A summary with this status holds a result: nothing replaces it but a run asked to
        (train.overwrite=true), which clears it first; a later failure is never recorded
        over it."""
        return self in (Status.completed, Status.diverged)


FINISHED = tuple(s for s in Status if s.finished)
NONFINITE_VALUES = {"nan", "inf", "-inf"}  # what a flag under ``nonfinite`` may say
_FAILURE = {"failure": True}  # fields written only when set (a failure's record)


@dataclass
class RunSummary:
    status: Status
    diverged_at_step: int | None = None
    diverged_why: str | None = None
    steps_done: int | None = None
    steps_planned: int | None = None
    resumed_from_step: int | None = None
    grad_scale: float | None = None  # c with b*A items per rank
    grad_scale_rule: str | None = None
    grad_scale_range: list[float | None] | None = None  # [low, high] of c over the steps
    grad_scale_exact: bool | None = None
    reduce_loss: str | None = None
    reduce_op: str | None = None
    strategy: str | None = None
    reduce_impl: str | None = None
    reduce_route: str | None = None
    reduce_dtype: str | None = None
    reduce_predivide: str | None = None
    reduce_overflow_at_step: int | None = None
    reduce_lossy_logged_steps: int | None = None
    reduce_comm_rel_error_max: float | None = None
    precision: str | None = None
    amp_skipped_steps: int | None = None
    world_size: int | None = None
    local_batch_size: int | None = None
    accum_steps: int | None = None
    global_batch_size: int | None = None
    train_items: int | None = None
    last_logged_train_loss: float | None = None
    initial_train_loss: float | None = None
    target_loss: float | None = None
    steps_to_target: int | None = None
    optim_effective: dict[str, Any] | None = None
    noise_scale: dict[str, Any] | None = None
    noise_unavailable: str | None = None
    device: str | None = None
    backend: str | None = None
    threads_per_rank: int | None = None
    run_dir: str | None = None
    versions: dict[str, str] | None = None
    final_train_loss: float | None = None
    final_train_accuracy: float | None = None
    final_eval_loss: float | None = None
    final_eval_accuracy: float | None = None
    peak_rss_mb_per_rank: list[float | None] | None = None
    wall_time_s: float | None = None
    error: str | None = field(default=None, metadata=_FAILURE)
    traceback: str | None = field(default=None, metadata=_FAILURE)
    failed_rank: int | None = field(default=None, metadata=_FAILURE)
    hung_ranks: list[int] | None = field(default=None, metadata=_FAILURE)
    rank_error: str | None = field(default=None, metadata=_FAILURE)  # what the rank recorded

    def __post_init__(self) -> None:
        self.status = _status(self.status)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object on disk: a run's results in full (None as null), a failure's
        fields where set. Non-finite numbers are flagged by :func:`write_json`."""
        has_results = self.steps_done is not None
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or (has_results and not f.metadata.get("failure")):
                out[f.name] = value.value if isinstance(value, Status) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> RunSummary:
        """A summary from its JSON object; ValueError naming the field that is wrong. A number
        written as null because it was not finite comes back as that number (``nonfinite``);
        a key this version does not know is ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a run's summary is a JSON object, not a {type(data).__name__}")
        flags = data.get(NONFINITE) or {}
        if not isinstance(flags, dict) or not set(map(str, flags.values())) <= NONFINITE_VALUES:
            raise ValueError(f"{NONFINITE} maps keys to nan, inf or -inf; not {flags!r:.80}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = _restore(data[f.name], flags, f.name)
            if f.name != "status" and not _is(value, hints[f.name]):
                raise ValueError(f"{f.name}={value!r:.80} is not a {_name(hints[f.name])}")
            values[f.name] = value
        if "status" not in values:
            raise ValueError("a run's summary has a status; this one has none")
        return cls(**values)


def _status(value: Any) -> Status:
    try:
        return Status(value)
    except (ValueError, TypeError):
        allowed = ", ".join(s.value for s in Status)
        raise ValueError(f"status={value!r:.80} is not one of {allowed}") from None


def _restore(value: Any, flags: dict, key: str) -> Any:
    """``value`` with the numbers that were written as null (flagged non-finite) restored."""
    if value is None and key in flags:
        return float(flags[key])
    if isinstance(value, list):
        return [_restore(v, flags, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _restore(v, flags, f"{key}.{k}") for k, v in value.items()}
    return value


def _is(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (an int is a float; a bool is no number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_is(v, item) for v in value.values())
    return isinstance(value, hint)


def _name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def read_summary(run_dir: str | Path) -> RunSummary | None:
    """The run's summary; None where there is none. ValueError where it is not a summary (a
    truncated, foreign or hostile file), naming what is wrong."""
    path = Path(run_dir) / SUMMARY
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(read_regular(path, SUMMARY_MAX_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a run's summary") from None
    try:
        return RunSummary.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a run's summary: {exc}") from None


def unfinished_summary(run_dir: str | Path) -> RunSummary | None:
    """For recording a failure: the summary so far (a fresh one where there is none, or where
    it is unreadable: the failure's record replaces it), or None where nothing may be written
    (the folder is gone, or it holds a finished run)."""
    if not Path(run_dir).is_dir():
        return None
    try:
        previous = read_summary(run_dir)
    except (OSError, ValueError):
        previous = None
    if previous is None:
        return RunSummary(status=Status.failed)
    return None if previous.status.finished else previous


def write_summary(run_dir: str | Path, summary: RunSummary) -> None:
    if summary.versions is None:
        summary.versions = versions()
    write_json(Path(run_dir) / SUMMARY, summary.to_dict())


def _number(x: float | None, spec: str) -> str:
    """A figure as ``spec`` formats it; NaN and inf as such, a missing one as n/a."""
    if x is None:
        return "n/a"
    return format(x, spec) if math.isfinite(x) else str(x)


def format_summary(s: RunSummary) -> str:
    """What ``ddp-reduce`` prints at the end of a run."""
    head = f"ddp-reduce: {s.status.value}"
    if s.status is Status.diverged:
        head += f" at step {s.diverged_at_step} ({s.diverged_why})"
    head += f", {s.steps_done} steps in {_number(s.wall_time_s, '.1f')} s"

    def metric(name: str, loss: float | None, acc: float | None) -> str:
        text = f"  {name:<5} loss {_number(loss, '.4f')}"
        return text + (f"  accuracy {_number(acc, '.4f')}" if acc is not None else "")

    exact = "" if s.grad_scale_exact else " (unequal counts: a mean of means, not exactly c*G)"
    # c as the steps measured it leads; grad_scale, c with b*A items per rank, follows where it
    # differs (items that are tokens, a loss that counts its own, a ragged batch)
    c = _number(s.grad_scale, "g")
    low, high = s.grad_scale_range or [None, None]
    if low is not None and high is not None and not low == high == s.grad_scale:
        span = f"{_number(low, 'g')} to {_number(high, 'g')} over the steps"
        c = f"{_number(low, 'g')} on every step" if low == high else span
        exact += f"; {_number(s.grad_scale, 'g')} with b*A items per rank (N={s.global_batch_size})"
    lines = [
        head,
        f"  W={s.world_size} b={s.local_batch_size} A={s.accum_steps} "
        f"N={s.global_batch_size}  reduce: loss={s.reduce_loss} op={s.reduce_op}",
        f"  gradient factor c = {c}  [{s.grad_scale_rule}]{exact}",
        f"  {s.strategy}, gradients reduced in {s.reduce_dtype} "
        f"({s.reduce_route or 'no route'}), model in {s.precision}" + _precision_note(s),
        metric("train", s.final_train_loss, s.final_train_accuracy),
        metric("test", s.final_eval_loss, s.final_eval_accuracy),
        f"  run directory: {s.run_dir}",
        f"  TensorBoard:   tensorboard --logdir {s.run_dir} --host 127.0.0.1",
    ]
    return "\n".join(lines)


def _precision_note(s: RunSummary) -> str:
    """What low precision cost, where it was measured."""
    note = ""
    if s.reduce_comm_rel_error_max is not None:
        note += (
            f"; reduction error up to {_number(s.reduce_comm_rel_error_max, '.2g')} (relative), "
            f"{s.reduce_lossy_logged_steps} lossy logged steps"
        )
    if s.reduce_op == "sum" and s.reduce_predivide != "full":
        note += f"; reduce.predivide={s.reduce_predivide} is moot with op=sum (divisor 1)"
    if s.amp_skipped_steps:
        note += f"; {s.amp_skipped_steps} steps skipped by the loss scaler"
    return note
