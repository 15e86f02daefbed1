"""What every rank runs, and the local launcher behind ``ddp-reduce``.

The run directory is decided once: by Hydra in ``ddp-reduce`` (before any rank starts), or by
rank 0 under torchrun, which broadcasts it, so the ranks never each make one from their own clock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_reduce.config import ConfigError, RunConfig, load_config
from ddp_reduce.distributed import (
    DistContext,
    become_local_rank,
    die_with,
    distributed,
    exit_now,
    resolve_device,
    under_launcher,
)
from ddp_reduce.run.checkpoint import CheckpointError
from ddp_reduce.run.job import train
from ddp_reduce.run.pool import shared_pool
from ddp_reduce.run.rundir import (
    FINISHED,
    SUMMARY,
    open_lock,
    read_summary,
    unfinished_summary,
    versions,
    write_json,
)
from ddp_reduce.trainer import Prepared, prepare

LOCK = ".lock"  # in the run directory: held (flock) by the one process that runs it


def check_run_dir(run_dir: str | Path, overwrite: bool, key: str = "hydra.run.dir") -> Path:
    """The run directory, created; refused when it cannot hold a run, or already holds a
    finished result (completed or diverged) and ``overwrite`` is not asked for. ``key``: the
    setting that named it, for the refusal."""
    if not str(run_dir).strip():
        raise ConfigError(
            key, "''", "a folder for this run (empty would write into the current directory)"
        )
    path = Path(run_dir).absolute()
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(key, str(path), "a folder (this is a file)")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            key, str(path), f"a folder that can be created here ({exc.strerror})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), "a folder this user can write")
    try:
        previous = read_summary(path)
    except ValueError as exc:
        raise ConfigError(
            key,
            str(path),
            f"a folder whose {SUMMARY} is readable ({exc}); move it away or choose another folder",
        ) from None
    status = (previous or {}).get("status")
    if status in FINISHED and not overwrite:
        raise ConfigError(
            key,
            str(path),
            f"a directory without a finished run (it holds a {status} one; pass "
            "train.overwrite=true to replace it)",
        )
    return path


@contextmanager
def claim_run_dir(run_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Check the run directory (:func:`check_run_dir`) and hold it for this process: a second
    run on it is refused, naming the holder's PID. The lock is the kernel's (flock): released
    on every exit, a killed process's included, so a stale lock never blocks a later run."""
    import fcntl

    path = check_run_dir(run_dir, overwrite)
    fd = open_lock(path / LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            "hydra.run.dir",
            str(path),
            f"a directory no other run is using (process {holder} is running in it)",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def validate(cfg_dict: dict, world_size: int, local_world_size: int | None = None) -> RunConfig:
    """Everything that can be refused before a process group exists."""
    return validate_prepared(cfg_dict, world_size, local_world_size)[0]


def validate_prepared(
    cfg_dict: dict,
    world_size: int,
    local_world_size: int | None = None,
    local_rank: int | None = None,
) -> tuple[RunConfig, Prepared]:
    """:func:`validate`, keeping the data and model it prepared to check them: a rank that
    validates its own config (under torchrun, ``local_rank`` given) trains with them instead
    of preparing twice; on CUDA they are made with its own device current, as in training."""
    cfg = load_config(cfg_dict)
    for key in ("nan_rank", "crash_rank"):
        rank = getattr(cfg.fault, key)
        if rank >= world_size:
            raise ConfigError(f"fault.{key}", rank, f"a rank of this run: 0 to {world_size - 1}")
    resolve_device(cfg.dist, (local_world_size or world_size) - 1)  # enough devices here?
    device = resolve_device(cfg.dist, local_rank) if local_rank is not None else None
    # a rank's own: your data or model may allocate on "cuda", which must be its device, not
    # device 0 (a launcher, which uses no device, makes no CUDA context here)
    on_device = device is not None and device.type == "cuda"
    with torch.cuda.device(device) if on_device else contextlib.nullcontext():
        prepared = prepare(cfg, world_size)
    return cfg, prepared


class Stopped(RuntimeError):
    """A signal stopped this rank: SIGTERM (the launcher stops every rank when one fails) or
    SIGINT (Ctrl-C)."""

    def __init__(self, signum: int):
        self.status = "interrupted" if signum == signal.SIGINT else "failed"
        what = (
            "interrupted (SIGINT, Ctrl-C)"
            if signum == signal.SIGINT
            else ("stopped by SIGTERM (the launcher stops every rank when one fails)")
        )
        super().__init__(what)


@contextmanager
def _signals_as_errors() -> Iterator[dict[str, bool]]:
    """SIGTERM and SIGINT become :class:`Stopped`, so a stopped run still records its status.

    torchrun and the elastic agent stop the surviving ranks with SIGTERM when one dies; by
    default Python would exit at once (and Ctrl-C raises KeyboardInterrupt, which ``except
    Exception`` misses), leaving no summary behind. While the status is being written
    (``recording``) a further signal waits: the write is what the signal would have lost.
    """
    state = {"recording": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def stop(signum: int, frame: Any) -> None:
        # the first signal stops the run; one more (Ctrl-C, then the launcher's SIGTERM) must
        # neither replace the first's status nor cut the writing of it
        if not state["recording"]:
            state["recording"] = True
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_job(
    ctx: DistContext, cfg_dict: dict, run_dir: str, prepared: Prepared | None = None
) -> dict[str, Any] | None:
    """One run in an existing process group. Returns the summary on rank 0, None elsewhere.
    ``prepared``: its data and model where this process prepared them already."""
    cfg = load_config(cfg_dict)
    agreed = [run_dir]
    dist.broadcast_object_list(agreed, src=0)  # the run directory is rank 0's
    path = Path(agreed[0])
    with _signals_as_errors() as signals:
        try:
            summary = train(cfg, path, ctx, prepared)
        except BaseException as exc:
            signals["recording"] = True
            if ctx.is_main and unfinished_summary(path) is not None:
                write_json(
                    path / SUMMARY,
                    {
                        "status": getattr(exc, "status", "failed"),
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "world_size": ctx.world_size,
                        "versions": versions(),
                    },
                )
            raise
    return summary if ctx.is_main else None


def rank_main(
    cfg_dict: dict,
    run_dir: str,
    init_method: str | None = None,
    prepared: Prepared | None = None,
) -> dict[str, Any] | None:
    """Entry point of one rank: form the group, run, tear down."""
    if under_launcher() and init_method is None:
        die_with()  # a launcher killed outright takes its ranks with it
    cfg = load_config(cfg_dict)
    with distributed(cfg.dist, init_method) as ctx:
        return run_job(ctx, cfg_dict, run_dir, prepared)


class LaunchError(RuntimeError):
    """A rank failed or hung; the message names it."""


class Terminated(BaseException):
    """The launcher itself got SIGTERM (``kill``, a scheduler cancelling the job).

    Python's default would end the launcher on the spot, skipping every ``finally`` and
    ``atexit``: its ranks would die with it (see die_with) but its temporary folders (the
    ranks' store, the forkserver's socket) would stay behind. Raised instead, like Ctrl-C's
    KeyboardInterrupt, it stops the ranks (which record their status) and cleans up.
    """


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """In the launcher's main thread, SIGTERM raises :class:`Terminated` (once: a second one
    during the clean-up is ignored, so the clean-up finishes; SIGKILL still ends it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch_local(
    cfg_dict: dict, run_dir: str, nproc: int, max_restarts: int = 0, reuse_ranks: bool = False
) -> dict[str, Any]:
    """Run ``nproc`` ranks on this machine and return rank 0's summary.

    One rank runs in this process; several are forked from the rank server, each joined
    through a FileStore in a private temporary folder, their gloo sockets on the loopback
    interface: a one-machine run listens on no network address. (PyTorch's elastic launcher,
    which torchrun wraps, binds its rendezvous store on every interface, so it is not used for
    one machine.) With ``reuse_ranks`` (sweeps) a pool of ranks serves one run after another.
    """
    if nproc == 1:
        summary = rank_main(cfg_dict, run_dir)
        assert summary is not None
        return summary
    if reuse_ranks and max_restarts == 0:
        pool = shared_pool(load_config(cfg_dict).dist, nproc)
        return pool.call(run_job, cfg_dict, run_dir)[0]
    for attempt in range(max_restarts + 1):
        try:
            return _attempt(cfg_dict, run_dir, nproc, attempt)
        except LaunchError as exc:
            if attempt == max_restarts:
                raise
            print(
                f"ddp-reduce: {exc}; restarting all ranks (restart {attempt + 1} of "
                f"{max_restarts})",
                file=sys.stderr,
                flush=True,
            )
    raise AssertionError("unreachable")


def _rank_entry(
    rank: int, nproc: int, store: str, attempt: int, cfg_dict: dict, run_dir: str, launcher: int
):
    # TORCHELASTIC_RESTART_COUNT: as torchrun names it (fault injection reads it)
    become_local_rank(rank, nproc, launcher, TORCHELASTIC_RESTART_COUNT=str(attempt))
    code = 0
    try:
        rank_main(cfg_dict, run_dir, f"file://{store}")
    except Stopped:
        code = 143  # its status is recorded; no traceback for a stop
    except CheckpointError as exc:  # every rank has it (rank 0's verdict): said once
        if rank == 0:
            print(f"ddp-reduce: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        traceback.print_exc()
        code = 1
    exit_now(code)


GRACE_S = 10.0  # how long a rank may take to record its status and exit once told to stop


def _attempt(cfg_dict: dict, run_dir: str, nproc: int, attempt: int) -> dict[str, Any]:
    ctx = mp.get_context("forkserver")  # ranks forked with torch imported (start_rank_server)
    folder = tempfile.mkdtemp(prefix="ddp-reduce-ranks-")
    store = os.path.join(folder, "store")
    procs = [
        ctx.Process(
            target=_rank_entry, args=(r, nproc, store, attempt, cfg_dict, run_dir, os.getpid())
        )
        for r in range(nproc)
    ]
    try:
        for p in procs:
            p.start()
        pending = {p.sentinel: r for r, p in enumerate(procs)}
        while pending:
            for sentinel in mp_connection.wait(list(pending)):
                rank = pending.pop(sentinel)
                procs[rank].join()  # the sentinel closes as it exits; join reaps the code
                code = procs[rank].exitcode
                if code != 0:
                    stopped = _stop(procs)
                    raise LaunchError(_failure(rank, code, stopped, cfg_dict, run_dir, nproc))
    except (KeyboardInterrupt, Terminated):
        _stop(procs)  # a rank records "interrupted" on SIGINT, "failed" on SIGTERM
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(folder, ignore_errors=True)
    summary = read_summary(Path(run_dir))
    if summary is None:
        raise LaunchError(f"every rank exited 0 but rank 0 left no {SUMMARY} in {run_dir}")
    return summary


def _stop(procs: list) -> dict[int, str]:
    """Stop the ranks still running; returns those that did not stop by themselves, and why:
    stopped by a signal (SIGSTOP), or not answering SIGTERM within the grace period."""
    hung = {}
    for r, p in enumerate(procs):
        if p.is_alive() and _process_state(p.pid) in ("T", "t"):
            hung[r] = "stopped (SIGSTOP or a debugger)"
    for p in procs:
        if p.is_alive():
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
    deadline = time.monotonic() + GRACE_S
    alive = [p for p in procs if p.is_alive()]
    while alive and time.monotonic() < deadline:
        mp_connection.wait([p.sentinel for p in alive], timeout=deadline - time.monotonic())
        alive = [p for p in procs if p.is_alive()]
    for r, p in enumerate(procs):
        if p.is_alive():
            hung.setdefault(r, f"did not answer SIGTERM within {GRACE_S:.0f} s")
            p.kill()
            p.join()
    return hung


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, ...), None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _failure(
    rank: int, code: int, hung: dict[int, str], cfg_dict: dict, run_dir: str, nproc: int
) -> str:
    """What went wrong, naming the rank to blame; recorded in the run's summary too (rank 0
    may have hung, or blamed itself for a peer's silence)."""
    how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
    if hung:
        names = ", ".join(f"rank {r} hung ({why})" for r, why in sorted(hung.items()))
        timeout = cfg_dict.get("dist", {}).get("timeout_s")
        message = (
            f"{names}; rank {rank} stopped waiting for it ({how}) after dist.timeout_s={timeout}"
        )
    elif code < 0:
        message = f"rank {rank} was killed by {how} (from outside: it could print no error)"
    else:
        message = f"rank {rank} failed with {how} (its error is above)"
    path = Path(run_dir)
    previous = unfinished_summary(path)
    recorded = message
    if previous is not None and code > 0 and not hung and previous.get("error"):
        # the rank recorded its error: the summary says it (nothing is "above" in a file)
        recorded = f"rank {rank} failed with {how}: {previous['error']}"
    if previous is not None:
        record = {
            **previous,
            "status": previous.get("status")
            if previous.get("status") == "interrupted"
            else "failed",
            "error": recorded,
            "failed_rank": rank,
            "hung_ranks": sorted(hung),
            "world_size": nproc,
        }
        if "error" in previous:
            record["rank_error"] = previous["error"]
        record.setdefault("versions", versions())
        write_json(path / SUMMARY, record)
    return message


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    head = f"ddp-reduce: {s['status']}"
    if s["status"] == "diverged":
        head += f" at step {s['diverged_at_step']} ({s['diverged_why']})"
    head += f", {s['steps_done']} steps in {s['wall_time_s']:.1f} s"

    def metric(name: str, loss: float, acc: float | None) -> str:
        text = f"  {name:<5} loss {loss:.4f}"
        return text + (f"  accuracy {acc:.4f}" if acc is not None else "")

    exact = "" if s["grad_scale_exact"] else " (unequal counts: a mean of means, not exactly c*G)"
    # c as the steps measured it leads; grad_scale, c with b*A items per rank, follows where it
    # differs (items that are tokens, a loss that counts its own, a ragged batch)
    c = f"{s['grad_scale']:g}"
    low, high = s["grad_scale_range"]
    if low is not None and not low == high == s["grad_scale"]:
        c = f"{low:g} on every step" if low == high else f"{low:g} to {high:g} over the steps"
        exact += f"; {s['grad_scale']:g} with b*A items per rank (N={s['global_batch_size']})"
    lines = [
        head,
        f"  W={s['world_size']} b={s['local_batch_size']} A={s['accum_steps']} "
        f"N={s['global_batch_size']}  reduce: loss={s['reduce_loss']} op={s['reduce_op']}",
        f"  gradient factor c = {c}  [{s['grad_scale_rule']}]{exact}",
        f"  {s['strategy']}, gradients reduced in {s['reduce_dtype']} "
        f"({s['reduce_route'] or 'no route'}), model in {s['precision']}" + _precision_note(s),
        metric("train", s["final_train_loss"], s["final_train_accuracy"]),
        metric("test", s["final_eval_loss"], s["final_eval_accuracy"]),
        f"  run directory: {s['run_dir']}",
        f"  TensorBoard:   tensorboard --logdir {s['run_dir']} --host 127.0.0.1",
    ]
    return "\n".join(lines)


def _precision_note(s: dict[str, Any]) -> str:
    """What low precision cost, where it was measured."""
    note = ""
    if s["reduce_comm_rel_error_max"] is not None:
        note += (
            f"; reduction error up to {s['reduce_comm_rel_error_max']:.2g} (relative), "
            f"{s['reduce_lossy_logged_steps']} lossy logged steps"
        )
    if s["reduce_op"] == "sum" and s["reduce_predivide"] != "full":
        note += f"; reduce.predivide={s['reduce_predivide']} is moot with op=sum (divisor 1)"
    if s["amp_skipped_steps"]:
        note += f"; {s['amp_skipped_steps']} steps skipped by the loss scaler"
    return note


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
