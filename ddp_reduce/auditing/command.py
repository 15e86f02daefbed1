"""``ddp-reduce audit``: run an unmodified training script at several layouts W x A of one global
batch and say whether the optimizer receives the same gradient (exit 0), a scaled or different one
(1), or whether the layouts cannot be compared (3); 2 is bad usage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp_reduce.auditing.result import USAGE_STATUS, AuditError

EPILOG = """placeholders in the command: {W} ranks, {A} micro-steps, {b} items per rank per
micro-step (N/(W·A)), {N} the global batch. Example:
  ddp-reduce audit --global-batch 16 -- train.py --per-device-batch {b} --grad-accum {A}
verdicts: invariant (0), scaled or differs (1), incomparable (3); bad usage (2)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddp-reduce audit",
        usage="ddp-reduce audit --global-batch N [options] -- SCRIPT [ARGS with {W} {A} {b} {N}]",
        description="Does the optimizer receive the same gradient however the same global batch "
        "is split into W ranks x A micro-steps? Each layout runs the unmodified script with "
        "torchrun --standalone (loopback) for its first optimizer steps.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--global-batch", type=int, required=True, help="N, items per optimizer step")
    p.add_argument(
        "--layouts",
        nargs="+",
        default=None,
        help="layouts WxA (default: 1x1 2x1 1x2 2x2, W and A varied independently)",
    )
    p.add_argument("--steps", type=int, default=1, help="optimizer steps audited (default 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="tolerance of factors and directions")
    p.add_argument(
        "--reference",
        help="causal-lm | classification | pkg.module:fn: report the "
        "absolute c against the per-item mean gradient of that loss",
    )
    p.add_argument(
        "--launcher",
        help="a launch template instead of torchrun, with {command} "
        "and the placeholders, e.g. 'accelerate launch --num_processes {W} {command}'",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per layout (default 300)")
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--out", type=Path, help="a folder for the JSON, each layout's log, a figure")
    return p  # fmt: skip


def main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    p = parser()
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    from ddp_reduce.auditing import report
    from ddp_reduce.auditing.runner import DEFAULT_LAYOUTS, audit

    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise AuditError(f"--out {args.out}: exists and is not a folder")
        result = audit(command, args.global_batch, args.layouts or DEFAULT_LAYOUTS, args.steps,
                       args.tol, args.reference, args.launcher, args.out, args.timeout)  # fmt: skip
    except AuditError as exc:
        print(f"ddp-reduce audit: error: {exc}", file=sys.stderr)
        return USAGE_STATUS
    print(report.text(result), flush=True)
    try:
        report.write(result, args.out, args.json)
    except OSError as exc:
        print(f"ddp-reduce audit: error: cannot write the result: {exc}", file=sys.stderr)
        return USAGE_STATUS
    return result.exit_status
