"""The studies: each module runs its sweep (``run``) and analyses it (``analyze``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def weights(run_dir: Path) -> torch.Tensor | None:
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def relative_weight_difference(a: Path, b: Path) -> float | None:
    """max |w_a - w_b| / max |w_b| over all parameters and buffers."""
    wa, wb = weights(a), weights(b)
    if wa is None or wb is None or wa.shape != wb.shape:
        return None
    return float((wa - wb).abs().max() / wb.abs().max())


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def blew_up(summary: dict[str, Any]) -> bool:
    """Diverged: stopped on a NaN/inf, failed, or ended above its starting loss."""
    if summary.get("status") != "completed":
        return True
    final, initial = summary.get("final_train_loss"), summary.get("initial_train_loss")
    if not finite(final):
        return True
    return finite(initial) and final > initial


def overrides_for(mode: str) -> list[str]:
    loss, op = mode.split("/")
    return [f"reduce.loss={loss}", f"reduce.op={op}"]
