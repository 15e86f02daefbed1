"""The divergence verdict: when a step ends the run, and the sentence that says why.

A step diverges when its reduced gradient is not finite (a NaN or inf in some rank's loss, in a
rank's own gradient, or made by the reduction itself) or, on a logged step, when its all-reduced
loss has blown up (``train.blowup_factor`` times the initial loss). Under fp16 the loss scaler
skips a step whose gradient is not finite; only a non-finite loss, or
:data:`AMP_SKIPS_IN_A_ROW` skipped steps in a row, end the run then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AMP_SKIPS_IN_A_ROW = 20  # fp16: this many skipped steps in a row is a divergence, not bad luck

CAUSES = {
    "loss": "a NaN or inf in a rank's loss",
    "backward": "a NaN or inf in a rank's own gradient (the backward overflowed)",
    "reduction": "the gradient all-reduce overflowed (reduce.dtype={dtype}): every rank's "
    "own gradient was finite, the reduced one is not",
    "gradient": "a NaN or inf in the reduced gradient",
}


@dataclass
class Verdicts:
    """The verdicts so far: what the run summary reports of the steps that were not finite."""

    amp_skipped: int = 0  # fp16: steps the loss scaler skipped (a non-finite gradient)
    amp_skipped_in_a_row: int = 0
    reduce_overflow_at: int | None = None  # the reduction itself made the gradient non-finite

    def finite(self) -> None:
        self.amp_skipped_in_a_row = 0

    def non_finite(self, step: int, cause: str, dtype: str, amp: bool) -> str | None:
        """Why the non-finite step ``step`` ends the run, or None where fp16's loss scaler
        skips it (``amp``). A reduction that overflowed is named as such: the communication,
        not the loss."""
        if cause == "reduction" and self.reduce_overflow_at is None:
            self.reduce_overflow_at = step
        why = CAUSES[cause].format(dtype=dtype)
        if not amp or cause == "loss":
            return why
        self.amp_skipped += 1
        self.amp_skipped_in_a_row += 1
        if self.amp_skipped_in_a_row < AMP_SKIPS_IN_A_ROW:
            return None
        return f"{why}, {AMP_SKIPS_IN_A_ROW} steps in a row (the loss scaler skips them)"


def blown_up(loss: float | None, initial: float | None, factor: float | None) -> str | None:
    """Why a loss counts as a blow-up (``train.blowup_factor`` times the initial loss), or None."""
    if factor is None or loss is None or initial is None or not initial > 0:
        return None
    if not math.isfinite(loss):
        return "a NaN or inf in the loss"
    if loss > factor * initial:
        return f"blow-up: loss {loss:.4g} > train.blowup_factor={factor:g} x initial {initial:.4g}"
    return None
