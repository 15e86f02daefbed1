"""The configuration schema: dataclasses hold types and checks, YAML in ``conf/`` the values.

Each component gets its own config, validated in ``__post_init__``; a bad value is refused at start
with a message naming the key, the value and what is allowed. Checks that need the world size
(what must divide what) are in :func:`batch_geometry`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddp_reduce.choices import (  # noqa: F401 (the schema's types, imported from here too)
    Backend,
    Device,
    LastBatch,
    Loader,
    OptimName,
    Precision,
    Schedule,
    SeqArch,
    Strategy,
)
from ddp_reduce.layer.noise import NOISE_BETA, NoiseSteps
from ddp_reduce.layer.reduction import (
    ReduceImpl,
    ReduceSettings,
)
from ddp_reduce.scaling import LrScaling


class ConfigError(ValueError):
    """A configuration value that is refused before any training."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = value.name if isinstance(value, Enum) else value
        super().__init__(f"{key}={shown} is not allowed: {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _positive(key: str, value: float | int) -> None:
    require(value > 0 and math.isfinite(value), key, value, "a positive number")


def _non_negative(key: str, value: float | int) -> None:
    require(value >= 0 and math.isfinite(value), key, value, "a number >= 0")


@dataclass
class DataConfig:
    name: str = "digits"  # a key of ddp_reduce.data.DATASETS (or data._target_: your own)
    # b: items (samples, or sequences for `sequences`) per rank per micro-step.
    batch_size: int = 32
    # N: when set, b is derived as N / (W·A), which must divide exactly.
    global_batch_size: int | None = None
    last_batch: LastBatch = LastBatch.drop
    data_seed: int = 0  # generation and train/test split; independent of the training seed
    test_fraction: float = 0.2  # digits
    n_train: int = 4096  # linear, sequences
    n_test: int = 1024  # linear, sequences
    dim: int = 16  # linear: input dimension
    eig_max: float = 1.0  # linear: largest eigenvalue of the input covariance
    eig_min: float = 0.01  # linear: smallest; the spectrum is geometric in between
    noise_std: float = 0.5  # linear: label noise
    vocab_size: int = 16  # sequences
    min_len: int = 4  # sequences: tokens per sequence, uniform in [min_len, max_len]
    max_len: int = 32
    concentration: float = 0.3  # sequences: Dirichlet concentration of the Markov chain's rows
    root: str | None = None  # text: folder of text files (default: Python's standard library)
    pattern: str = "**/*.py"  # text: which files under root (a glob)
    max_documents: int = 2000  # text: at most this many files, the first in sorted order
    # How batches reach the model: memory (whole splits on the device, the fast path), loader
    # (a torch DataLoader over a map-style Dataset: data that need not fit), auto (memory for
    # the built-in data, loader for data._target_).
    loader: Loader = Loader.auto
    num_workers: int = 0  # loader: DataLoader worker processes
    # data._target_=pkg.module.make_splits: your own data, a callable returning (train, eval)
    # map-style Datasets of (input, target) pairs; its other keys are its arguments.
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive("data.batch_size", self.batch_size)
        if self.global_batch_size is not None:
            _positive("data.global_batch_size", self.global_batch_size)
        require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "0 < x < 1")
        _positive("data.n_train", self.n_train)
        _positive("data.n_test", self.n_test)
        _positive("data.dim", self.dim)
        _positive("data.eig_max", self.eig_max)
        _positive("data.eig_min", self.eig_min)
        require(
            self.eig_min <= self.eig_max,
            "data.eig_min",
            self.eig_min,
            f"at most data.eig_max={self.eig_max}",
        )
        _non_negative("data.noise_std", self.noise_std)
        require(self.vocab_size >= 2, "data.vocab_size", self.vocab_size, "an integer >= 2")
        require(self.min_len >= 2, "data.min_len", self.min_len, "an integer >= 2")
        require(
            self.max_len >= self.min_len,
            "data.max_len",
            self.max_len,
            f"an integer >= data.min_len={self.min_len}",
        )
        _positive("data.concentration", self.concentration)
        _positive("data.max_documents", self.max_documents)
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        require(
            0 <= self.data_seed < 2**32,
            "data.data_seed",
            self.data_seed,
            "an integer in [0, 2^32)",
        )
        require(
            not (self.loader is Loader.memory and self.target is not None),
            "data.loader",
            self.loader,
            "auto or loader with data._target_ (your data are read through a DataLoader)",
        )


@dataclass
class ModelConfig:
    name: str = "mlp"  # a key of ddp_reduce.models.MODELS
    hidden: list[int] = field(default_factory=lambda: [64])  # mlp; cnn's classifier
    channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn
    batch_norm: bool = False  # mlp, cnn
    # Batch statistics over all ranks' items (DDP(W, b) then matches one process at W·b).
    sync_bn: bool = False
    arch: SeqArch = SeqArch.gru  # seq
    embed_dim: int = 32  # seq
    heads: int = 2  # seq, transformer
    # model._target_=pkg.module.Class: your own nn.Module; its other keys are its arguments.
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            len(self.hidden) > 0,
            "model.hidden",
            self.hidden,
            "a non-empty list of layer widths (model=linear has no hidden layer)",
        )
        for i, h in enumerate(self.hidden):
            _positive(f"model.hidden[{i}]", h)
        require(len(self.channels) > 0, "model.channels", self.channels, "a non-empty list")
        for i, ch in enumerate(self.channels):
            _positive(f"model.channels[{i}]", ch)
        require(
            not self.sync_bn or self.batch_norm,
            "model.sync_bn",
            self.sync_bn,
            "true only with model.batch_norm=true",
        )
        _positive("model.embed_dim", self.embed_dim)
        _positive("model.heads", self.heads)
        require(
            self.embed_dim % self.heads == 0,
            "model.heads",
            self.heads,
            f"a divisor of model.embed_dim={self.embed_dim}",
        )


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.1
    momentum: float = 0.9  # sgd (PyTorch's heavy-ball convention)
    nesterov: bool = False  # sgd
    # Added to the gradient by the optimizer, *after* the reduction: under c·G it acts as λ/c.
    weight_decay: float = 0.0
    # (l2/2)·|w|² added to every item's loss, *before* the reduction: it is scaled with the loss.
    l2: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    clip_norm: float | None = None  # global-norm clipping of the received gradient c·G
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    schedule: Schedule = Schedule.constant  # after warmup
    min_lr_ratio: float = 0.0  # cosine, linear: final lr as a fraction of lr
    # lr, betas and eps above are those of base_batch_size; the run's N rescales them
    lr_scaling: LrScaling = LrScaling.none
    base_batch_size: int | None = None

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        if self.lr_scaling is not LrScaling.none:
            require(
                self.base_batch_size is not None and self.base_batch_size > 0,
                "optim.base_batch_size",
                self.base_batch_size,
                f"a positive integer with optim.lr_scaling={self.lr_scaling.name}",
            )
        require(
            self.lr_scaling is not LrScaling.adam_sqrt or self.name is not OptimName.sgd,
            "optim.lr_scaling",
            self.lr_scaling,
            "none, linear or sqrt with optim.name=sgd (adam_sqrt is for adam and adamw)",
        )
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "0 <= momentum < 1")
        require(
            not self.nesterov or (self.name is OptimName.sgd and self.momentum > 0),
            "optim.nesterov",
            self.nesterov,
            "true only with optim.name=sgd and optim.momentum > 0",
        )
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.l2", self.l2)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            list(self.betas),
            "two numbers in [0, 1)",
        )
        _positive("optim.eps", self.eps)
        if self.clip_norm is not None:
            _positive("optim.clip_norm", self.clip_norm)
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "0 <= x <= 1")


@dataclass
class ReduceConfig(ReduceSettings):
    """``reduce.*``: the reduction's settings (their defaults and meaning are the layer's,
    :class:`ddp_reduce.layer.reduction.ReduceSettings`) and what the run measures of it."""

    # A logged step whose low-precision reduction is off the float64 one by more than this
    # (relative) is counted as lossy (reduce/lossy_logged_steps).
    lossy_threshold: float = 0.01

    def __post_init__(self) -> None:
        refused = self.refusal()
        if refused:
            raise ConfigError(*refused)
        _positive("reduce.lossy_threshold", self.lossy_threshold)


STEPS_MAX = 2**63 - 1
# fp16's loss scaler keeps its factor and multiplies the gradients by its reciprocal, both
# float32: each must be a normal float32 number (2^-126 .. 2^127).
LOSS_SCALE_BOUNDS = (2.0**-126, 2.0**127)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    accum_steps: int = 1  # A: micro-steps per optimizer step
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    log_every: int = 10  # steps between logged metrics
    overwrite: bool = False  # allow a run directory that already holds a completed run
    progress: bool = True  # progress bar on rank 0 when attached to a terminal
    checkpoint_every: int = 0  # steps between checkpoints (0: none); a restart resumes from one
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones are the fallback if corrupt)
    # Stop once the loss over the whole training set is at most this (checked every eval_every
    # steps); the summary gives steps_to_target. Null: train all steps.
    target_loss: float | None = None
    # A run whose all-reduced training loss exceeds this multiple of its initial loss (on a
    # logged step, or at the end) has blown up: it ends as diverged. Null: only NaN/inf count.
    blowup_factor: float | None = 1000.0
    precision: Precision = Precision.fp32  # autocast of the forward and the loss
    # fp16: the loss scaler's first factor (PyTorch's default). A summed loss's gradients are c
    # times a mean's: overflowing steps are skipped while the scaler halves it, or start lower.
    loss_scale_init: float = 65536.0

    def __post_init__(self) -> None:
        _positive("train.steps", self.steps)
        require(
            self.steps <= STEPS_MAX,
            "train.steps",
            self.steps,
            f"at most {STEPS_MAX} (steps are counted in 64-bit integers)",
        )
        low, high = LOSS_SCALE_BOUNDS
        require(
            low <= self.loss_scale_init <= high,
            "train.loss_scale_init",
            self.loss_scale_init,
            f"a number from 2^-126 to 2^127 ({low:.3g} to {high:.3g}): the loss scaler holds "
            "the factor and its reciprocal in float32 (beyond, a step's update is NaN or the "
            "scaler fails)",
        )
        if self.blowup_factor is not None:
            require(
                self.blowup_factor > 1 and math.isfinite(self.blowup_factor),
                "train.blowup_factor",
                self.blowup_factor,
                "a number > 1, or null",
            )
        if self.target_loss is not None:
            _positive("train.target_loss", self.target_loss)
            require(
                self.eval_every > 0,
                "train.eval_every",
                self.eval_every,
                f"a positive number with train.target_loss={self.target_loss} (the target is "
                "checked at evaluations), or train.target_loss=null",
            )
        _non_negative("train.checkpoint_every", self.checkpoint_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _positive("train.accum_steps", self.accum_steps)
        _non_negative("train.eval_every", self.eval_every)
        _positive("train.log_every", self.log_every)


@dataclass
class DistConfig:
    nproc: int = 2  # ranks started by `ddp-reduce` (torchrun's --nproc-per-node decides there)
    strategy: Strategy = Strategy.ddp
    device: Device = Device.cpu  # the backend follows: gloo on cpu, nccl on cuda
    backend: Backend = Backend.auto  # auto: nccl on cuda, gloo on cpu
    timeout_s: float = 300.0  # collective timeout: how long a rank waits for a lost peer
    threads_per_rank: int | None = None  # cpu: default cores / local ranks
    max_restarts: int = 0  # ddp-reduce: restarts of all ranks after a failure (torchrun: its flag)
    # ddp-reduce --multirun: keep the ranks and their process group alive from one sweep point
    # to the next (each point still gets its own model, optimizer, seed and run directory)
    reuse_ranks: bool = True
    # dist.strategy=hsdp: R, the replicas of each shard (W = R·S ranks; S = W/R per shard group)
    replicate: int | None = None

    def __post_init__(self) -> None:
        _positive("dist.nproc", self.nproc)
        if self.strategy is Strategy.hsdp or self.replicate is not None:
            require(
                self.strategy is Strategy.hsdp,
                "dist.replicate",
                self.replicate,
                f"null with dist.strategy={self.strategy.name} (replicas are HSDP's: "
                "dist.strategy=hsdp)",
            )
            require(
                isinstance(self.replicate, int) and self.replicate > 0,
                "dist.replicate",
                self.replicate,
                "a positive integer R dividing the world size (W = R x S) with dist.strategy=hsdp",
            )
        _non_negative("dist.max_restarts", self.max_restarts)
        _positive("dist.timeout_s", self.timeout_s)
        require(
            self.timeout_s <= 7 * 24 * 3600,
            "dist.timeout_s",
            self.timeout_s,
            "at most a week (604800 s)",
        )
        if self.threads_per_rank is not None:
            _positive("dist.threads_per_rank", self.threads_per_rank)
        require(
            not (self.device is Device.cpu and self.backend is Backend.nccl),
            "dist.backend",
            self.backend,
            "gloo or auto with dist.device=cpu (nccl needs cuda)",
        )


@dataclass
class NoiseConfig:
    """Online estimate of the gradient noise scale (docs/design.md §3), from two batch sizes
    per step: one rank's gradient (W >= 2) or its first micro-batch (W = 1, A >= 2), and the
    reduced one."""

    enabled: bool = True  # estimated whenever two batch sizes exist; summary says if not
    beta: float = NOISE_BETA  # smoothing of the numerator and denominator (bias-corrected EMAs)
    # which steps feed it: the logged ones (every train.log_every-th: beta then smooths over
    # 1/(1 - beta) logged steps) or every step (a cost of several percent on a small model)
    steps: NoiseSteps = NoiseSteps.logged

    def __post_init__(self) -> None:
        require(0 <= self.beta < 1, "noise.beta", self.beta, "0 <= beta < 1")


@dataclass
class FaultConfig:
    """Faults injected on purpose, to test how a run fails. Off by default."""

    nan_at_step: int | None = None  # poison one rank's loss with NaN at this step (1-based)
    nan_rank: int = 0
    # Kill one rank (SIGKILL) at the start of this step, in the first attempt only (a restarted
    # run, TORCHELASTIC_RESTART_COUNT > 0, goes on).
    crash_at_step: int | None = None
    crash_rank: int = 0

    def __post_init__(self) -> None:
        for key in ("nan_at_step", "crash_at_step"):
            if getattr(self, key) is not None:
                _positive(f"fault.{key}", getattr(self, key))
        for key in ("nan_rank", "crash_rank"):
            require(getattr(self, key) >= 0, f"fault.{key}", getattr(self, key), "a rank >= 0")


@dataclass
class LossConfig:
    """loss._target_=pkg.module.Loss: your own loss, a callable built from the other keys and
    called as loss(output, target) -> (summed loss, item count). Default: the data's own
    (cross-entropy per sample for data._target_)."""

    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2^63)")
        require(
            self.dist.strategy is Strategy.ddp or self.reduce.impl is ReduceImpl.hook,
            "reduce.impl",
            self.reduce.impl,
            f"hook with dist.strategy={self.dist.strategy.name} (the reduction rides FSDP's "
            "reduce-scatter; builtin "
            "and manual are DDP's)",
        )


# Nodes that take Hydra's `_target_` convention: your own callable, its arguments as keys.
TARGETED = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig}
_INTERNAL = ("target", "kwargs")  # how a _target_ node is held in the typed config
# Keys of the built-in data sets and models, which mean nothing to your own (_target_): set
# beside a _target_ they are refused, never silently dropped. An argument of yours with one of
# these names goes under kwargs: +data.kwargs.n_train=512.
BUILT_IN_ONLY = {
    "data": (
        "name",
        "test_fraction",
        "n_train",
        "n_test",
        "dim",
        "eig_max",
        "eig_min",
        "noise_std",
        "vocab_size",
        "min_len",
        "max_len",
        "concentration",
        "root",
        "pattern",
        "max_documents",
    ),
    "model": ("name", "hidden", "channels", "batch_norm", "arch", "embed_dim", "heads"),
    "loss": (),
}


def load_config(cfg: DictConfig | dict) -> RunConfig:
    """Typed, validated RunConfig from a composed Hydra config or a plain dict.

    Keys outside the schema (``hydra``) are ignored. An unknown key, a value of the wrong type
    or out of range is a :class:`ConfigError` naming the key, the value and what is allowed.
    """
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(_key(exc), "(unresolved)", str(exc).splitlines()[0]) from None
    plain = {k: v for k, v in cfg.items() if k != "hydra"}
    for key, cls in TARGETED.items():
        node = plain.get(key)
        if isinstance(node, dict) and "_target_" in node:
            plain[key] = _held_target(key, cls, node)
    _check_keys(RunConfig, plain, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        value = getattr(exc, "value", None)
        raise ConfigError(_key(exc), value, str(exc).splitlines()[0]) from None


def _key(exc: Exception) -> str:
    return str(getattr(exc, "full_key", None) or "config")


def _held_target(key: str, cls: type, node: dict) -> dict:
    """A `_target_` node as the typed config holds it: schema keys, target, the rest kwargs."""
    target = node["_target_"]
    require(
        isinstance(target, str) and target.strip() != "",
        f"{key}._target_",
        target,
        "a dotted path to a callable, e.g. mypkg.models.Net",
    )
    schema = {f.name for f in dataclasses.fields(cls)} - set(_INTERNAL)
    held = {k: v for k, v in node.items() if k in schema}
    held["target"] = target
    kwargs = {k: v for k, v in node.items() if k not in schema and k not in ("_target_", "kwargs")}
    named = node.get("kwargs", {})  # arguments whose names are keys of the built-in ones
    require(isinstance(named, dict), f"{key}.kwargs", named, "argument names and values")
    kwargs.update(named)
    held["kwargs"] = kwargs
    defaults = OmegaConf.to_container(OmegaConf.structured(cls()), enum_to_str=True)
    for k in BUILT_IN_ONLY[key]:
        if k in held and held[k] != defaults[k]:
            raise ConfigError(
                f"{key}.{k}",
                held[k],
                f"its default with {key}._target_={target} (a key of the built-in {key} only, "
                f"which yours does not take); an argument of yours of this name: "
                f"+{key}.kwargs.{k}=...",
            )
    return held


def _check_keys(cls: type, node: Any, prefix: str) -> None:
    """Refuse keys the schema does not have, naming them and the keys it has."""
    if not (dataclasses.is_dataclass(cls) and isinstance(node, dict)):
        return
    types = typing.get_type_hints(cls)
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in types:
            allowed = sorted(k for k in types if k not in _INTERNAL)
            name = prefix.rstrip(".")
            hint = f", or {name}._target_ for your own" if name in TARGETED else ""
            raise ConfigError(path, value, f"a key of {name or 'the config'}: {allowed}{hint}")
        if key not in _INTERNAL:
            _check_keys(types[key], value, path + ".")


def _plain(value: Any) -> Any:
    """A checked config as plain data, enums by name: what OmegaConf.to_container gives for
    OmegaConf.structured(value), written out because that round trip costs 30-90 ms a run
    (a study runs hundreds) and a RunConfig holds resolved values only."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: RunConfig) -> dict:
    """Plain, resolved container of a RunConfig (what is saved and sent to ranks); a
    `_target_` node in Hydra's form, as it was given."""
    out = _plain(cfg)
    for key, cls in TARGETED.items():
        node = out[key]
        target, kwargs = node.pop("target"), node.pop("kwargs")
        if target is not None:
            schema = {f.name for f in dataclasses.fields(cls)}
            named = {k: v for k, v in kwargs.items() if k in schema}
            node.update({"_target_": target, **{k: v for k, v in kwargs.items() if k not in named}})
            if named:  # an argument named like a key of the built-in ones stays apart
                node["kwargs"] = named
    return out


@dataclass(frozen=True)
class BatchGeometry:
    world_size: int  # W
    local_batch_size: int  # b
    accum_steps: int  # A
    global_batch_size: int  # N = W·b·A


def batch_geometry(cfg: RunConfig, world_size: int, n_train: int) -> BatchGeometry:
    """Derive W, b, A, N and refuse what does not divide or fit."""
    a = cfg.train.accum_steps
    if cfg.dist.replicate is not None:
        require(
            world_size % cfg.dist.replicate == 0,
            "dist.replicate",
            cfg.dist.replicate,
            f"a positive integer dividing the world size {world_size} (R x S = W ranks)",
        )
    if cfg.data.global_batch_size is not None:
        n = cfg.data.global_batch_size
        require(
            n % (world_size * a) == 0,
            "data.global_batch_size",
            n,
            f"a multiple of world size x train.accum_steps = {world_size} x {a} = {world_size * a}",
        )
        b = n // (world_size * a)
    else:
        b = cfg.data.batch_size
        n = world_size * b * a
    require(
        n <= n_train,
        "data.global_batch_size" if cfg.data.global_batch_size else "data.batch_size",
        n if cfg.data.global_batch_size else b,
        f"a global batch W*b*A = {world_size}*{b}*{a} = {n} of at most the {n_train} training "
        "items",
    )
    last = n_train % n
    if cfg.data.last_batch is LastBatch.keep and last:
        require(
            last >= world_size * a,
            "data.last_batch",
            cfg.data.last_batch,
            f"drop: the last global batch would hold {last} items, fewer than one per rank and "
            f"micro-step ({world_size * a})",
        )
    return BatchGeometry(world_size, b, a, n)


SCHEMA_NAME = "run_schema"


def hydra_schema() -> type:
    """The schema as Hydra composes it: RunConfig, with the `_target_` nodes open (any keys,
    checked by :func:`load_config`) and holding the same defaults."""
    types = typing.get_type_hints(RunConfig)
    defaults = to_dict(RunConfig())
    spec = []
    for f in dataclasses.fields(RunConfig):
        if f.name in TARGETED:
            node = defaults[f.name]
            spec.append((f.name, Any, field(default_factory=lambda node=node: dict(node))))
        elif f.default_factory is not dataclasses.MISSING:
            spec.append((f.name, types[f.name], field(default_factory=f.default_factory)))
        else:
            spec.append((f.name, types[f.name], f.default))
    return dataclasses.make_dataclass("RunSchema", spec)


def register_schema() -> None:
    """Make the schema available to Hydra's defaults list as ``run_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=hydra_schema())
