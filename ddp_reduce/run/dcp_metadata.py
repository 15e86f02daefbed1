"""The ``.metadata`` of a sharded (``.dcp``) checkpoint, read without running what it holds.

``torch.distributed.checkpoint``'s own reader unpickles ``.metadata`` with ``pickle.load``: a
checkpoint folder whose ``.metadata`` was replaced (and its digest recomputed) would run any
code the pickle names. Here the unpickler builds only the plain records the library writes (its
metadata dataclasses, ``torch.Size``, dtypes, paths) and refuses everything else. Written by
hand because the library offers no restricted reader for this file (``torch.load``'s
``weights_only`` covers tensor files only).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

METADATA = ".metadata"
MAX_METADATA_BYTES = 64 << 20  # far above what a model's index takes; a bound on what is read

# (module, name) pairs the library's metadata pickle may name, besides the classes of its
# metadata module (checked in find_class)
ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided and the other layouts by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}
METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == METADATA_MODULE:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == METADATA_MODULE:
                return obj
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a checkpoint index never holds"
        )


def load_metadata(data: bytes) -> Any:
    """The metadata record pickled in ``data``; ValueError where it is anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{METADATA} is not a checkpoint index: {exc}") from None
    except RecursionError:
        raise ValueError(f"{METADATA} is nested too deeply to be a checkpoint index") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{METADATA} holds a {type(metadata).__name__}, not a checkpoint index")
    return metadata


def read_dcp_metadata(folder: Path) -> Any:
    """The metadata of the ``.dcp`` folder ``folder``, read with the restricted unpickler."""
    path = Path(folder) / METADATA
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{METADATA} is missing or not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"{METADATA} is over {MAX_METADATA_BYTES} bytes")
    return load_metadata(data)


class SafeReader(FileSystemReader):
    """The library's file-system reader with :func:`read_dcp_metadata` in place of its
    ``pickle.load`` (the shards themselves it reads with ``torch.load(weights_only=True)``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # a per-rank metadata file: not what save writes
            raise ValueError("per-rank checkpoint metadata is not read")
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
