"""Entry point under torchrun (or alone, as one process):

    torchrun --nproc-per-node 2 -m ddp_reduce.train [key=value ...]
    python -m ddp_reduce.train [key=value ...]

Every rank composes the same config from the same overrides with Hydra's compose API (no
``@hydra.main``, which would make one timestamped directory per rank); rank 0's run directory is
broadcast to the others.
"""

from __future__ import annotations

import os
import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ddp_reduce.config import ConfigError, register_schema
from ddp_reduce.launch import (
    check_run_dir,
    error_message,
    fail,
    format_summary,
    rank_main,
    validate,
)


def compose_config(overrides: list[str]) -> tuple[dict, str]:
    """The resolved config (without Hydra's own node) and its run directory."""
    register_schema()
    with initialize_config_module("ddp_reduce.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    run_dir = os.path.abspath(OmegaConf.select(cfg, "hydra.run.dir"))
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    container.pop("hydra")
    return container, run_dir


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if any(a in ("-m", "--multirun") for a in overrides):
        fail(
            "--multirun under torchrun makes every rank run the whole sweep; "
            "use `ddp-reduce --multirun ...` instead"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg_dict, run_dir = compose_config(overrides)
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        run_cfg = validate(cfg_dict, world_size, local_world_size)
        check_run_dir(run_dir, run_cfg.train.overwrite)
    except (ConfigError, HydraException) as exc:
        if is_main:
            fail(error_message(exc))
        sys.exit(2)
    summary = rank_main(cfg_dict, run_dir)
    if summary is not None:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
