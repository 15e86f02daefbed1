"""What the layer reports of a step, as a framework's logger takes it."""

from __future__ import annotations

from ddp_reduce.layer.reducer import StepReport


def scalars(report: StepReport) -> dict[str, float]:
    """What the layer reports of a step, as scalars for a logger (only those it has)."""
    out = {"ddp_reduce/c": report.c, "ddp_reduce/global_items": float(report.global_items)}
    if report.measured_c is not None:
        out["ddp_reduce/measured_c"] = report.measured_c
        out["ddp_reduce/residual"] = report.residual
    if report.comm_rel_error is not None:
        out["ddp_reduce/comm_rel_error"] = report.comm_rel_error
    noise = report.noise
    if noise is not None and noise.b_simple is not None:
        out["ddp_reduce/noise_scale"] = float(noise.b_simple)
    return out
