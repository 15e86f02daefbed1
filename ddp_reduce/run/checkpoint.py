"""Checkpoints: written atomically, verified on resume, never silently skipped.

A checkpoint holds what makes a resumed run bitwise equal to an uninterrupted one: the model, the
optimizer and schedule state, every rank's RNG state, the step (the sampler is a function of
(seed, step), so the step is its position) and the config it came from. ``manifest.json`` lists
the checkpoints with their SHA-256; it is rewritten (atomically) only after a checkpoint is
complete, so a checkpoint not in the manifest, or not matching its digest, is never trusted.

Two layouts, one manifest:

- ``step_XXXXXXXX.pt`` (DDP): one file, written by rank 0, the model and optimizer whole.
- ``step_XXXXXXXX.dcp/`` (FSDP): ``torch.distributed.checkpoint``'s folder, every rank writing
  its own shards (nothing is gathered), plus ``extra.pt`` with the rest; its digest covers every
  file in it. It is written under a temporary name and renamed once whole. Every rank reads its
  shards from it: on several nodes the run directory must be shared storage.

Either loads into either strategy: a ``.pt`` is set whole into a sharded model, a ``.dcp`` is
resharded by the checkpoint library into a whole one (the optimizer state is keyed by parameter
name in both).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddp_reduce import parallel
from ddp_reduce.config import to_dict
from ddp_reduce.run.rundir import CHECKPOINTS, atomic_write, own_folder, write_json
from ddp_reduce.trainer import Trainer

MANIFEST = "manifest.json"
EXTRA = "extra.pt"  # in a .dcp folder: everything but the model and the optimizer
FORMAT = 2

# Keys that may differ between the run that wrote a checkpoint and the one resuming from it:
# how the run is spread and observed, not what it computes. The global batch N is compared
# separately, so W, b and A may change as long as N does not.
MAY_DIFFER = (
    "dist.",
    "fault.",
    "train.steps",
    "train.eval_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.overwrite",
    "train.progress",
    "data.batch_size",
    "data.global_batch_size",
    "train.accum_steps",
)


class CheckpointError(RuntimeError):
    """No checkpoint can be trusted, or the one found belongs to another config."""


@dataclass
class VerifiedCheckpoint:
    """The newest checkpoint that matched its digest and loaded, and the newer ones skipped."""

    path: Path
    state: dict[str, Any]
    skipped: list[str]  # the newer checkpoints that were corrupt, and why


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Keys that a checkpoint written before they existed does not hold, with the value that was
# then the only behaviour: such a checkpoint is compared as if it had written them.
ADDED_SINCE = {"noise.steps": "every"}


def config_differences(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    for key, then in ADDED_SINCE.items():
        if key in b and key not in a:
            a[key] = then
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_DIFFER):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}={a.get(key)!r} in the checkpoint, {b.get(key)!r} now")
    return diffs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# A manifest entry names a checkpoint inside ``checkpoints/`` and nothing else: the file of
# step S is step_SSSSSSSS.pt (a folder step_SSSSSSSS.dcp for sharded state). Anything else (an
# absolute path, "..", another name) makes the manifest corrupt: it is never read or deleted.
ENTRY_NAME = re.compile(r"step_(\d{8})\.(pt|dcp)")
SHA256 = re.compile(r"[0-9a-f]{64}")


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is corrupt ({why}); refusing to start over from step 0 or to touch files it "
        f"names. Remove the folder {path.parent} to start the run again."
    )


def _read_manifest(folder: Path) -> list[dict]:
    path = folder / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["checkpoints"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise _corrupt(path, f"unreadable: {exc}") from exc
    if not isinstance(entries, list):
        raise _corrupt(path, "'checkpoints' is not a list")
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"file", "step", "sha256"}:
            raise _corrupt(path, f"an entry is not {{file, step, sha256}}: {e!r:.200}")
        name, step, digest = e["file"], e["step"], e["sha256"]
        match = ENTRY_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise _corrupt(path, f"{name!r:.200} is not a checkpoint name like step_00000010.pt")
        if not isinstance(step, int) or isinstance(step, bool) or int(match[1]) != step:
            raise _corrupt(path, f"step {step!r} does not match {name}")
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise _corrupt(path, f"{name}: {digest!r:.80} is not a SHA-256 digest")
    return sorted(entries, key=lambda e: e["step"])


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Half-written checkpoints of a process that died mid-write (their temporary names only)."""
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(".step_*.tmp"):
            if tmp.is_symlink():  # never followed, never removed
                continue
            _remove(tmp)
            removed.append(tmp.name)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder: its files' names and digests, in order."""
    if not path.is_dir():
        return _sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{_sha256(f)}\n".encode())
    return h.hexdigest()


def _record(
    folder: Path, entries: list[dict], name: str, step: int, digest: str, keep: int
) -> None:
    """Add a complete checkpoint to the manifest; drop (and delete) all but the newest ``keep``."""
    entries = [e for e in entries if e["step"] != step]
    entries.append({"file": name, "step": step, "sha256": digest})
    entries.sort(key=lambda e: e["step"])
    stale, entries = entries[:-keep], entries[-keep:]
    write_json(folder / MANIFEST, {"checkpoints": entries})
    for e in stale:  # names already checked: step_*.pt or step_*.dcp inside this folder
        _remove(folder / e["file"])


def save(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``state['step']``; keep the newest ``keep``."""
    folder = own_folder(run_dir / CHECKPOINTS)  # never written through a link
    entries = _read_manifest(folder)  # refuses a corrupt manifest before anything is written
    remove_stale_temporaries(folder)
    path = folder / f"step_{state['step']:08d}.pt"
    digest: dict[str, str] = {}

    def write(tmp: Path) -> None:
        torch.save({"format": FORMAT, **state}, tmp)
        digest["sha256"] = _sha256(tmp)

    atomic_write(path, write)
    _record(folder, entries, path.name, state["step"], digest["sha256"], keep)
    return path


def _load_verified(folder: Path, entry: dict) -> dict[str, Any]:
    path = folder / entry["file"]
    if not path.exists():
        raise CheckpointError(f"{path.name} is missing")
    if _digest(path) != entry["sha256"]:
        raise CheckpointError(f"{path.name} does not match its SHA-256 (truncated or corrupt)")
    try:
        state = torch.load(
            path / EXTRA if path.is_dir() else path, map_location="cpu", weights_only=True
        )
    except Exception as exc:  # a file that matches its digest but does not load
        raise CheckpointError(f"{path.name} does not load: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a checkpoint")
    if path.is_dir():
        # imported here: torch.distributed.checkpoint costs a second of every rank's start,
        # and only sharded checkpoints need it
        from ddp_reduce.run.dcp_metadata import read_dcp_metadata

        try:  # a .metadata that is not the library's plain record is refused, never run
            read_dcp_metadata(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: {exc}") from None
    if state.get("format") != FORMAT or state.get("step") != entry["step"]:
        raise CheckpointError(f"{path.name} is not a checkpoint of this format and step")
    return state


def load_latest(run_dir: Path) -> VerifiedCheckpoint | None:
    """The newest valid checkpoint, falling back past corrupt ones; None if there are none."""
    folder = run_dir / CHECKPOINTS
    if folder.is_symlink():
        raise CheckpointError(
            f"{folder} is a symbolic link; a run reads checkpoints from its own folder only. "
            "Replace the link by the folder itself to resume from it."
        )
    entries = _read_manifest(folder)
    if not entries:
        if folder.exists() and any(folder.glob("step_*.*")):
            raise CheckpointError(
                f"{folder} holds checkpoint files but no {MANIFEST}; refusing to start over "
                "from step 0. Remove the folder to start the run again."
            )
        return None
    skipped = []
    for entry in reversed(entries):
        try:
            state = _load_verified(folder, entry)
            return VerifiedCheckpoint(folder / entry["file"], state, skipped)
        except CheckpointError as exc:
            skipped.append(str(exc))
            print(f"ddp-reduce: warning: {exc}; trying an older checkpoint", file=sys.stderr)
    raise CheckpointError(
        f"no valid checkpoint in {folder} ({'; '.join(skipped)}); refusing to start over from "
        "step 0. Remove the folder to start the run again."
    )


def check_compatible(
    state: dict[str, Any], cfg_dict: dict, global_batch_size: int, steps: int | None = None
) -> None:
    if steps is not None and state["step"] > steps:
        raise CheckpointError(
            f"the checkpoint is at step {state['step']}, past train.steps={steps}; raise "
            "train.steps to go on from it, or remove the checkpoints to start again"
        )
    diffs = config_differences(state["config"], cfg_dict)
    if state["global_batch_size"] != global_batch_size:
        diffs.insert(
            0,
            f"global batch N={state['global_batch_size']} in the checkpoint, "
            f"{global_batch_size} now",
        )
    if diffs:
        raise CheckpointError("the checkpoint was written by another config: " + "; ".join(diffs))


# -- a trainer's checkpoints: every rank calls these -------------------------------------------


def _on_main(fn, ctx_is_main: bool) -> Any:
    """Run ``fn`` on rank 0 and give every rank its result (or raise its CheckpointError
    everywhere), so no rank is left waiting in a collective another has abandoned."""
    box: list[Any] = [None]
    if ctx_is_main:
        try:
            box[0] = fn()
        except CheckpointError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CheckpointError):
        raise box[0]
    return box[0]


def save_trainer(run_dir: Path, trainer: Trainer, keep: int) -> None:
    """Checkpoint the trainer at its step: a .pt under DDP, a .dcp folder under FSDP."""
    main = trainer.ctx.is_main
    if not parallel.is_fsdp(trainer.model):
        state = trainer.state_dict()  # a collective: every rank's RNG state
        if main:
            save(run_dir, state, keep)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder, name = run_dir / CHECKPOINTS, f"step_{trainer.step:08d}.dcp"

    def begin() -> tuple[list[dict], str]:
        own_folder(folder)  # never written through a link
        entries = _read_manifest(folder)  # refuses a corrupt manifest before anything is written
        remove_stale_temporaries(folder)
        return entries, str(folder / f".{name}.{uuid.uuid4().hex[:8]}.tmp")

    entries, tmp = _on_main(begin, main)
    extra = trainer.extra_state()
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        if main:
            torch.save({"format": FORMAT, **extra}, Path(tmp) / EXTRA)
            digest = _digest(Path(tmp))
            final = folder / name
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
            _record(folder, entries, name, trainer.step, digest, keep)
    except BaseException:
        # a full disk, a signal: the half-written folder goes first (it frees the space the
        # run's status needs), and the error goes on to be recorded
        if main:
            _remove(Path(tmp))
        raise
    dist.barrier()


def resume(run_dir: Path, trainer: Trainer) -> int | None:
    """Restore the newest valid checkpoint of this run into the trainer, if any; its step.

    Rank 0 reads the manifest and verifies the checkpoint; a .pt's state is broadcast (the other
    ranks, on other nodes too, need no shared storage), a .dcp folder is read by every rank.
    """

    def find() -> tuple[str, dict[str, Any]] | None:
        latest = load_latest(run_dir)
        if latest is None:
            return None
        check_compatible(
            latest.state,
            to_dict(trainer.cfg),
            trainer.geom.global_batch_size,
            steps=trainer.cfg.train.steps,
        )
        print(
            f"ddp-reduce: resuming from {latest.path} (step {latest.state['step']})",
            file=sys.stderr,
            flush=True,
        )
        return str(latest.path), latest.state

    found = _on_main(find, trainer.ctx.is_main)
    if found is None:
        return None
    path, state = found
    if path.endswith(".pt"):
        trainer.load_state_dict(state)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from ddp_reduce.run.dcp_metadata import SafeReader

        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        shards = {"model": model_state, "optimizer": optim_state}
        dcp.load(shards, storage_reader=SafeReader(path))
        set_state_dict(
            trainer.model,
            trainer.optimizer,
            model_state_dict=shards["model"],
            optim_state_dict=shards["optimizer"],
        )
        trainer.load_extra_state(state)
    return state["step"]
