"""``ddp-reduce``: the Hydra app that starts ``dist.nproc`` local ranks itself.

ddp-reduce [key=value ...]               one run
ddp-reduce --multirun optim.lr=0.1,0.2   a sweep: one run directory per point
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from ddp_reduce.config import ConfigError, register_schema, to_dict
from ddp_reduce.launch import check_run_dir, fail, format_summary, launch_local, validate
from ddp_reduce.pool import PoolError

register_schema()


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


SUBCOMMANDS = {
    "convert": "ddp_reduce.convert",
    "study": "ddp_reduce.study",
    "report": "ddp_reduce.report",
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[sys.argv[1]])
        sys.exit(module.main(sys.argv[2:]))
    app()


if __name__ == "__main__":
    sys.exit(main())
