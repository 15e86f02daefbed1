"""The run directory a run holds: checked (it can hold a run, it holds no finished result) and
locked for the one process that runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddp_reduce.config import ConfigError
from ddp_reduce.run.rundir import SUMMARY, open_lock
from ddp_reduce.run.summary import read_summary

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
    if previous is not None and previous.status.finished and not overwrite:
        raise ConfigError(
            key,
            str(path),
            f"a directory without a finished run (it holds a {previous.status.value} one; pass "
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
