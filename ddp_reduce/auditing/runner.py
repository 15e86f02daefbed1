"""The audit's runs: one launch of the user's unmodified command per layout W x A (torchrun
``--standalone``, loopback only, or the user's launcher template), the probe loaded into every
rank, its records read back; then the comparison.

    result = ddp_reduce.audit(["train.py", "--batch", "{b}", "--accum", "{A}"], global_batch=16)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ddp_reduce.auditing.compare import Capture, assemble, compare
from ddp_reduce.auditing.result import AuditError, AuditResult, LayoutResult

DEFAULT_LAYOUTS = ("1x1", "2x1", "1x2", "2x2")  # W and A varied independently
DEFAULT_TIMEOUT_S = 300.0
PYTHONS = re.compile(r"^(python[0-9.]*|.*/python[0-9.]*)$")
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def probe_path() -> Path:
    """The probe's file: torchrun runs it as each rank's script, a sitecustomize loads it."""
    return Path(__file__).with_name("probe.py")


def parse_layout(text: str, global_batch: int) -> LayoutResult:
    """``WxA`` -> the layout with b = N/(W·A); one that does not divide is refused."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise AuditError(f"--layouts: {text!r} is no layout; write WxA, e.g. 2x1 (W ranks, A "
                         "micro-steps)")  # fmt: skip
    w, a = int(m[1]), int(m[2])
    if global_batch % (w * a):
        raise AuditError(f"--layouts: {text} does not divide --global-batch {global_batch}: "
                         f"W·A = {w * a} must divide N")  # fmt: skip
    return LayoutResult(w, a, global_batch // (w * a))


def fill(tokens: Sequence[str], row: LayoutResult, global_batch: int) -> list[str]:
    """The placeholders {W}, {A}, {b}, {N} of a command, filled in."""
    values = {"W": row.world_size, "A": row.accum_steps, "b": row.batch_size, "N": global_batch}
    return [re.sub(r"\{(W|A|b|N)\}", lambda m: str(values[m[1]]), t) for t in tokens]


def _sitecustomize(folder: Path) -> Path:
    """A folder whose ``sitecustomize`` loads the probe into every Python process started with
    it on PYTHONPATH (the ranks a launcher of the user's starts)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = str(probe_path())
    (folder / "sitecustomize.py").write_text(
        "import importlib.util, os\n"
        "if os.environ.get('DDP_REDUCE_AUDIT_DIR'):\n"
        f"    _s = importlib.util.spec_from_file_location('_ddp_reduce_probe', {probe!r})\n"
        "    _m = importlib.util.module_from_spec(_s)\n"
        "    _s.loader.exec_module(_m)\n"
        "    _m.install()\n"
    )
    return folder


def launch_argv(
    command: Sequence[str], row: LayoutResult, n: int, launcher: str | None
) -> list[str]:
    cmd = fill(command, row, n)
    if launcher:
        text = launcher.replace("{command}", shlex.join(cmd))
        return fill(shlex.split(text), row, n)
    if cmd and PYTHONS.match(cmd[0]):
        cmd = cmd[1:]  # torchrun runs the probe with this Python, the probe runs the script
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={row.world_size}", str(probe_path()), *cmd]  # fmt: skip


def _error_line(log: Path) -> str:
    lines = [re.sub(r"^\[(default)?rank\d+\]:\s*", "", ln).strip()
             for ln in log.read_text(errors="replace").splitlines()]  # fmt: skip
    lines = [ln for ln in lines if ln and not ln.startswith(("=", "-"))]
    # the rank's own error, not the launcher's report of it
    errors = [
        ln
        for ln in lines
        if ERROR_LINE.match(ln) and not ln.startswith("torch.distributed.elastic")
    ]
    return (errors or lines or ["(no output)"])[-1][:300]


def _run(argv: list[str], env: dict, log: Path, timeout_s: float) -> int | None:
    """Run ``argv`` in its own process group; None if it ran past ``timeout_s`` (then the group
    is ended: SIGTERM, then SIGKILL)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            return None


def load_records(folder: Path, steps: int) -> list[list[dict]] | None:
    """Per audited step, every rank's record (tensors as numpy arrays); None unless all ranks
    wrote all steps."""
    import torch  # only here: reading the records needs it, the CLI's --help does not

    out = []
    for step in range(1, steps + 1):
        files = sorted(folder.glob(f"step{step}-rank*.pt"))
        if not files:
            return None
        records = [_numpy(torch.load(f, weights_only=True)) for f in files]
        if len(records) != records[0]["world_size"]:
            return None
        out.append(records)
    return out


def _numpy(obj):
    if hasattr(obj, "numpy"):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy(v) for v in obj]
    return obj


def run_layout(command, row, n, steps, folder: Path, options: dict) -> list[Capture] | None:
    """Launch one layout; its captures, or None with ``row.error`` said."""
    for stale in [*folder.glob("captures/*.pt"), *folder.glob("captures/*.done")]:
        stale.unlink()  # an earlier audit's captures in the same --out folder
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **options["env"], "DDP_REDUCE_AUDIT_DIR": str(folder / "captures")}
    if options["launcher"]:
        site = str(_sitecustomize(folder / "site"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    argv = launch_argv(command, row, n, options["launcher"])
    log = folder / "log.txt"
    code = _run(argv, env, log, options["timeout_s"])
    records = load_records(folder / "captures", steps)
    if records is not None:
        return [assemble(r) for r in records]
    done = len(list((folder / "captures").glob("step*-rank0.pt")))
    if code is None:
        row.error = (f"no result within {options['timeout_s']:g} s (--timeout): {done} of "
                     f"{steps} optimizer steps reached")  # fmt: skip
    elif code == 0:
        row.error = ("the script never stepped an optimizer" if done == 0 else
                     f"the script ended after {done} of {steps} optimizer steps")  # fmt: skip
    else:
        row.error = f"exit status {code}: {_error_line(log)}"
    return None


def _progress(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def audit(
    command: Sequence[str] | str,
    global_batch: int,
    layouts: Sequence[str] = DEFAULT_LAYOUTS,
    steps: int = 1,
    tol: float = 1e-4,
    reference: str | None = None,
    launcher: str | None = None,
    out: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    exact_limit: int | None = None,
    dims: int | None = None,
) -> AuditResult:
    """Run ``command`` (placeholders {W}, {A}, {b}, {N}) at each layout ``WxA`` for its first
    ``steps`` optimizer steps and compare what the optimizer received. ``out``: keep each
    layout's log and captures there (else a temporary folder, removed)."""
    command = shlex.split(command) if isinstance(command, str) else list(command)
    if not command:
        raise AuditError("no command to audit: give it after --, e.g. -- train.py --batch {b}")
    if global_batch < 1 or steps < 1 or not tol > 0:
        raise AuditError(f"--global-batch {global_batch}, --steps {steps}, --tol {tol}: each "
                         "must be positive")  # fmt: skip
    rows = [parse_layout(t, global_batch) for t in layouts]
    if len({r.name for r in rows}) < len(rows):
        raise AuditError(f"--layouts: {' '.join(layouts)} names a layout twice")
    env = {"DDP_REDUCE_AUDIT_STEPS": str(steps)}
    for key, value in (("REFERENCE", reference), ("EXACT_LIMIT", exact_limit), ("DIMS", dims)):
        if value is not None:
            env[f"DDP_REDUCE_AUDIT_{key}"] = str(value)
    options = {"env": env, "launcher": launcher, "timeout_s": timeout_s}
    with tempfile.TemporaryDirectory(prefix="ddp-reduce-audit-") as tmp:
        root = Path(out) if out is not None else Path(tmp)
        captures = []
        for i, row in enumerate(rows, 1):
            _progress(f"audit: layout {i}/{len(rows)} {row.name} (W={row.world_size}, "
                      f"A={row.accum_steps}, b={row.batch_size}) ...", end=" ")  # fmt: skip
            t0 = time.perf_counter()
            caps = run_layout(command, row, global_batch, steps, root / f"layout-{row.name}",
                              options)  # fmt: skip
            captures.append(caps)
            took = time.perf_counter() - t0
            _progress(f"done in {took:.1f} s" if row.error is None else f"failed: {row.error}")
        return compare(rows, captures, global_batch, steps, tol)
