"""What an audit found, as data: per layout the factor against the first layout, the direction
error, the gradient norm, clipping, the same-items check and, with a reference loss, the absolute
c; the verdict, the fitted exponents and the diagnosis in words."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

VERDICTS = ("invariant", "scaled", "differs", "incomparable")
EXIT_STATUS = {"invariant": 0, "scaled": 1, "differs": 1, "incomparable": 3}
USAGE_STATUS = 2


class AuditError(ValueError):
    """Bad usage of the audit: a layout that does not divide, a malformed option."""


@dataclass
class LayoutResult:
    """One layout; every number is a list with one entry per audited step (None where the
    layout failed or the step was not captured)."""

    world_size: int
    accum_steps: int
    batch_size: int
    factor: list[float | None] = field(default_factory=list)
    direction_error: list[float | None] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    clipped: list[bool | None] = field(default_factory=list)
    same_batch: list[bool | None] = field(default_factory=list)
    error: str | None = None
    c: list[float | None] | None = None  # with a reference loss only
    residual: list[float | None] | None = None

    @property
    def name(self) -> str:
        return f"{self.world_size}x{self.accum_steps}"


@dataclass
class AuditResult:
    verdict: str
    global_batch: int
    steps: int
    layouts: list[LayoutResult]
    fit: dict[str, float | None]
    diagnosis: str

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for row in out["layouts"]:
            if row["c"] is None:  # the reference's keys only where there is a reference
                del row["c"], row["residual"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.verdict]

    def assert_invariant(self) -> None:
        """Raise AssertionError with the diagnosis unless the update is layout-invariant."""
        if self.verdict != "invariant":
            raise AssertionError(f"audit: {self.verdict}: {self.diagnosis}")
