"""``ddp-reduce``: training runs (a Hydra app that starts ``dist.nproc`` local ranks itself),
and the subcommands ``convert``, ``study`` and ``report``.

``convert`` and ``--help`` answer without importing torch or Hydra.
"""

from __future__ import annotations

import sys
from importlib import resources

SUBCOMMANDS = {
    "convert": ("ddp_reduce.analysis.convert", "rewrite a setting for another sum/mean convention"),
    "study": ("ddp_reduce.analysis.study", "run a study's sweep and write its report"),
    "report": ("ddp_reduce.analysis.report", "(re)write the report of a study, sweep or run"),
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

common keys: reduce.loss=sum|mean  reduce.op=sum|mean|global_mean  dist.nproc=N
  dist.device=cpu|cuda  data.batch_size=b  train.accum_steps=A  train.steps  optim.lr
  hydra.run.dir=PATH (the run directory); every key: ddp-reduce --cfg job
  your own model and data: +model._target_=pkg.Class  +data._target_=pkg.make_splits

Hydra's own flags: --cfg job|hydra, --resolve, --info, --hydra-help.
"""


def _train() -> None:
    """The Hydra app (imported only now: torch and Hydra take a second to load)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ddp_reduce.config import ConfigError, register_schema, to_dict
    from ddp_reduce.run.launch import check_run_dir, fail, format_summary, launch_local, validate
    from ddp_reduce.run.pool import PoolError
    from ddp_reduce.run.rundir import register_resolvers

    register_schema()
    register_resolvers()  # the sweep's folder names (conf/config.yaml: hydra.sweep.subdir)

    @hydra.main(version_base="1.3", config_path="pkg://ddp_reduce.conf", config_name="config")
    def app(cfg: DictConfig) -> float | None:
        run_dir = HydraConfig.get().runtime.output_dir
        try:
            run_cfg = validate(cfg, cfg.dist.nproc)
            check_run_dir(run_dir, run_cfg.train.overwrite)
        except ConfigError as exc:
            fail(str(exc))
        # A sweep keeps its ranks alive from one point to the next (no start-up cost per point).
        sweep = HydraConfig.get().mode is RunMode.MULTIRUN and run_cfg.dist.reuse_ranks
        try:
            summary = launch_local(
                to_dict(run_cfg),
                run_dir,
                run_cfg.dist.nproc,
                run_cfg.dist.max_restarts,
                reuse_ranks=sweep,
            )
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            fail(
                f"rank {rank} failed with exit code {failure.exitcode} (its error is above); "
                f"run directory {run_dir}",
                code=1,
            )
        except PoolError as exc:
            fail(f"{exc}\nrun directory {run_dir}", code=1)
        print(format_summary(summary), flush=True)
        # What a sweeper minimizes; a diverged run is a result, not a crash.
        return summary["final_eval_loss"] if summary["status"] == "completed" else float("inf")

    app()


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
