"""The module to hook inside the wrapped models training frameworks hand back.

Lightning Fabric returns a ``_FabricModule`` (the strategy's module in ``_forward_module``),
``torch.compile`` an ``OptimizedModule`` (``_orig_mod``), Accelerate the DDP model itself or,
compiled, an ``OptimizedModule`` around it. The reduction is DDP's or FSDP2's: this peels the
wrappers by their attributes until one of those is reached. The frameworks are recognised by
attribute, never imported: the layer imports torch and the standard library only.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_reduce.layer.strategy import is_fsdp

# A wrapper's attribute holding the module it wraps, in the order they are tried:
# torch.compile's OptimizedModule, Lightning Fabric's _FabricModule.
_INNER = ("_orig_mod", "_forward_module")
_MAX_DEPTH = 8  # wrappers around wrappers; a cycle of them ends here


def find_reduced(model: object) -> DDP | nn.Module:
    """The DDP or FSDP2 module in ``model`` (itself, or inside the framework's wrappers).

    TypeError naming what was given, and what was found inside it, when there is none.
    """
    seen = [type(model).__name__]
    current = model
    for _ in range(_MAX_DEPTH):
        if isinstance(current, DDP) or (isinstance(current, nn.Module) and is_fsdp(current)):
            return current
        inner = next((getattr(current, a) for a in _INNER if hasattr(current, a)), None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
        seen.append(type(current).__name__)
    raise TypeError(
        "attach() takes a torch.nn.parallel.DistributedDataParallel model or an FSDP2 "
        "(fully_shard, 1-D or HSDP's 2-D mesh) one, or a framework's wrapper of one (Fabric's, "
        f"torch.compile's, Accelerate's); got {' > '.join(seen)}"
    )
