"""The choices of a run's settings other than the reduction's (those are in
:mod:`ddp_reduce.layer.reduction`): plain enums with no dependencies, so that ``ddp-reduce --help``
lists them without loading the config machinery. The schema (:mod:`ddp_reduce.config`) types its
keys with them.
"""

from __future__ import annotations

from enum import Enum


# OmegaConf matches an Enum by member *name*: the names are the values users type.
class Loader(Enum):
    auto = "auto"
    memory = "memory"
    loader = "loader"


class LastBatch(Enum):
    drop = "drop"  # an epoch's final partial global batch is skipped
    keep = "keep"  # ... or used as it is, smaller (ragged); never padded with duplicated items


class SeqArch(Enum):
    gru = "gru"
    transformer = "transformer"


class OptimName(Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    """What the model computes in: fp32, or autocast to bf16 / fp16 (fp16 with a loss scaler)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Strategy(Enum):
    ddp = "ddp"  # every rank holds the whole model: DistributedDataParallel
    fsdp = "fsdp"  # parameters, gradients and optimizer state sharded: FSDP2 (fully_shard)
    # FSDP2 on a 2-D mesh: sharded over S ranks, replicated R times (dist.replicate=R, R·S = W)
    hsdp = "hsdp"


class Backend(Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"
