"""Loss terms with their own units: every rank's count of every unit, in one all-reduce.

The arithmetic (each term's factor and c) is :func:`ddp_reduce.layer.reduction.plan_terms`;
:meth:`ddp_reduce.layer.reducer.Reducer.term_scales` is the public face.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_units(
    local_units: dict[str, int], group: dist.ProcessGroup | None, device: torch.device
) -> tuple[dict[str, int], dict[str, bool]]:
    """(every unit's count over all ranks, whether every rank held the same count of it).

    One all-reduce of [n_u, n_u²] for all units u at once, in float64 (exact below 2^53):
    every rank held the same n_u iff W·Σn_u² = (Σn_u)².
    """
    for unit, n in local_units.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{unit}={n!r}: allowed a count of units, an integer >= 0")
    counts = torch.tensor(
        [float(v) for n in local_units.values() for v in (n, n * n)],
        dtype=torch.float64,
        device=device,
    )
    world = dist.get_world_size(group)
    if world > 1:
        dist.all_reduce(counts, group=group)
    total, sq = counts.view(-1, 2).T.tolist()
    units = list(local_units)
    return (
        {u: int(t) for u, t in zip(units, total, strict=True)},
        {u: world * s == t * t for u, t, s in zip(units, total, sq, strict=True)},
    )
