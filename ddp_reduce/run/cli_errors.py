"""How the command line reports an error: one line (or a few) naming what is wrong, no
traceback, a non-zero exit."""

from __future__ import annotations

import sys


def error_message(exc: BaseException) -> str:
    """The exception's message with those of its causes (Hydra keeps OmegaConf's detail there),
    but not a context its raiser suppressed (``raise ... from None``), not what an earlier part
    already says, and not OmegaConf's bookkeeping lines (full_key, object_type)."""
    parts: list[str] = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        lines = [
            line
            for line in str(exc).strip().splitlines()
            if not line.strip().startswith(BOOKKEEPING)
        ]
        text = "\n".join(lines).strip()
        if text and not any(text in part for part in parts):
            parts.append(text)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n".join(parts)


BOOKKEEPING = ("full_key:", "reference_type=", "object_type=", "Set the environment variable")


def fail(message: str, code: int = 2) -> None:
    print(f"ddp-reduce: error: {message}", file=sys.stderr)
    sys.exit(code)
