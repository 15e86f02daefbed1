"""What can be refused before a process group exists: the config, the devices, and the data and
model it names (prepared to check them, and kept by a rank that trains with them)."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from ddp_reduce.config import ConfigError, RunConfig, load_config
from ddp_reduce.distributed import resolve_device
from ddp_reduce.trainer import Prepared, prepare


def validate(
    cfg_dict: DictConfig | dict, world_size: int, local_world_size: int | None = None
) -> RunConfig:
    """Everything that can be refused before a process group exists."""
    return validate_prepared(cfg_dict, world_size, local_world_size)[0]


def validate_prepared(
    cfg_dict: DictConfig | dict | RunConfig,
    world_size: int,
    local_world_size: int | None = None,
    local_rank: int | None = None,
) -> tuple[RunConfig, Prepared]:
    """:func:`validate`, keeping the data and model it prepared to check them: a rank that
    validates its own config (under torchrun, ``local_rank`` given) trains with them instead
    of preparing twice; on CUDA they are made with its own device current, as in training.
    A RunConfig (from :func:`load_config`) is taken as parsed."""
    cfg = cfg_dict if isinstance(cfg_dict, RunConfig) else load_config(cfg_dict)
    for key in ("nan_rank", "crash_rank"):
        rank = getattr(cfg.fault, key)
        if rank >= world_size:
            raise ConfigError(f"fault.{key}", rank, f"a rank of this run: 0 to {world_size - 1}")
    resolve_device(cfg.dist, (local_world_size or world_size) - 1)  # enough devices here?
    device = resolve_device(cfg.dist, local_rank) if local_rank is not None else None
    # a rank's own: your data or model may allocate on "cuda", which must be its device, not
    # device 0 (a launcher, which uses no device, makes no CUDA context here)
    on_device = device is not None and device.type == "cuda"
    with torch.cuda.device(device) if on_device else contextlib.nullcontext():
        prepared = prepare(cfg, world_size)
    return cfg, prepared
