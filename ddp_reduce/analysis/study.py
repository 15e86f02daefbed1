"""``ddp-reduce study NAME``: run a study's sweep, then write its report.

    ddp-reduce study equivalence             the default variant (minutes)
    ddp-reduce study lr_batch --quick        the quick variant (under 2 minutes here)
    ddp-reduce study stability --out DIR dist.device=cuda   extra overrides for every run

A study is ``conf/study/<name>.yaml`` (its sweep: the runs, their overrides, the quick variant's
changes) and ``ddp_reduce/studies/<name>.py`` (how it runs them and what it reports). Runs go
through a pool of ranks kept alive from one run to the next, each in ``<out>/runs/<run name>``
with its own config, summary, metrics, TensorBoard events and weights; a run that diverges is a
result, a run that fails is recorded as failed and the study goes on.
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

from ddp_reduce.analysis.report import INDEX, SPEC, write_report
from ddp_reduce.config import ConfigError
from ddp_reduce.run.compose import compose_config
from ddp_reduce.run.launch import error_message, run_job, validate
from ddp_reduce.run.pool import RankPool
from ddp_reduce.run.rundir import write_json


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


class Runner:
    """Runs one study's runs: compose, validate, train in a rank pool, record."""

    def __init__(self, out: Path, common: list[str]):
        self.out = out
        self.common = list(common)
        self._pools: dict[str, RankPool] = {}
        self.records: list[dict[str, Any]] = []
        (out / "runs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, overrides: list[str], **labels: Any) -> dict[str, Any]:
        """Train run ``name``; returns its summary (status failed, with the error, if it fails).

        ``labels`` are stored with the run for the study's analysis.
        """
        run_dir = self.out / "runs" / name
        all_overrides = [*self.common, *overrides, "train.progress=false"]
        record = {"name": name, "overrides": all_overrides, "labels": labels}
        try:
            cfg_dict, _ = compose_config(all_overrides)
            nproc = cfg_dict["dist"]["nproc"]
            cfg = validate(cfg_dict, nproc)
            pool = self._pool(cfg.dist, nproc)
            summary = pool.call(run_job, cfg_dict, str(run_dir))[0]
        except Exception as exc:  # recorded as a failed run; the study goes on
            summary = {"status": "failed", "error": error_message(exc)}
            self._drop_pools()
            print(f"  {name}: failed: {summary['error'].splitlines()[0]}", file=sys.stderr)
        record["summary"] = summary
        self.records.append(record)
        with open(self.out / INDEX, "a") as f:
            f.write(json.dumps(record) + "\n")
        return summary

    def _pool(self, dist_cfg, nproc: int) -> RankPool:
        key = f"{nproc}:{dist_cfg!r}"
        pool = self._pools.get(key)
        if pool is None or not pool.alive():
            pool = self._pools[key] = RankPool(dist_cfg, nproc)
        return pool

    def _drop_pools(self) -> None:
        for pool in self._pools.values():
            pool.close(force=not pool.alive())
        self._pools.clear()

    def close(self) -> None:
        self._drop_pools()


def run_study(name: str, quick: bool, out: Path, common: list[str]) -> Path:
    spec = load_spec(name, quick)
    module = importlib.import_module(f"ddp_reduce.analysis.studies.{name}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).exists():
        raise ConfigError("--out", str(out), "a folder without an earlier study in it")
    write_json(
        out / SPEC,
        {"study": name, "quick": quick, "common": common, "spec": OmegaConf.to_container(spec)},
    )
    runner = Runner(out, common)
    start = time.perf_counter()
    try:
        module.run(spec, runner)
    finally:
        runner.close()
    elapsed = time.perf_counter() - start
    print(f"ddp-reduce: study {name}: {len(runner.records)} runs in {elapsed:.0f} s")
    return write_report(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ddp-reduce study", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=studies())
    p.add_argument("--quick", action="store_true", help="the quick variant")
    p.add_argument("--out", type=Path, help="default: studies/<name>/<date>_<time>")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (key=value)")
    a = p.parse_args(argv)
    for o in a.overrides:
        if "=" not in o:
            p.error(f"{o!r} is not an override (key=value)")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = a.out or Path("studies") / a.name / (stamp + ("_quick" if a.quick else ""))
    try:
        report = run_study(a.name, a.quick, out.resolve(), a.overrides)
    except ConfigError as exc:
        print(f"ddp-reduce: error: {exc}", file=sys.stderr)
        return 2
    print(f"ddp-reduce: report: {report}")
    return 0
