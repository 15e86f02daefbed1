"""What every rank runs, and the local launcher behind ``ddp-reduce``.

The config is parsed once, by whoever composed it, and every rank gets the typed
:class:`~ddp_reduce.config.RunConfig` (a dataclass: it pickles). The run directory is decided
once: by Hydra in ``ddp-reduce`` (before any rank starts), or by rank 0 under torchrun, which
broadcasts it, so the ranks never each make one from their own clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing import connection as mp_connection
from pathlib import Path

import torch.distributed as dist

from ddp_reduce.config import ConfigError, RunConfig
from ddp_reduce.distributed import (
    DistContext,
    become_local_rank,
    die_with_launcher,
    distributed,
    exit_now,
    under_launcher,
)
from ddp_reduce.run.checkpoint import CheckpointError
from ddp_reduce.run.job import train
from ddp_reduce.run.pool import shared_pool
from ddp_reduce.run.rank_server import rank_context
from ddp_reduce.run.rundir import SUMMARY
from ddp_reduce.run.signals import (
    Stopped,
    Terminated,
    process_ends_with_run,
    signals_as_errors,
)
from ddp_reduce.run.summary import (
    RunSummary,
    Status,
    read_summary,
    unfinished_summary,
    write_summary,
)
from ddp_reduce.trainer import Prepared

# Where a rank of the local launcher notes its own error (a file in the launcher's private
# folder), so that the launcher can blame the rank that failed first rather than a peer that
# then lost its connection, or was stopped.
ERROR_FILE_ENV = "DDP_REDUCE_ERROR_FILE"
# Errors that say what is wrong in one line, no traceback: the launcher says them (once, where
# every rank has the same verdict), a rank does not print them
REFUSALS = (CheckpointError, ConfigError)


def run_job(
    ctx: DistContext, cfg: RunConfig, run_dir: str, prepared: Prepared | None = None
) -> RunSummary | None:
    """One run in an existing process group. Returns the summary on rank 0, None elsewhere.
    ``prepared``: its data and model where this process prepared them already."""
    agreed = [run_dir]
    dist.broadcast_object_list(agreed, src=0)  # the run directory is rank 0's
    path = Path(agreed[0])
    with signals_as_errors() as signals:
        try:
            summary = train(cfg, path, ctx, prepared)
        except BaseException as exc:
            signals["recording"] = True
            _note_rank_error(exc)
            if ctx.is_main and unfinished_summary(path) is not None:
                record = RunSummary(
                    status=getattr(exc, "status", Status.failed),
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                    world_size=ctx.world_size,
                )
                write_summary(path, record)
            raise
    return summary if ctx.is_main else None


def _note_rank_error(exc: BaseException) -> None:
    """This rank's own error, timed, into its error file (where the launcher asked for one). A
    stop by a signal is no error of the rank's."""
    where = os.environ.get(ERROR_FILE_ENV)
    if not where or isinstance(exc, (Stopped, KeyboardInterrupt)):
        return
    record = {
        "time_ns": time.monotonic_ns(),  # one clock for every process of this machine
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
        "refusal": isinstance(exc, REFUSALS),
    }
    with contextlib.suppress(OSError):
        Path(where).write_text(json.dumps(record))


def _first_rank_error(folder: str, nproc: int) -> tuple[int, dict] | None:
    """The rank that noted its error first, and the error: the fault's origin."""
    noted = []
    for rank in range(nproc):
        try:
            record = json.loads(Path(_error_file(folder, rank)).read_text())
            noted.append((int(record["time_ns"]), rank, record))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not noted:
        return None
    _, rank, record = min(noted, key=lambda x: (x[0], x[1]))
    return rank, record


def _error_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank{rank}.error.json")


def rank_main(
    cfg: RunConfig,
    run_dir: str,
    init_method: str | None = None,
    prepared: Prepared | None = None,
) -> RunSummary | None:
    """Entry point of one rank: form the group, run, tear down."""
    if under_launcher() and init_method is None:
        die_with_launcher()  # a launcher killed outright takes its ranks with it
    with distributed(cfg.dist, init_method) as ctx:
        return run_job(ctx, cfg, run_dir, prepared)


class LaunchError(RuntimeError):
    """A rank failed or hung; the message names it."""


def launch_local(
    cfg: RunConfig, run_dir: str, prepared: Prepared | None = None, reuse_ranks: bool = False
) -> RunSummary:
    """Run ``dist.nproc`` ranks on this machine and return rank 0's summary.

    One rank runs in this process (with ``prepared``, the data and model this process made
    while validating); several are forked from the rank server, each joined through a
    FileStore in a private temporary folder, their gloo sockets on the loopback interface: a
    one-machine run listens on no network address. (PyTorch's elastic launcher, which torchrun
    wraps, binds its rendezvous store on every interface, so it is not used for one machine.)
    With ``reuse_ranks`` (sweeps) a pool of ranks serves one run after another.
    """
    nproc, max_restarts = cfg.dist.nproc, cfg.dist.max_restarts
    if nproc == 1:
        summary = rank_main(cfg, run_dir, prepared=prepared)
        assert summary is not None
        return summary
    if reuse_ranks and max_restarts == 0:
        pool = shared_pool(cfg.dist, nproc)
        return pool.call(run_job, cfg, run_dir)[0]
    for attempt in range(max_restarts + 1):
        try:
            return _attempt(cfg, run_dir, attempt)
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
    rank: int, folder: str, attempt: int, cfg: RunConfig, run_dir: str, launcher: int
) -> None:
    nproc = cfg.dist.nproc
    # TORCHELASTIC_RESTART_COUNT: as torchrun names it (fault injection reads it)
    become_local_rank(
        rank,
        nproc,
        launcher,
        TORCHELASTIC_RESTART_COUNT=str(attempt),
        **{ERROR_FILE_ENV: _error_file(folder, rank)},
    )
    process_ends_with_run()
    code = 0
    try:
        rank_main(cfg, run_dir, f"file://{os.path.join(folder, 'store')}")
    except Stopped:
        code = 143  # its status is recorded; no traceback for a stop
    except Exception as exc:
        # noted in its error file (run_job): the launcher says the first rank's error, once,
        # not each survivor's error about the peer it lost
        if not os.path.exists(_error_file(folder, rank)):
            _note_rank_error(exc)  # it failed before its run began (forming the group)
        code = 1
    exit_now(code)


def _record_stop(run_dir: str, signum: int) -> None:
    """The launcher was stopped and stopped its ranks: the run's status is the signal's. (A
    rank whose collective failed on a peer already stopped, before its own signal came, has
    recorded "failed" with that error; it is kept as the rank's error.)"""
    summary = unfinished_summary(run_dir)
    stop = Stopped(signum)
    if summary is None or summary.status is stop.status:
        return
    if summary.error is not None:
        summary.rank_error = summary.rank_error or summary.error
    summary.status, summary.error = stop.status, f"{type(stop).__name__}: {stop}"
    write_summary(run_dir, summary)


GRACE_S = 10.0  # how long a rank may take to record its status and exit once told to stop


def _attempt(cfg: RunConfig, run_dir: str, attempt: int) -> RunSummary:
    nproc = cfg.dist.nproc
    ctx = rank_context()
    folder = tempfile.mkdtemp(prefix="ddp-reduce-ranks-")
    procs = [
        ctx.Process(target=_rank_entry, args=(r, folder, attempt, cfg, run_dir, os.getpid()))
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
                    origin = _first_rank_error(folder, nproc)
                    if origin is not None and not stopped and not origin[1].get("refusal"):
                        print(origin[1].get("traceback", ""), file=sys.stderr, end="")
                    raise LaunchError(_failure(rank, code, stopped, cfg, run_dir, origin))
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)  # as Ctrl-C does: the ranks record "interrupted"
        _record_stop(run_dir, signal.SIGINT)
        raise
    except Terminated as exc:
        _stop(procs, exc.signum)  # SIGHUP: "interrupted"; SIGTERM: "failed"
        _record_stop(run_dir, exc.signum)
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


def _stop(procs: list, sig: int = signal.SIGTERM) -> dict[int, str]:
    """Stop the ranks still running with ``sig``; returns those that did not stop by
    themselves, and why: stopped by a signal (SIGSTOP), or not answering within the grace
    period."""
    hung = {}
    for r, p in enumerate(procs):
        if p.is_alive() and _process_state(p.pid) in ("T", "t"):
            hung[r] = "stopped (SIGSTOP or a debugger)"
    for p in procs:
        if p.is_alive():
            for each in (signal.SIGCONT, sig):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, each)
    deadline = time.monotonic() + GRACE_S
    alive = [p for p in procs if p.is_alive()]
    while alive and time.monotonic() < deadline:
        mp_connection.wait([p.sentinel for p in alive], timeout=deadline - time.monotonic())
        alive = [p for p in procs if p.is_alive()]
    for r, p in enumerate(procs):
        if p.is_alive():
            name = signal.Signals(sig).name
            hung.setdefault(r, f"did not answer {name} within {GRACE_S:.0f} s")
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
    rank: int,
    code: int,
    hung: dict[int, str],
    cfg: RunConfig,
    run_dir: str,
    origin: tuple[int, dict] | None = None,
) -> str:
    """What went wrong, naming the rank to blame; recorded in the run's summary too (rank 0
    may have hung, or blamed itself for a peer's silence). ``origin``: the rank that noted its
    own error first, and that error."""
    how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
    if hung:
        names = ", ".join(f"rank {r} hung ({why})" for r, why in sorted(hung.items()))
        message = (
            f"{names}; rank {rank} stopped waiting for it ({how}) after "
            f"dist.timeout_s={cfg.dist.timeout_s:g}"
        )
    elif code < 0:
        message = f"rank {rank} was killed by {how} (from outside: it could print no error)"
    elif origin is not None:
        rank, record = origin
        above = "" if record.get("refusal") else " (its error is above)"
        message = f"rank {rank} failed{above}: {record['error']}"
    else:
        message = f"rank {rank} failed with {how} (its error is above)"
    previous = unfinished_summary(run_dir)
    if previous is None:
        return message
    recorded = message.replace(" (its error is above)", "")  # nothing is "above" in a file
    if origin is None and previous.error is not None and code > 0 and not hung:
        recorded = f"{recorded}: {previous.error}"  # the error rank 0 recorded
    if previous.error is not None:
        previous.rank_error = previous.error  # what rank 0 recorded
    if origin is not None and not hung and code > 0:
        previous.traceback = origin[1].get("traceback")
    if previous.status is not Status.interrupted:
        previous.status = Status.failed
    previous.error, previous.failed_rank = recorded, rank
    previous.hung_ranks, previous.world_size = sorted(hung), cfg.dist.nproc
    write_summary(run_dir, previous)
    return message
