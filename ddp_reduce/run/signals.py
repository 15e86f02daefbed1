"""Signals as exceptions, so that a stopped run still records its status and cleans up.

SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH session closed) interrupt a run: status
``interrupted``. SIGTERM (``kill``, a scheduler, or the launcher stopping the survivors of a
failed rank) fails it: status ``failed``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ddp_reduce.run.summary import Status

INTERRUPTING = (signal.SIGINT, signal.SIGHUP)

# Set in a process that ends with its run (a rank the launcher forked, a rank under torchrun):
# there, once the run's end is recorded, a further Ctrl-C or SIGHUP (a terminal signals every
# process of the job, then the launcher forwards its own to its ranks) is ignored until the
# process exits, instead of raising KeyboardInterrupt in its teardown.
_ENDS_WITH_RUN = False


def process_ends_with_run() -> None:
    """Say that this process exits once its run ends (see :func:`signals_as_errors`)."""
    global _ENDS_WITH_RUN
    _ENDS_WITH_RUN = True


def _heeded(signals: tuple[int, ...]) -> list[int]:
    """Those of ``signals`` this process does not ignore: a run started under ``nohup``
    (SIGHUP ignored) goes on when its terminal closes, as asked."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


def _why(signum: int) -> str:
    return {
        signal.SIGINT: "interrupted (SIGINT, Ctrl-C)",
        signal.SIGHUP: "interrupted (SIGHUP: the terminal or session closed)",
    }.get(
        signum,
        "stopped by SIGTERM (kill, a scheduler, or the launcher stopping every rank "
        "when one fails)",
    )


class Stopped(RuntimeError):
    """A signal stopped this rank (see the module's docstring for which status each gives)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.status = Status.interrupted if signum in INTERRUPTING else Status.failed
        super().__init__(_why(signum))


@contextmanager
def signals_as_errors() -> Iterator[dict[str, bool]]:
    """SIGTERM, SIGINT and SIGHUP become :class:`Stopped`, so a stopped run still records its
    status.

    torchrun and the elastic agent stop the surviving ranks with SIGTERM when one dies; by
    default Python would exit at once (SIGHUP likewise, and Ctrl-C raises KeyboardInterrupt,
    which ``except Exception`` misses), leaving no summary behind. While the status is being
    written (``recording``) a further signal waits: the write is what the signal would have lost.
    In a process that ends with its run (:func:`process_ends_with_run`), SIGINT and SIGHUP stay
    ignored once the end is recorded: the teardown is not cut by a second one.
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

    # SIGINT too where it was ignored at start (ranks forked from a server started so):
    # the launcher forwards Ctrl-C, or its own SIGINT, to its ranks as SIGINT
    heeded = (signal.SIGTERM, signal.SIGINT, *_heeded((signal.SIGHUP,)))
    previous = {sig: signal.signal(sig, stop) for sig in heeded}
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            ended = state["recording"] and _ENDS_WITH_RUN and sig in INTERRUPTING
            signal.signal(sig, signal.SIG_IGN if ended else handler)


def stop_signal(exc: BaseException) -> tuple[int, str]:
    """The signal behind a stop (:class:`Stopped`, :class:`Terminated`, or Ctrl-C's
    KeyboardInterrupt) and what to say of it."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT, _why(signal.SIGINT)
    return exc.signum, str(exc)


class Terminated(BaseException):
    """The launcher itself got SIGTERM (``kill``, a scheduler cancelling the job) or SIGHUP
    (its terminal closed).

    Python's default would end the launcher on the spot, skipping every ``finally`` and
    ``atexit``: its ranks would die with it (see die_with_launcher) but its temporary folders
    (the ranks' store, the forkserver's socket) would stay behind. Raised instead, like
    Ctrl-C's KeyboardInterrupt, it stops the ranks (which record their status) and cleans up.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        what = "interrupted by SIGHUP (the terminal or session closed)"
        super().__init__(what if signum == signal.SIGHUP else "stopped by SIGTERM")

    @property
    def status(self) -> Status:
        return Status.interrupted if self.signum in INTERRUPTING else Status.failed


@contextmanager
def launcher_signals() -> Iterator[None]:
    """In the launcher's main thread, SIGTERM and SIGHUP raise :class:`Terminated` (once: a
    further one during the clean-up is ignored, so the clean-up finishes; SIGKILL still ends
    it). SIGINT raises KeyboardInterrupt, also where the launcher was started with it ignored
    (a background job of a script): ``kill -INT`` then stops the run as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminating = _heeded((signal.SIGTERM, signal.SIGHUP))

    def stop(signum: int, frame: Any) -> None:
        for sig in terminating:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in terminating}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
