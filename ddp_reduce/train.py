"""Entry point under torchrun (or alone, as one process):

    torchrun --nproc-per-node 2 -m ddp_reduce.train [key=value ...]
    python -m ddp_reduce.train [key=value ...]

Every rank composes the same config from the same overrides; rank 0's run directory is
broadcast to the others.
"""

from __future__ import annotations

import contextlib
import os
import sys

from hydra.errors import HydraException

from ddp_reduce.config import ConfigError
from ddp_reduce.distributed import exit_now
from ddp_reduce.run.checkpoint import CheckpointError
from ddp_reduce.run.claim import claim_run_dir
from ddp_reduce.run.cli_errors import error_message, fail
from ddp_reduce.run.compose import compose_config, override_key
from ddp_reduce.run.launch import rank_main
from ddp_reduce.run.signals import process_ends_with_run
from ddp_reduce.run.summary import format_summary
from ddp_reduce.run.validate import validate_prepared


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    # every rank says why it stops: torchrun stops the other ranks as soon as one of them exits,
    # so a message left to rank 0 alone is lost whenever another rank exits first
    said = "ddp-reduce: error: " if is_main else f"ddp-reduce: error (rank {rank}): "
    if any(a in ("-m", "--multirun") for a in overrides):
        fail(
            "--multirun under torchrun makes every rank run the whole sweep; "
            "use `ddp-reduce --multirun ...` instead"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    with contextlib.ExitStack() as held:
        try:
            cfg_dict, run_dir = compose_config(overrides)
            # this rank validates its own config: the data and model it prepared are kept
            run_cfg, prepared = validate_prepared(
                cfg_dict, world_size, local_world_size, int(os.environ.get("LOCAL_RANK", "0"))
            )
            nproc = [o.split("=", 1)[1] for o in overrides if override_key(o) == "dist.nproc"]
            if nproc and run_cfg.dist.nproc != local_world_size:
                raise ConfigError(
                    "dist.nproc",
                    nproc[-1],
                    f"the ranks torchrun starts on this node ({local_world_size}: its "
                    "--nproc-per-node decides), or leave dist.nproc out",
                )
            if is_main:  # rank 0 holds the run directory; the others get its path from it
                run_dir = str(held.enter_context(claim_run_dir(run_dir, run_cfg.train.overwrite)))
        except (ConfigError, HydraException) as exc:
            print(said + error_message(exc), file=sys.stderr, flush=True)
            sys.exit(2)
        process_ends_with_run()
        try:
            summary = rank_main(run_cfg, run_dir, prepared=prepared)
        except (CheckpointError, ConfigError) as exc:  # every rank has it alike
            print(f"{said}{exc}", file=sys.stderr, flush=True)
            return 1
    if summary is not None:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    exit_now(main())  # the group is torn down and the results written: see exit_now
