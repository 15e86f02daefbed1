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


def _built_in_key_hint(arg: str) -> str | None:
    """What to write instead of ``+data.n_train=512``: a key the config already has (Hydra
    would say only that an item is already there)."""
    import dataclasses

    from ddp_reduce.config import _INTERNAL, TARGETED
    from ddp_reduce.run.compose import override_key

    key = override_key(arg)
    if not arg.startswith("+") or arg.startswith("++") or key is None or key.count(".") != 1:
        return None
    group, name = key.split(".")
    if group not in TARGETED or name in _INTERNAL:
        return None
    if name not in {f.name for f in dataclasses.fields(TARGETED[group])}:
        return None
    value = arg.split("=", 1)[1]
    return (
        f"{arg}: {key} is a key of the config already; set it without '+' ({key}={value}), "
        f"or, for an argument of your own {group}._target_ of that name, "
        f"+{group}.kwargs.{name}={value}"
    )


def _check_before_hydra(argv: list[str]) -> None:
    """What is refused before Hydra writes anything. Hydra creates the run (or sweep) folder
    before the app runs: one it cannot create is refused here, with the key, rather than as
    Hydra's own traceback; so is a sweep into another sweep's folder."""
    from ddp_reduce.config import ConfigError
    from ddp_reduce.run.claim import check_run_dir
    from ddp_reduce.run.cli_errors import fail
    from ddp_reduce.run.compose import override_key
    from ddp_reduce.run.rundir import check_sweep_dir

    multirun = any(a in ("-m", "--multirun") for a in argv)
    task = [a for a in argv if not (override_key(a) or "hydra.").startswith("hydra.")]
    for arg in argv:
        key = override_key(arg)
        value = arg.split("=", 1)[-1]
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            # an empty one too: Hydra would take the current folder and write into it
            if "${" not in value:
                try:
                    check_run_dir(value, overwrite=True, key=key)
                    if key == "hydra.sweep.dir" and multirun:
                        check_sweep_dir(value, task)
                except ConfigError as exc:
                    fail(str(exc))
        hint = _built_in_key_hint(arg)
        if hint:
            fail(hint)


def _train() -> None:
    """The Hydra app (imported only now: torch and Hydra take a second to load)."""
    from ddp_reduce.config import ConfigError, register_schema
    from ddp_reduce.run.cli_errors import fail
    from ddp_reduce.run.rank_server import start_rank_server

    try:
        start_rank_server()  # the ranks' imports run while this process composes the config
    except ConfigError as exc:
        fail(str(exc))
    import hydra

    from ddp_reduce.run.rundir import register_resolvers
    from ddp_reduce.run.signals import Terminated, launcher_signals

    register_schema()
    register_resolvers()  # the sweep's folder names (conf/config.yaml: hydra.sweep.subdir)
    _check_before_hydra(sys.argv[1:])
    tally: dict[str, int] = {}  # a sweep's points by outcome

    @hydra.main(version_base="1.3", config_path="pkg://ddp_reduce.conf", config_name="config")
    def app(cfg) -> float | None:
        return _run_point(cfg, tally)

    try:
        with launcher_signals():
            app()
    except Terminated as exc:
        fail(str(exc), code=_signal_exit_code(exc.signum))
    _report_tally(tally)


def _signal_exit_code(signum: int) -> int:
    return 128 + signum  # as a shell reports a process ended by the signal


def _run_point(cfg, tally: dict[str, int]) -> float | None:
    """One run of the app (one point of a sweep): parse and check its config once, claim its
    folder, launch its ranks, print its summary. Returns what a sweeper minimizes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ddp_reduce.config import ConfigError, load_config
    from ddp_reduce.run.claim import claim_run_dir
    from ddp_reduce.run.cli_errors import error_message, fail
    from ddp_reduce.run.rundir import discard_refused, record_refused
    from ddp_reduce.run.signals import Stopped, Terminated
    from ddp_reduce.run.summary import Status, format_summary

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
            # the one parse of this run's config: its own values refused before torch loads
            run_cfg = load_config(cfg)
            from ddp_reduce.run.validate import validate_prepared  # torch: seconds to load

            nproc = run_cfg.dist.nproc
            # one rank here trains with what this process prepared to check it
            run_cfg, prepared = validate_prepared(
                run_cfg, nproc, local_rank=0 if nproc == 1 else None
            )
            path = held.enter_context(claim_run_dir(run_dir, run_cfg.train.overwrite))
        except ConfigError as exc:
            discard_refused(run_dir)  # Hydra made its folder before the checks
            if sweep:  # ... and the sweep's report lists the point
                task = list(hydra_cfg.overrides.task)
                record_refused(hydra_cfg.sweep.dir, Path(run_dir).name, task, error_message(exc))
            return stop("refused", error_message(exc), 2)
        except Exception as exc:  # not the config's: this point fails, a sweep goes on
            discard_refused(run_dir)
            return stop("failed", f"{type(exc).__name__}: {error_message(exc)}", 1)
        from ddp_reduce.run.checkpoint import CheckpointError
        from ddp_reduce.run.launch import LaunchError, launch_local
        from ddp_reduce.run.pool import PoolError

        try:
            # a sweep keeps its ranks alive from one point to the next
            reuse = sweep and run_cfg.dist.reuse_ranks
            summary = launch_local(run_cfg, str(path), prepared, reuse_ranks=reuse)
        # a CheckpointError: the one rank of a run with one, in this process
        # OSError: the run's own files (a full disk), in this process with one rank
        except (LaunchError, PoolError, CheckpointError, OSError) as exc:
            return stop("failed", f"{exc}\nrun directory {path}", 1)
        except KeyboardInterrupt:
            fail(f"interrupted; run directory {path} (status: interrupted)", code=130)
        except (Terminated, Stopped) as exc:  # Stopped: the one rank, in this process
            how = f"{exc}; run directory {path} (status: {exc.status.value})"
            fail(how, code=_signal_exit_code(exc.signum))
    print(format_summary(summary), flush=True)
    tally[summary.status.value] = tally.get(summary.status.value, 0) + 1
    # What a sweeper minimizes; a diverged run is a result, not a crash.
    return summary.final_eval_loss if summary.status is Status.completed else float("inf")


def _report_tally(tally: dict[str, int]) -> None:
    """A sweep's (or a failed run's) points by outcome; exit 1 if any failed or was refused."""
    from ddp_reduce.run.summary import FINISHED

    finished = [s.value for s in FINISHED]
    if sum(tally.values()) > 1 or tally.keys() - set(finished):
        counts = ", ".join(f"{tally.get(k, 0)} {k}" for k in (*finished, "failed", "refused"))
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
