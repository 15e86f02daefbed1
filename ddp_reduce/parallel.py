"""The data-parallel strategy, one seam: DDP (every rank holds the whole model) or FSDP2
(parameters, gradients and optimizer state sharded over the ranks, as torchtitan does; HSDP:
sharded over the ranks of a shard group, the groups replicated).

Everything that differs between the two is here: how the model is wrapped, how the norm of the
(possibly sharded) gradient is taken, and how the whole model's state is gathered or set. The
reduction layer (:mod:`ddp_reduce.layer.reducer`) attaches to either; the trainer does not branch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_reduce.config import ConfigError, Strategy
from ddp_reduce.distributed import DistContext
from ddp_reduce.layer.strategy import is_fsdp


def wrap(
    model: nn.Module,
    strategy: Strategy,
    ctx: DistContext,
    reduce_dtype=None,
    replicate: int | None = None,
) -> nn.Module:
    """The module the steps run: ``DDP(model)``, or ``model`` itself sharded in place (each
    child holding parameters its own FSDP unit, then the root, as torchtitan shards blocks);
    under HSDP on a (replicate, shard) mesh of ``replicate`` x W/``replicate`` ranks.

    ``reduce_dtype``: the dtype FSDP's reduce-scatter runs in (its MixedPrecisionPolicy).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model", type(model).__name__, "a model with parameters to train")
    if strategy is Strategy.ddp:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    mesh = _hsdp_mesh(replicate, ctx) if strategy is Strategy.hsdp else None
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _hsdp_mesh(replicate: int, ctx: DistContext):
    """HSDP's 2-D mesh: R replicas (the outer dimension) of shard groups of S = W/R ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (replicate, ctx.world_size // replicate)  # R divides W (config.batch_geometry)
    return init_device_mesh(ctx.device.type, shape, mesh_dim_names=("replicate", "shard"))


def unwrapped(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


def clip(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Clip the gradients to ``max_norm`` given their global ``norm`` (sharded or not), with
    PyTorch's formula: times min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(hasattr(g, "to_local") for g in grads):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    scale = min(1.0, max_norm / (float(norm) + 1e-6))  # a shard takes a number, not a tensor
    for g in grads:
        g.mul_(scale)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, keyed as the plain model's state_dict; a
    collective under FSDP (every rank calls it; each gets the whole)."""
    model = unwrapped(module)
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (the same layout under DDP and
    FSDP, so a checkpoint of one loads into the other); a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opts = _options(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrapped(module), optimizer, options=opts)


def set_full_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load whole states (as the functions above give them) into either strategy."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        unwrapped(module),
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=_options(full_state_dict=True),
    )


def local_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards only)."""

    def nbytes(t: torch.Tensor) -> int:
        local = _local(t)
        return local.numel() * local.element_size()

    params = list(unwrapped(module).parameters())
    optim = sum(
        nbytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return {
        "parameters": sum(nbytes(p) for p in params),
        "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": optim,
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of the parameters, copied (for the size of the next update)."""
    return [_local(p.detach()).clone() for p in params]


def update_to_weight(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """|w_after - w_before| / |w_after| over the whole model, shards summed across ranks."""
    sums = torch.zeros(2, dtype=torch.float64, device=before[0].device if before else "cpu")
    for b, p in zip(before, params, strict=True):
        now = _local(p.detach()).double()
        sums[0] += (now - b.double()).pow(2).sum()
        sums[1] += now.pow(2).sum()
    if any(hasattr(p, "to_local") for p in params):
        dist.all_reduce(sums)
    return float((sums[0] / sums[1]).sqrt())
