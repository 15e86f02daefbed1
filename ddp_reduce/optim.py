"""Optimizer and learning-rate schedule from their config, with batch-size scaling rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ddp_reduce.config import ConfigError, LrScaling, OptimConfig, OptimName, Schedule


@dataclass(frozen=True)
class EffectiveOptim:
    """The hyperparameters a run uses once optim.lr_scaling has met its global batch."""

    rule: str
    kappa: float  # N / base_batch_size (1 without a rule)
    lr: float
    betas: tuple[float, float]
    eps: float


def effective_optim(cfg: OptimConfig, global_batch_size: int) -> EffectiveOptim:
    """Apply optim.lr_scaling for a global batch of N items.

    linear: lr·k; sqrt: lr·√k; adam_sqrt (Malladi et al. 2022): lr·√k, each β → 1 − k(1 − β),
    ε → ε/√k; with k = N / optim.base_batch_size.
    """
    b1, b2 = cfg.betas
    if cfg.lr_scaling is LrScaling.none:
        return EffectiveOptim("none", 1.0, cfg.lr, (b1, b2), cfg.eps)
    k = global_batch_size / cfg.base_batch_size
    if cfg.lr_scaling is LrScaling.linear:
        return EffectiveOptim("linear", k, cfg.lr * k, (b1, b2), cfg.eps)
    if cfg.lr_scaling is LrScaling.sqrt:
        return EffectiveOptim("sqrt", k, cfg.lr * math.sqrt(k), (b1, b2), cfg.eps)
    betas = (1 - k * (1 - b1), 1 - k * (1 - b2))
    if min(betas) < 0:
        raise ConfigError(
            "optim.lr_scaling",
            "adam_sqrt",
            f"a batch ratio k = N/base = {global_batch_size}/{cfg.base_batch_size} = {k:g} "
            f"that keeps 1 - k(1 - beta) >= 0 for betas {list(cfg.betas)} (here {list(betas)})",
        )
    return EffectiveOptim("adam_sqrt", k, cfg.lr * math.sqrt(k), betas, cfg.eps / math.sqrt(k))


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, global_batch_size: int
) -> torch.optim.Optimizer:
    params = list(model.parameters())
    eff = effective_optim(cfg, global_batch_size)
    if cfg.name is OptimName.sgd:
        return torch.optim.SGD(
            params,
            lr=eff.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    cls = torch.optim.Adam if cfg.name is OptimName.adam else torch.optim.AdamW
    return cls(params, lr=eff.lr, betas=eff.betas, eps=eff.eps, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule is Schedule.constant:
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule is Schedule.cosine:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_schedule(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, total_steps, step)
    )
