"""One setup for distributed state, with guaranteed teardown; it also works with one process.

Under torchrun (or ``ddp-reduce``'s own elastic launch) the ranks find each other through the
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Without it, a single rank gets a process group
of its own on an in-memory store, so the training code has one path for every world size.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp_reduce.config import Backend, ConfigError, Device, DistConfig


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True when started by torchrun or an elastic agent (the environment names the rank)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(cfg: DistConfig, local_rank: int) -> torch.device:
    if cfg.device is Device.cpu:
        return torch.device("cpu")
    if cfg.device is Device.cuda or (cfg.device is Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("dist.device", "cuda", "cpu or auto: no CUDA device is available")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                "dist.device",
                "cuda",
                f"at most {count} local ranks on this node ({count} CUDA devices), "
                f"got local rank {local_rank}",
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_backend(cfg: DistConfig, device: torch.device) -> str:
    if cfg.backend is Backend.auto:
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend is Backend.nccl and device.type != "cuda":
        raise ConfigError("dist.backend", "nccl", "gloo or auto on a CPU device")
    return cfg.backend.name


LOOPBACK = "lo"  # the interface of one-machine gloo sockets


def become_local_rank(rank: int, world: int, launcher: int, **env: str) -> None:
    """Set up a rank forked on this machine (the launcher's ranks, the rank pool's): the
    environment torchrun would give it, gloo's sockets on loopback unless the user named an
    interface, and death with its launcher (see die_with_launcher)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    die_with_launcher(launcher)


def die_with_launcher(launcher: int | None = None) -> None:
    """Send this process SIGTERM when its launcher dies, so a launcher killed outright
    (SIGKILL) leaves no rank training on; SIGTERM, not SIGKILL, so the rank still records its
    status. Linux only (elsewhere nothing).

    ``launcher``: the launcher's PID when it is not this process's parent (ranks forked from a
    forkserver, which outlives the launcher while its children live): a thread waits on a
    pidfd of it. Without it, the parent is the launcher (torchrun) and the kernel is told to
    signal at the parent's death (PR_SET_PDEATHSIG).
    """
    if not sys.platform.startswith("linux"):
        return
    if launcher is None:
        import ctypes

        pr_set_pdeathsig = 1
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return
    import select
    import threading

    try:
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:  # already gone
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once the launcher has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ddp-reduce-launcher-watch", daemon=True).start()


def _store_on_master_addr(rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """The process group's TCPStore, rank 0's bound to MASTER_ADDR only.

    Under torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the launch scripts set it) rank 0
    hosts the store, and a TCPStore left to itself listens on every interface: here it is
    handed a socket bound to MASTER_ADDR (127.0.0.1 on one machine; the address you name on
    many). Where torchrun shares its own store with the ranks, that one is used (None here).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(sockaddr)
    store = dist.TCPStore(
        addr, port, world, is_master=True, timeout=timeout, master_listen_fd=listener.detach()
    )
    return store


def exit_now(code: int) -> None:
    """End a rank whose group is torn down and whose results are written, skipping the
    interpreter's own teardown: there PyTorch's C++ objects holding collective threads have
    been seen to abort (SIGABRT, "terminate called without an active exception") a rank that
    had finished cleanly, turning a completed run into a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def distributed(cfg: DistConfig, init_method: str | None = None) -> Iterator[DistContext]:
    """Initialize the process group, pin the device and the CPU threads; always tear down.

    ``init_method`` (for example ``file:///tmp/store``) replaces the environment's rendezvous;
    tests use it to need no ports.
    """
    if under_launcher():
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    device = resolve_device(cfg, local_rank)
    backend = resolve_backend(cfg, device)
    threads = cfg.threads_per_rank or max(1, available_cores() // local_world)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if under_launcher():
        if init_method is not None:
            kwargs.update(init_method=init_method, rank=rank, world_size=world)
        else:
            store = _store_on_master_addr(rank, world, timeout)
            if store is not None:
                kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs
        )
    ok = False
    try:
        yield DistContext(rank, world, local_rank, local_world, device, backend, threads)
        ok = True
    finally:
        if ok:
            # Nobody tears the group down while a peer still talks to it.
            dist.barrier()
        dist.destroy_process_group()
