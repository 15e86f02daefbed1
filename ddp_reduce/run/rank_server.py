"""The rank server: where local ranks are forked from, a forkserver that has imported torch
and what every rank needs.

This module imports nothing heavy: the launcher calls :func:`start_rank_server` before torch is
imported, so the ranks' imports run beside its own.
"""

from __future__ import annotations

from typing import Any

# What every rank imports before its first step: the forkserver imports it once, and each rank
# is forked from it with it loaded (DDP's constructor alone imports torch._dynamo: over a second;
# rank 0's TensorBoard writer a quarter of one).
RANK_PRELOAD = ["torch", "torch._dynamo", "torch.utils.tensorboard", "ddp_reduce.run.launch"]


# Linux's limit on an AF_UNIX socket's path (sun_path: 108 bytes, the last one NUL), and the
# names multiprocessing gives its forkserver's socket in the temporary folder:
# <TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX
SOCKET_PATH_MAX = 107
TEMP_DIR_MAX = SOCKET_PATH_MAX - len("/pymp-12345678/listener-12345678")


def check_temp_dir() -> None:
    """Refuse, with a clear error, a temporary folder too long to hold the forkserver's socket:
    Python 3.11's multiprocessing would fail with a traceback after the run had started."""
    import tempfile

    folder = tempfile.gettempdir()
    if len(folder) > TEMP_DIR_MAX:
        from ddp_reduce.config import ConfigError

        raise ConfigError(
            "TMPDIR",
            folder,
            f"a folder path of at most {TEMP_DIR_MAX} characters ({len(folder)} given): the "
            "ranks are started through a socket in it, and a socket's path is at most "
            f"{SOCKET_PATH_MAX}; "
            "set TMPDIR to a shorter folder",
        )


def rank_context() -> Any:
    """The multiprocessing context ranks are forked in: from the rank server (started here if
    :func:`start_rank_server` was not called), once the temporary folder is checked."""
    import multiprocessing

    check_temp_dir()
    return multiprocessing.get_context("forkserver")


def start_rank_server() -> None:
    """Start the process that ranks are forked from, now, so that its imports (RANK_PRELOAD)
    run while the caller composes and checks the config; call it first thing. The server is a
    fresh interpreter that only imports: forking it is safe, where forking a process that has
    run torch's thread pools could deadlock the child. Without this call the server starts at
    the first rank, without the preload (each rank then imports for itself)."""
    import multiprocessing as stdlib_mp
    from multiprocessing import forkserver

    check_temp_dir()

    stdlib_mp.set_forkserver_preload(RANK_PRELOAD)
    forkserver.ensure_running()
