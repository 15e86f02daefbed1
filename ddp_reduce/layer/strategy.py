"""What the layer needs to know of the data-parallel strategy: whether a module is sharded by
FSDP2, and the global norm of its (whole or sharded) gradient. Torch only, so the layer stays on
the ground floor; the harness's wrapping and state gathering are in :mod:`ddp_reduce.parallel`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global norm of the parameters' gradients, whole or sharded, on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if all(type(g) is torch.Tensor and g.dtype is torch.float32 for g in grads):
        # whole fp32 gradients (DDP): one fused kernel for the norms; PyTorch's get_total_norm
        # (below) does the same after grouping by device and dtype, which costs more than the
        # norms of a small model
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
