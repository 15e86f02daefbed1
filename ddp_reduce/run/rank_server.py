"""The rank server: where local ranks are forked from, a forkserver that has imported torch
and what every rank needs.

This module imports nothing heavy: the launcher calls :func:`start_rank_server` before torch is
imported, so the ranks' imports run beside its own.
"""

from __future__ import annotations

# What every rank imports before its first step: the forkserver imports it once, and each rank
# is forked from it with it loaded (DDP's constructor alone imports torch._dynamo: over a second).
RANK_PRELOAD = ["torch", "torch._dynamo", "ddp_reduce.run.launch"]


def start_rank_server() -> None:
    """Start the process that ranks are forked from, now, so that its imports (RANK_PRELOAD)
    run while the caller composes and checks the config; call it first thing. The server is a
    fresh interpreter that only imports: forking it is safe, where forking a process that has
    run torch's thread pools could deadlock the child. Without this call the server starts at
    the first rank, without the preload (each rank then imports for itself)."""
    import multiprocessing as stdlib_mp
    from multiprocessing import forkserver

    stdlib_mp.set_forkserver_preload(RANK_PRELOAD)
    forkserver.ensure_running()
