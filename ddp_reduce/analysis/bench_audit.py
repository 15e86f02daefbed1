"""``python -m ddp_reduce.bench audit``: the cost of the audit's probe. An audit of 4 layouts x 1
step of examples/audit/ddp_train.py against the same four one-step runs without the probe
(torchrun, the same arguments), the two interleaved round by round in a shuffled order; the ratio
of their wall times per round, its median and interval (bench.py's)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ddp_reduce.auditing.runner import audit, fill, parse_layout

TARGET = 1.3
LAYOUTS = ("1x1", "2x1", "1x2", "2x2")
N = 16
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "audit" / "ddp_train.py"
COMMAND = [str(SCRIPT), "--per-device-batch", "{b}", "--grad-accum", "{A}", "--steps", "1"]


def _plain() -> None:
    """The four layouts' one-step runs, torchrun as the audit launches them, no probe."""
    for text in LAYOUTS:
        row = parse_layout(text, N)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={row.world_size}", *fill(COMMAND, row, N)]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=600)


def _audited() -> None:
    result = audit(COMMAND, N, LAYOUTS, steps=1)
    if result.verdict != "invariant":
        raise RuntimeError(f"bench audit: the example should be invariant: {result.diagnosis}")


def bench_audit(quick: bool, ratio: Callable[[list[float], list[float]], dict]) -> dict:
    rounds = 2 if quick else 4
    times: dict[str, list[float]] = {"audit": [], "plain": []}
    rng = random.Random(0)
    for i in range(rounds):
        order = ["audit", "plain"]
        rng.shuffle(order)
        for name in order:
            print(f"bench: audit round {i + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            (_audited if name == "audit" else _plain)()
            times[name].append(time.perf_counter() - t0)
    return {"rounds": rounds, "layouts": list(LAYOUTS), "target": TARGET,
            "seconds": times, "ratio": ratio(times["audit"], times["plain"])}  # fmt: skip


def audit_report(r: dict, shown: Callable[[dict], str], met: Callable[[dict, float], str]) -> list:
    plain = sorted(r["seconds"]["plain"])[len(r["seconds"]["plain"]) // 2]
    said = met(r["ratio"], r["target"])
    return [
        f"## The audit's cost ({len(r['layouts'])} layouts x 1 step, {r['rounds']} rounds)",
        "",
        "| audit / the same runs without the probe | median plain (s) | target | met |",
        "|---|---|---|---|",
        f"| {shown(r['ratio'])} | {plain:.1f} | <= {r['target']} | {said} |",
        "",
    ]  # fmt: skip
