"""The audit probe: loaded into every rank of a training script it knows nothing of, it records in
float64 what the optimizer receives at each of the first K optimizer steps, fingerprints the items
the model was fed, and ends the ranks after the K-th step.

It imports torch and the standard library only: it runs inside users' processes. It is loaded
either as the script torchrun starts (``torchrun ... probe.py train.py ARGS``: it installs its
hooks, then runs the user's script with runpy) or from a ``sitecustomize`` on PYTHONPATH (a
launcher of the user's choosing). Its settings come from the environment (``ENV_*`` below).

What it hooks, all through public entry points:
- ``register_optimizer_step_pre_hook`` (global): the gradient the optimizer is about to use. A step
  given a closure (Lightning) is captured after the closure ran, inside the step.
- ``torch.nn.Module.__call__`` (wrapped): the inputs of each outermost call of a module with
  trainable parameters, with gradients enabled: the items of the step, and the micro-batches the
  reference gradient is recomputed from.
- ``torch.nn.utils.clip_grads_with_norm_`` (wrapped; ``clip_grad_norm_`` and Accelerate call it):
  the gradient before clipping and the pre-clip norm.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

ENV_DIR = "DDP_REDUCE_AUDIT_DIR"  # where this layout's captures go; the probe is off without it
ENV_STEPS = "DDP_REDUCE_AUDIT_STEPS"  # K, the audited optimizer steps
ENV_EXACT_LIMIT = (
    "DDP_REDUCE_AUDIT_EXACT_LIMIT"  # the exact gradient is kept up to this many elements
)
ENV_DIMS = "DDP_REDUCE_AUDIT_DIMS"  # the random projection's dimension
ENV_REFERENCE = "DDP_REDUCE_AUDIT_REFERENCE"  # causal-lm | classification | pkg.module:fn
EXACT_LIMIT = 4_000_000
DIMS = 256
SEED = 20260
BLOCK = 1 << 14  # projection columns are generated per block of a parameter's flat elements
IGNORE_INDEX = -100


class _State:
    def __init__(self) -> None:
        self.out = Path(os.environ[ENV_DIR])
        self.steps = int(os.environ.get(ENV_STEPS, "1"))
        self.exact_limit = int(os.environ.get(ENV_EXACT_LIMIT, str(EXACT_LIMIT)))
        self.dims = int(os.environ.get(ENV_DIMS, str(DIMS)))
        self.reference = os.environ.get(ENV_REFERENCE, "")
        self.done = 0  # audited steps captured
        self.in_call = False
        self.items: list[str] = []
        self.batches: list[tuple[torch.nn.Module, tuple, dict]] = []
        self.preclip: dict[int, torch.Tensor] = {}
        self.clip: dict = {}
        self.trainable: dict[int, bool] = {}


_state: _State | None = None


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---- the items: what the model was fed ------------------------------------------------------


def _first_tensor(obj) -> torch.Tensor | None:
    """The first tensor with a batch dimension in nested tuples, lists and dicts, in order."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dim() >= 1 else None
    values = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    )
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _unpadded(row: torch.Tensor) -> torch.Tensor:
    """A row without its trailing positions that are all 0 or -100, the usual padding: the same
    whatever width a batch padded it to (a sequence that ends in real zeros loses them in every
    layout alike)."""
    if row.dim() == 0 or row.shape[0] == 0:
        return row
    pad = (row == 0) | (row == IGNORE_INDEX)
    real = (~pad.reshape(row.shape[0], -1).all(dim=1)).nonzero()
    return row[: int(real.max()) + 1] if real.numel() else row[:0]


def _hash(row: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{row.dtype}:{tuple(row.shape[1:])}".encode())
    h.update(_bytes(row))
    return h.hexdigest()


def item_hashes(args: tuple, kwargs: dict) -> list[str]:
    """One fingerprint per item of a model call, "hash:hash of it without its last position":
    a row, along the first dimension, of its first input tensor (positional first, then
    keyword, in the order given: the data, whichever way a framework passes it; a Lightning
    batch (x, y) hashes as x). Padding is left out, where an ``attention_mask`` marks it or
    else as trailing 0 or -100, so a sequence hashes the same whatever it was padded to."""
    first = _first_tensor(args)
    first = first if first is not None else _first_tensor(kwargs)
    if first is None:
        return []
    mask = kwargs.get("attention_mask")
    masked = isinstance(mask, torch.Tensor) and mask.dim() == 2 and first.shape[:2] == mask.shape
    hashes = []
    for i in range(first.shape[0]):
        row = first[i][mask[i].bool()] if masked else _unpadded(first[i])
        # and of the row without its last position: a shifted language-model input
        # (tokens[:, :-1]) cuts the last token of a batch's longest sequence only
        hashes.append(f"{_hash(row)}:{_hash(row[:-1]) if row.dim() else ''}")
    return hashes


def _trainable(module: torch.nn.Module) -> bool:
    known = _state.trainable.get(id(module))
    if known is None:
        known = any(p.requires_grad for p in module.parameters())
        _state.trainable[id(module)] = known
    return known


_module_call = torch.nn.Module.__call__


def _call(self, *args, **kwargs):
    state = _state
    if state is None or state.in_call or not torch.is_grad_enabled() or not _trainable(self):
        return _module_call(self, *args, **kwargs)
    state.in_call = True  # only the outermost call: the model, not its layers
    try:
        state.items += item_hashes(args, kwargs)
        if all(m is not self for m in _models):
            _models.append(self)
        if state.reference:
            state.batches.append((self, args, kwargs))
        return _module_call(self, *args, **kwargs)
    finally:
        state.in_call = False


# ---- clipping: the gradient before it ----------------------------------------------------------

_clip = torch.nn.utils.clip_grad._clip_grads_with_norm_


def _clip_grads_with_norm(parameters, max_norm, total_norm, foreach=None):
    """What ``clip_grad_norm_`` and Accelerate's clipping both call to scale the gradients."""
    state = _state
    if state is None:
        return _clip(parameters, max_norm, total_norm, foreach)
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
    norm = float(norm)
    clipped = norm > float(max_norm)  # scaled by max_norm / (norm + 1e-6) when that is below 1
    if clipped:
        state.preclip.update({id(p): p.grad.detach().clone() for p in params if p.grad is not None})
    state.clip = {"preclip_norm": norm, "max_norm": float(max_norm), "clipped": clipped}
    return _clip(params, max_norm, total_norm, foreach)


# ---- the gradient: exact below a size, a seeded random projection always --------------------


def _local(grad: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """This rank's part of a gradient, flat, its offset in the whole flattened gradient, and
    whether it is a shard (summed over ranks) rather than a replica (the same on every rank)."""
    if not hasattr(grad, "to_local"):
        return grad.detach().reshape(-1), 0, False
    placements = grad.placements
    mesh = grad.device_mesh
    if mesh.ndim != 1 or not all(type(p).__name__ == "Replicate" for p in placements):
        if mesh.ndim == 1 and type(placements[0]).__name__ == "Shard" and placements[0].dim == 0:
            local = grad.to_local().detach()
            rows = param.shape[0]
            chunk = -(-rows // mesh.size())  # torch.chunk's split, as Shard(0) uses it
            start = min(mesh.get_local_rank() * chunk, rows)
            row_numel = local[0].numel() if local.shape[0] else 0
            return local.reshape(-1), start * row_numel, True
        return grad.full_tensor().detach().reshape(-1), 0, False
    return grad.to_local().detach().reshape(-1), 0, False


def _project(index: int, flat: torch.Tensor, offset: int, numel: int, dims: int) -> torch.Tensor:
    """R_index[:, offset:offset+n] @ flat for a parameter of ``numel`` elements, R's columns
    drawn per block from a seed of (index, block): any rank can project any slice of a
    parameter without the rest of it. Blocks are at most BLOCK columns, fewer for a smaller
    parameter (its size, not the slice's: every rank draws the same R)."""
    out = torch.zeros(dims, dtype=torch.float64, device=flat.device)
    flat = flat.to(torch.float64)
    width = min(BLOCK, numel)
    pos, end = offset, offset + flat.numel()
    gen = torch.Generator(device=flat.device)
    while pos < end:
        block = pos // width
        stop = min(end, (block + 1) * width)
        gen.manual_seed(SEED + 1_000_003 * index + block)
        cols = torch.randn(dims, width, generator=gen, dtype=torch.float64, device=flat.device)
        lo = pos - block * width
        out += cols[:, lo : lo + stop - pos] @ flat[pos - offset : stop - offset]
        pos = stop
    return out / dims**0.5


def describe(grads: list[torch.Tensor | None], params: list, dims: int, exact: bool) -> dict:
    """A gradient as per-parameter records: shape, squared norm, projection, and the exact
    float64 values of this rank's part when ``exact``."""
    records = []
    for index, (grad, param) in enumerate(zip(grads, params, strict=True)):
        if grad is None:
            records.append(None)
            continue
        flat, offset, shard = _local(grad, param)
        rec = {
            "shape": list(param.shape),
            "offset": offset,
            "shard": shard,
            "sqnorm": float(flat.double().pow(2).sum()),
            "proj": _project(index, flat, offset, param.numel(), dims).cpu(),
            "exact": flat.double().cpu().clone() if exact else None,
        }
        records.append(rec)
    return {"params": records}


# ---- the reference: the per-item mean gradient of the whole global batch -----------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    for _ in range(8):
        inner = getattr(model, "module", None) or getattr(model, "_forward_module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def causal_lm(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (labels shifted by one, -100 ignored) and its count."""
    if isinstance(batch, dict):
        ids, labels = batch["input_ids"], batch.get("labels", batch["input_ids"])
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        logits = _logits(model(**inputs))
    else:
        ids = labels = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = _logits(model(ids))
    logits, target = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((target != IGNORE_INDEX).sum())


def classification(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the output against the target: ``labels`` of a keyword batch, or
    the second element of an ``(input, target)`` batch."""
    if isinstance(batch, dict):
        target = batch["labels"]
        logits = _logits(model(**{k: v for k, v in batch.items() if k != "labels"}))
    else:
        x, target = batch[0], batch[1]
        logits = _logits(model(x))
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def _reference_fn(name: str):
    if name in ("causal-lm", "classification"):
        return causal_lm if name == "causal-lm" else classification
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _batch_of(args: tuple, kwargs: dict):
    """The micro-batch as the reference callable sees it: the model's keyword inputs, or its one
    positional input, or the tuple of them."""
    if kwargs and not args:
        return {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    return args[0] if len(args) == 1 else args


def reference_gradient(params: list) -> tuple[list[torch.Tensor | None], int]:
    """Sum over this rank's captured micro-batches of the gradient of the summed loss, at the
    step's weights, through autograd.grad (no ``.grad`` touched, no DDP reduction), all-reduced
    over ranks and divided by the global item count."""
    fn = _reference_fn(_state.reference)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = 0
    for module, args, kwargs in _state.batches:
        loss, n = fn(_unwrap(module), _batch_of(args, kwargs))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(total, grads, strict=True):
            if g is not None:
                acc += g.detach().double()
        count += n
    counted = torch.tensor([float(count)], dtype=torch.float64, device=total[0].device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for acc in total:
            dist.all_reduce(acc)
        dist.all_reduce(counted)
    return [acc / counted for acc in total], int(counted.item())


# ---- the step ----------------------------------------------------------------------------------


def _is_wrapper(optimizer) -> bool:
    """An optimizer that steps another one (Accelerate's): the inner one is captured."""
    return isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)


def _reference_record(params: list, dims: int, exact: bool) -> dict:
    if any(hasattr(p, "to_local") for p in params):
        return {"error": "no reference under sharded (DTensor) parameters"}
    _state.in_call = True  # the reference's own forward calls are no items of the step
    try:
        grads, count = reference_gradient(params)
    except Exception as exc:  # the user's callable or model: its error is reported, not raised
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    finally:
        _state.in_call = False
    return {**describe(grads, params, dims, exact), "items": count}


def capture(optimizer) -> None:
    state = _state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [state.preclip.get(id(p), p.grad) for p in params]
    numel = sum(p.numel() for p, g in zip(params, grads, strict=True) if g is not None)
    exact = numel <= state.exact_limit
    rank, world = _rank()
    record = {
        "rank": rank,
        "world_size": world,
        "step": state.done + 1,
        "items": state.items,
        "clip": state.clip,
        "dims": state.dims,
        "exact": exact,
        "dropout": _random_modules(),
        **describe(grads, params, state.dims, exact),
    }
    if state.reference:
        record["reference"] = _reference_record(params, state.dims, exact)
    state.out.mkdir(parents=True, exist_ok=True)
    path = state.out / f"step{state.done + 1}-rank{rank}.pt"
    torch.save(record, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # a reader never sees half a file
    state.done += 1
    state.items, state.batches, state.preclip, state.clip = [], [], {}, {}
    if state.done >= state.steps:
        _finish(rank)


_models: list = []  # the outermost modules seen, for naming random layers


def _random_modules() -> list[str]:
    """Dropout layers with p > 0 in training mode in the modules the step's items went through:
    they make layouts differ by chance."""
    names = set()
    for module in _models:
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0 and sub.training:
                names.add(f"{name or type(module).__name__} (p={sub.p})")
    return sorted(names)[:20]


def _finish(rank: int) -> None:
    """The K-th step is captured: every rank has written its file; end them all, cleanly."""
    (_state.out / f"rank{rank}.done").write_text("ok\n")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _pre_step(optimizer, args, kwargs):
    if _state is None or _is_wrapper(optimizer) or _state.done >= _state.steps:
        return None
    # args holds the optimizer itself first, then step's own arguments
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        capture(optimizer)
        return None

    def captured():  # the gradient exists only once the closure has run
        result = closure()
        capture(optimizer)
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": captured}
    return (args[0], captured, *args[2:]), kwargs


def install() -> None:
    """Turn the probe on in this process (a no-op without DDP_REDUCE_AUDIT_DIR)."""
    global _state
    if _state is not None or not os.environ.get(ENV_DIR):
        return
    _state = _State()
    register_optimizer_step_pre_hook(_pre_step)
    torch.nn.Module.__call__ = _call
    # clip_grad_norm_ finds this name in its module at each call; Accelerate imports it anew
    torch.nn.utils.clip_grad._clip_grads_with_norm_ = _clip_grads_with_norm
    torch.nn.utils.clip_grads_with_norm_ = _clip_grads_with_norm


def main() -> None:
    """``probe.py [--] SCRIPT ARGS`` or ``probe.py -m MODULE ARGS``: the user's program as
    ``__main__``, with the probe installed."""
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: probe.py SCRIPT [ARGS] | probe.py -m MODULE [ARGS]")
    install()
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
