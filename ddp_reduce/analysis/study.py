"""``ddp-reduce study NAME``: run a study's sweep, then write its report.

    ddp-reduce study equivalence             the default variant (minutes)
    ddp-reduce study lr_batch --quick        the quick variant (minutes)
    ddp-reduce study stability --out DIR dist.device=cuda   extra overrides for every run

A study is ``conf/study/<name>.yaml`` (its sweep: the runs, their overrides, the quick variant's
changes) and ``ddp_reduce/analysis/studies/<name>.py`` (how it runs them and what it reports).
Runs go through a pool of ranks kept alive from one run to the next, each in
``<out>/runs/<run name>`` with its own config, summary, metrics, TensorBoard events and weights;
a run that diverges is a result, a run that fails is recorded as failed with its error and the
study goes on (it stops if its first runs all fail). Progress goes to stderr: a bar with an ETA
on a terminal, one line per run otherwise.

Overrides apply to every run, before or after the options. An override of a key that the study's
own runs set (``optim.lr`` in ``lr_batch``) is refused: the study's value would replace it.
A study with a failed run still writes its report, and exits 1 naming the failed runs. A study
stopped by a signal writes none (``study.json`` records the stop; ``ddp-reduce report`` reports
the runs done, saying so).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddp_reduce.analysis.report import INDEX, REPORT, SPEC, write_report
from ddp_reduce.config import ConfigError
from ddp_reduce.run.cli_errors import error_message
from ddp_reduce.run.compose import compose_config, override_key
from ddp_reduce.run.launch import run_job
from ddp_reduce.run.pool import RankPool
from ddp_reduce.run.rundir import open_append, write_json
from ddp_reduce.run.signals import Terminated, launcher_signals, stop_signal
from ddp_reduce.run.validate import validate


def studies() -> list[str]:
    """The studies: one per ``conf/study/<name>.yaml`` (its analysis in ``studies/<name>.py``)."""
    folder = resources.files("ddp_reduce.conf") / "study"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_spec(name: str, quick: bool) -> DictConfig:
    """The study's YAML, with its ``quick`` section merged over it when asked."""
    path = resources.files("ddp_reduce.conf") / "study" / f"{name}.yaml"
    spec = OmegaConf.create(path.read_text())
    quick_part = spec.pop("quick", None)
    if quick and quick_part is not None:
        spec = OmegaConf.merge(spec, quick_part)
    return spec


RUNNER_SETS = ("train.progress",)  # what the runner adds to every run
ABORT_AFTER = 3  # stop a study whose first runs all fail


def study_keys(spec: DictConfig, module: Any) -> set[str]:
    """Every key that the study's runs set themselves: those of the overrides written in its
    YAML, those its module adds (``SETS``) and the runner's own."""
    keys = set(getattr(module, "SETS", ())) | set(RUNNER_SETS)

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                if isinstance(v, str) and override_key(v):
                    keys.add(override_key(v))
                else:
                    walk(v)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)

    walk(OmegaConf.to_container(spec))
    return keys


def conflict_error(study: str, override: str, key: str) -> ConfigError:
    return ConfigError(
        override.split("=", 1)[0],
        override.split("=", 1)[1],
        f"the study {study} sets {key} in its own runs, which would replace this value; "
        f"change it in conf/study/{study}.yaml instead",
    )


def check_overrides(study: str, spec: DictConfig, module: Any, common: list[str]) -> None:
    """Refuse an override of a key that the study's runs set: it would be silently replaced."""
    own = study_keys(spec, module)
    for o in common:
        key = override_key(o)
        if key in own:
            raise conflict_error(study, o, key)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Runs done against those planned, with an ETA, on stderr: a tqdm bar on a terminal, one
    line per run otherwise (logs, CI). A study that adapts (refinement, extended grids) may run
    more than planned; the total then grows."""

    def __init__(self, name: str, planned: int | None, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.name, self.planned, self.done = name, planned, 0
        self.start = time.perf_counter()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=planned,
                desc=f"study {name}",
                unit="run",
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, run_name: str, summary: dict[str, Any], seconds: float) -> None:
        self.done += 1
        if self.planned is not None and self.done > self.planned:
            self.planned = self.done
            if self.bar is not None:
                self.bar.total = self.planned
        status = summary.get("status", "?")
        loss = summary.get("final_train_loss")
        what = f"{status}" + (f", loss {loss:.4g}" if isinstance(loss, float) else "")
        if status == "failed":
            what += (
                f": {str(summary.get('error', '')).splitlines()[0] if summary.get('error') else ''}"
            )
        if self.bar is not None:
            if status == "failed":
                self.bar.write(f"  {run_name}: {what}", file=self.stream)
            self.bar.set_postfix_str(f"{run_name}: {status}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        left = None
        if self.planned:
            left = elapsed / self.done * (self.planned - self.done)
        total = self.planned if self.planned is not None else "?"
        print(
            f"  [{self.done}/{total}] {run_name}: {what} ({seconds:.1f} s); "
            f"{_duration(elapsed)} elapsed, ETA {_duration(left)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StudyFailed(RuntimeError):
    """Runs of a study failed; ``failures`` holds (run name, error) for each."""

    def __init__(self, study: str, failures: list[tuple[str, str]], runs: int, stopped: bool):
        self.study, self.failures, self.runs, self.stopped = study, failures, runs, stopped
        lines = [
            f"study {study}: {len(failures)} of {runs} runs failed"
            + (f" (stopped: the first {runs} runs all failed)" if stopped else "")
        ]
        for name, error in failures[:20]:
            first = error.strip().splitlines()[0] if error.strip() else "(no message)"
            lines.append(f"  {name}: {first}")
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more (runs.csv, runs.jsonl)")
        super().__init__("\n".join(lines))


class _Abort(Exception):
    """The first runs of the study all failed: stop it."""


class Runner:
    """Runs one study's runs: compose, validate, train in a rank pool, record."""

    def __init__(self, out: Path, common: list[str], progress: Progress | None = None):
        self.out = out
        self.common = list(common)
        self._pools: dict[str, RankPool] = {}
        self.records: list[dict[str, Any]] = []
        self.failures: list[tuple[str, str]] = []
        self.progress = progress
        self.study = ""
        (out / "runs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, overrides: list[str], **labels: Any) -> dict[str, Any]:
        """Train run ``name``; returns its summary (status failed, with the error, if it fails).

        ``labels`` are stored with the run for the study's analysis. An override of the user's
        that this run sets again is refused (ConfigError), never silently replaced.
        """
        own = {override_key(o) for o in overrides}
        for o in self.common:
            if override_key(o) in own:
                raise conflict_error(self.study, o, override_key(o))
        run_dir = self.out / "runs" / name
        all_overrides = [*self.common, *overrides, "train.progress=false"]
        record = {"name": name, "overrides": all_overrides, "labels": labels}
        start = time.perf_counter()
        try:
            cfg_dict, _ = compose_config(all_overrides)
            nproc = cfg_dict["dist"]["nproc"]
            cfg = validate(cfg_dict, nproc)
            pool = self._pool(cfg.dist, nproc)
            # the study's records are plain JSON (runs.jsonl): the summary as on disk
            summary = pool.call(run_job, cfg, str(run_dir))[0].to_dict()
        except Exception as exc:  # recorded as a failed run; the study goes on
            summary = {"status": "failed", "error": error_message(exc)}
            self._drop_pools()
        if summary.get("status") == "failed":
            self.failures.append((name, str(summary.get("error") or "")))
        record["summary"] = summary
        self.records.append(record)
        with open_append(self.out / INDEX) as f:  # never through a planted link
            f.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress.update(name, summary, time.perf_counter() - start)
        if len(self.failures) == len(self.records) >= ABORT_AFTER:
            raise _Abort
        return summary

    def _pool(self, dist_cfg, nproc: int) -> RankPool:
        key = f"{nproc}:{dist_cfg!r}"
        pool = self._pools.get(key)
        if pool is None or not pool.alive():
            pool = self._pools[key] = RankPool(dist_cfg, nproc)
        return pool

    def _drop_pools(self, force: bool = False) -> None:
        for pool in self._pools.values():
            pool.close(force=force or not pool.alive())
        self._pools.clear()

    def close(self, force: bool = False) -> None:
        """End the pools; ``force``: at once, without waiting for a job in progress."""
        self._drop_pools(force)


def run_study(name: str, quick: bool, out: Path, common: list[str]) -> Path:
    """Run the study and write its report; returns the report's path.

    Raises ConfigError (nothing run) for an override that the study's runs set themselves, and
    StudyFailed, after writing the report, if any run failed.
    """
    spec = load_spec(name, quick)
    module = importlib.import_module(f"ddp_reduce.analysis.studies.{name}")
    check_overrides(name, spec, module, common)
    _check_composes(common)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "a folder (this is a file)" if out.is_file() else f"a folder ({exc.strerror})"
        raise ConfigError("--out", str(out), what) from None
    if (out / INDEX).exists():
        raise ConfigError("--out", str(out), "a folder without an earlier study in it")
    record = {"study": name, "quick": quick, "common": common, "spec": OmegaConf.to_container(spec)}
    write_json(out / SPEC, record)
    planned = module.planned_runs(spec) if hasattr(module, "planned_runs") else None
    progress = Progress(name, planned)
    runner = Runner(out, common, progress)
    runner.study = name
    start = time.perf_counter()
    stopped = False
    signal_stop: Terminated | KeyboardInterrupt | None = None
    try:
        with launcher_signals():
            module.run(spec, runner)
    except _Abort:
        stopped = True
    except (Terminated, KeyboardInterrupt) as exc:
        signal_stop = exc
    finally:
        progress.close()
        runner.close(force=signal_stop is not None)
    elapsed = time.perf_counter() - start
    if signal_stop is not None:
        raise _stop(out, record, signal_stop, len(runner.records), planned)
    print(f"ddp-reduce: study {name}: {len(runner.records)} runs in {elapsed:.0f} s")
    report = write_report(out)
    if runner.failures:
        raise StudyFailed(name, runner.failures, len(runner.records), stopped)
    return report


class StudyStopped(RuntimeError):
    """A signal (Ctrl-C, kill, a scheduler) stopped the study; ``code`` is the exit code a shell
    gives a process the signal ended."""

    def __init__(self, message: str, code: int):
        self.code = code
        super().__init__(message)


def _stop(out: Path, record: dict, exc: BaseException, done: int, planned: int | None):
    """Add to the study's ``record`` (study.json) that it stopped, and why; no report is
    written (its figures would be those of part of the study): ``ddp-reduce report`` writes
    one, saying so."""
    signum, what = stop_signal(exc)
    of = f" of {planned} planned" if planned else ""
    record = {**record, "stopped": f"{what} after {done}{of} runs"}
    write_json(out / SPEC, record)
    return StudyStopped(
        f"study {record['study']} {record['stopped']}; no report written: its runs are in "
        f"{out / INDEX} (`ddp-reduce report {out}` reports them, marked as stopped)",
        128 + signum,
    )


def _check_composes(common: list[str]) -> None:
    """The overrides for every run compose into a config (every key exists), before any run."""
    from hydra.errors import HydraException

    try:
        compose_config(common)
    except HydraException as exc:
        raise ConfigError("overrides", " ".join(common), error_message(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; overrides may come before, between and after the options."""
    p = argparse.ArgumentParser(prog="ddp-reduce study", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=studies())
    p.add_argument("--quick", action="store_true", help="the quick variant")
    p.add_argument("--out", type=Path, help="default: studies/<name>/<date>_<time>")
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides for every run (key=value), before or after the options; a key "
        "that the study's runs set themselves is refused",
    )
    a = p.parse_intermixed_args(argv)
    for o in a.overrides:
        if "=" not in o:
            p.error(f"{o!r} is not an override (key=value)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = a.out or Path("studies") / a.name / (stamp + ("_quick" if a.quick else ""))
    try:
        report = run_study(a.name, a.quick, out.resolve(), a.overrides)
    except ConfigError as exc:
        print(f"ddp-reduce: error: {exc}", file=sys.stderr)
        return 2
    except StudyFailed as exc:
        print(f"ddp-reduce: error: {exc}", file=sys.stderr)
        print(f"ddp-reduce: report: {out.resolve() / REPORT}")
        return 1
    except StudyStopped as exc:
        print(f"ddp-reduce: error: {exc}", file=sys.stderr)
        return exc.code
    print(f"ddp-reduce: report: {report}")
    return 0
