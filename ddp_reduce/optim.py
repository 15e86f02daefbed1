"""Optimizer and learning-rate schedule from their config (scaling rules: ``scaling.py``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ddp_reduce.config import ConfigError, OptimConfig, OptimName, Schedule
from ddp_reduce.scaling import Scaled, ScalingError, scale


def effective_optim(cfg: OptimConfig, global_batch_size: int) -> Scaled:
    """lr, betas and eps once optim.lr_scaling has met a global batch of N items."""
    kappa = global_batch_size / cfg.base_batch_size if cfg.base_batch_size else 1.0
    try:
        return scale(cfg.lr_scaling, kappa, cfg.lr, tuple(cfg.betas), cfg.eps)
    except ScalingError as exc:
        raise ConfigError(
            "optim.lr_scaling",
            cfg.lr_scaling,
            f"{exc}; k = N/base = {global_batch_size}/{cfg.base_batch_size}",
        ) from None


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
