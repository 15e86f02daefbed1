"""Ranks kept alive across jobs: one process group, many runs.

A fresh interpreter per rank costs seconds before any training (importing torch, forming the
group). A sweep of short runs, or a benchmark that interleaves variants, pays that once with a
pool: W processes join one gloo/NCCL group (a FileStore in a private temporary folder: no ports)
and run one job after another. Each job builds its own model, optimizer, RNG seed and run
directory (``trainer.train`` does), so a job's result does not depend on what ran before it.

If a job fails on any rank, or a rank dies, the pool is torn down (the group may be mid-
collective) and the error is raised; the next job starts a fresh pool.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from ddp_reduce.config import DistConfig
from ddp_reduce.distributed import become_local_rank, distributed, exit_now
from ddp_reduce.run.rank_server import rank_context
from ddp_reduce.run.signals import Stopped, stop_signal


class PoolError(RuntimeError):
    """A job failed on some rank, or a rank died."""


def _worker(
    rank: int, world: int, store: str, dist_cfg: DistConfig, inbox: Any, outbox: Any, owner: int
) -> None:
    become_local_rank(rank, world, owner)
    try:
        with distributed(dist_cfg, init_method=f"file://{store}") as ctx:
            while True:
                job = inbox.get()
                if job is None:
                    break
                fn, args = job
                try:
                    outbox.put((rank, "ok", fn(ctx, *args)))
                except (Stopped, KeyboardInterrupt):
                    raise
                except BaseException as exc:  # reported to the parent, which tears the pool down
                    detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                    outbox.put((rank, "error", detail))
                    raise
    except (Stopped, KeyboardInterrupt) as exc:
        # A signal (Ctrl-C, kill, a scheduler): the job recorded its run's status, and whoever
        # sent it stops the pool's owner too, which says what stopped it. A traceback from each
        # rank would say nothing more. The parent learns of it as a rank that died.
        signum, what = stop_signal(exc)
        outbox.put((rank, "error", what))
        outbox.close()
        outbox.join_thread()  # the message is out before the process ends
        exit_now(128 + signum)
    exit_now(0)


class RankPool:
    def __init__(self, dist_cfg: DistConfig, nproc: int):
        self.key = (nproc, repr(dist_cfg))
        self.nproc = nproc
        ctx = rank_context()
        self._folder = tempfile.mkdtemp(prefix="ddp-reduce-pool-")
        store = os.path.join(self._folder, "store")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(nproc)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, nproc, store, dist_cfg, self._inboxes[r], self._outbox, os.getpid()),
                # not daemonic: a rank may start DataLoader workers; it dies with this process
                # (die_with_launcher) and is closed at exit (atexit, below)
                daemon=False,
            )
            for r in range(nproc)
        ]
        for p in self._procs:
            p.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(ctx, *args)`` on every rank; return the results in rank order."""
        for box in self._inboxes:
            box.put((fn, args))
        results: dict[int, Any] = {}
        while len(results) < self.nproc:
            try:
                rank, status, value = self._outbox.get(timeout=1.0)
            except queue.Empty:  # nothing yet: is everyone still alive?
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close(force=True)
                    code = self._procs[dead[0]].exitcode
                    raise PoolError(f"rank {dead[0]} died (exit code {code})") from None
                continue
            if status == "error":
                self.close(force=True)
                raise PoolError(f"rank {rank} failed: {value}")
            results[rank] = value
        return [results[r] for r in range(self.nproc)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        if not force:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._folder, ignore_errors=True)


_shared: RankPool | None = None


def shared_pool(dist_cfg: DistConfig, nproc: int) -> RankPool:
    """The pool of this process for (nproc, dist config), started on first use."""
    global _shared
    key = (nproc, repr(dist_cfg))
    if _shared is not None and (_shared.key != key or not _shared.alive()):
        _shared.close(force=not _shared.alive())
        _shared = None
    if _shared is None:
        _shared = RankPool(dist_cfg, nproc)
    return _shared


def discard_shared_pool() -> None:
    global _shared
    if _shared is not None:
        _shared.close(force=not _shared.alive())
        _shared = None


atexit.register(discard_shared_pool)
