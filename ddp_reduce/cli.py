"""``ddp-reduce``: training runs (a Hydra app that starts ``dist.nproc`` local ranks itself),
and the subcommands ``convert``, ``study`` and ``report``.

``convert`` and ``--help`` answer without importing torch or Hydra.
"""

from __future__ import annotations

import contextlib
import sys
from importlib import resources
from pathlib import Path

SUBCOMMANDS = {
    "convert": ("ddp_reduce.analysis.convert", "rewrite a setting for another sum/mean convention"),
    "study": ("ddp_reduce.analysis.study", "run a study's sweep and write its report"),
    "report": ("ddp_reduce.analysis.report", "(re)write the report of a study, sweep or run"),
    "audit": ("ddp_reduce.auditing.command", "audit a training script: same gradient at W x A?"),
}
NOT_GROUPS = {"study"}  # conf/ folders that are no config group of a run


def config_groups() -> dict[str, list[str]]:
    """The config groups of a run and their options, read from the packaged ``conf/``."""
    root = resources.files("ddp_reduce.conf")
    groups = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if folder.is_dir() and folder.name not in NOT_GROUPS and not folder.name.startswith("_"):
            options = sorted(
                p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
            )
            if options:
                groups[folder.name] = options
    return groups


def help_text() -> str:
    from ddp_reduce.choices import Device, Precision, Strategy
    from ddp_reduce.layer.reduction import CommDtype, LossReduction, ReduceOp

    def choices(enum) -> str:
        return "|".join(member.name for member in enum)

    groups = "\n".join(
        f"  {name:<11} {' | '.join(options)}" for name, options in config_groups().items()
    )
    commands = "\n".join(f"  {name:<8} {what}" for name, (_, what) in SUBCOMMANDS.items())
    return f"""usage: ddp-reduce [key=value ...]             train one run (dist.nproc local ranks)
       ddp-reduce --multirun key=a,b ...       a sweep: one run directory per point
       ddp-reduce COMMAND [options]            one of the commands below

Sum or mean? Data-parallel training whose gradient reduction is an explicit, reported factor c.

commands (each takes --help):
{commands}

config groups (choose one with group=option):
{groups}

common keys: reduce.loss={choices(LossReduction)}  reduce.op={choices(ReduceOp)}
  dist.nproc=N  dist.strategy={choices(Strategy)}  dist.device={choices(Device)}
  data.batch_size=b  train.accum_steps=A  train.steps  optim.lr
  reduce.dtype={choices(CommDtype)}  reduce.predivide=full|sqrt|none|k
  train.precision={choices(Precision)}
  hydra.run.dir=PATH (the run directory); every key: ddp-reduce --cfg job
  your own model and data: +model._target_=pkg.Class  +data._target_=pkg.make_splits

Hydra's own flags: --cfg job|hydra, --resolve, --info, --hydra-help.
"""


def _train() -> None:
    """The Hydra app (imported only now: torch and Hydra take a second to load)."""
    from ddp_reduce.run.ranks import start_rank_server

    start_rank_server()  # the ranks' imports run while this process composes the config
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from ddp_reduce.config import ConfigError, register_schema, to_dict
    from ddp_reduce.run.checkpoint import CheckpointError
    from ddp_reduce.run.compose import override_key
    from ddp_reduce.run.launch import (
        LaunchError,
        Terminated,
        check_run_dir,
        claim_run_dir,
        error_message,
        fail,
        format_summary,
        launch_local,
        sigterm_as_exception,
        validate,
    )
    from ddp_reduce.run.pool import PoolError
    from ddp_reduce.run.rundir import (
        FINISHED,
        discard_refused,
        record_refused,
        register_resolvers,
    )

    register_schema()
    register_resolvers()  # the sweep's folder names (conf/config.yaml: hydra.sweep.subdir)
    tally: dict[str, int] = {}  # a sweep's points by outcome
    # Hydra creates the run (or sweep) folder before the app runs: one it cannot create is
    # refused here, with the key, rather than as Hydra's own traceback.
    for arg in sys.argv[1:]:
        key = override_key(arg)
        value = arg.split("=", 1)[-1]
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            # an empty one too: Hydra would take the current folder and write into it
            if "${" not in value:
                try:
                    check_run_dir(value, overwrite=True, key=key)
                except ConfigError as exc:
                    fail(str(exc))

    @hydra.main(version_base="1.3", config_path="pkg://ddp_reduce.conf", config_name="config")
    def app(cfg: DictConfig) -> float | None:
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.mode is RunMode.MULTIRUN
        run_dir = hydra_cfg.runtime.output_dir if hydra_cfg.run.dir or sweep else ""

        def stop(outcome: str, message: str, code: int) -> float:
            """A point of a sweep ends with its outcome and the sweep goes on; a single run
            exits with the code."""
            if not sweep:
                fail(message, code=code)
            tally[outcome] = tally.get(outcome, 0) + 1
            print(f"ddp-reduce: error: {message}", file=sys.stderr, flush=True)
            return float("inf")

        with contextlib.ExitStack() as held:
            try:
                run_cfg = validate(cfg, cfg.dist.nproc)
                path = held.enter_context(claim_run_dir(run_dir, run_cfg.train.overwrite))
            except ConfigError as exc:
                discard_refused(run_dir)  # Hydra made its folder before the checks
                if sweep:  # ... and the sweep's report lists the point
                    point = Path(run_dir).name
                    task = list(hydra_cfg.overrides.task)
                    record_refused(hydra_cfg.sweep.dir, point, task, error_message(exc))
                return stop("refused", error_message(exc), 2)
            try:
                summary = launch_local(
                    to_dict(run_cfg),
                    str(path),
                    run_cfg.dist.nproc,
                    run_cfg.dist.max_restarts,
                    # a sweep keeps its ranks alive from one point to the next
                    reuse_ranks=sweep and run_cfg.dist.reuse_ranks,
                )
            # a CheckpointError: the one rank of a run with one, in this process
            except (LaunchError, PoolError, CheckpointError) as exc:
                return stop("failed", f"{exc}\nrun directory {path}", 1)
            except KeyboardInterrupt:
                fail(f"interrupted; run directory {path} (status: interrupted)", code=130)
            except Terminated:
                fail(f"stopped by SIGTERM; run directory {path} (status: failed)", code=143)
        print(format_summary(summary), flush=True)
        tally[summary["status"]] = tally.get(summary["status"], 0) + 1
        # What a sweeper minimizes; a diverged run is a result, not a crash.
        return summary["final_eval_loss"] if summary["status"] == "completed" else float("inf")

    try:
        with sigterm_as_exception():
            app()
    except Terminated:
        fail("stopped by SIGTERM", code=143)
    if sum(tally.values()) > 1 or tally.keys() - set(FINISHED):
        counts = ", ".join(f"{tally.get(k, 0)} {k}" for k in (*FINISHED, "failed", "refused"))
        print(f"ddp-reduce: {sum(tally.values())} points: {counts}", flush=True)
        if tally.get("failed") or tally.get("refused"):
            sys.exit(1)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sys.exit(module.main(argv[1:]))
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        sys.exit(0)
    _train()


if __name__ == "__main__":
    main()
