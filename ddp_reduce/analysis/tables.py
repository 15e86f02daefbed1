"""Markdown tables and numbers as every report, ``convert`` and the benchmark print them."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; None as '-', booleans as yes/no."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    if isinstance(x, tuple):
        return "(" + ", ".join(fmt(v, digits) for v in x) + ")"
    return str(x)


def table(header: list[str], rows: list[list[Any]], digits: int = 4) -> str:
    """A Markdown table; a '|' inside a cell is escaped."""

    def cell(v: Any) -> str:
        return fmt(v, digits).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
