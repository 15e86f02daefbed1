"""Datasets (all in memory, generated or shipped with a package) and the global-batch sampler.

A data set is one entry of :data:`DATASETS`: its loader and the task it poses (which decides the
models that fit it, see :data:`ddp_reduce.models.MODELS`), plus a YAML in ``conf/data/``.
"""

from __future__ import annotations

import functools
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp_reduce.config import ConfigError, DataConfig, LastBatch


class Task(Enum):
    classification = "classification"  # one item per sample, cross-entropy
    regression = "regression"  # one item per sample, (1/2)·squared error
    lm = "lm"  # next-token prediction: one item per predicted token


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor
    # lm only: tokens per sequence; a sequence of length L contributes L - 1 items.
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> Split:
        """Inputs and targets on ``device``; lengths stay on the CPU, where items are counted."""
        return Split(self.x.to(device), self.y.to(device), self.lengths)

    def items(self, idx: torch.Tensor) -> int:
        if self.lengths is None:
            return len(idx)
        return int(self.lengths[idx].sum()) - len(idx)

    def batch(self, idx: torch.Tensor) -> Batch:
        """The rows ``idx`` (a CPU index), on the split's device."""
        device = self.x.device
        if self.lengths is None:
            rows = idx.to(device)
            return Batch(self.x[rows], self.y[rows], None)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 2
        tokens = self.x[idx.to(device), :width]
        mask = torch.arange(width - 1)[None, :] < (lengths[:, None] - 1)
        return Batch(tokens[:, :-1], tokens[:, 1:], mask.to(device))


@dataclass
class Batch:
    x: Any  # what the model is called with (a tensor for the built-in data)
    y: Any  # the targets
    mask: torch.Tensor | None = None  # lm: which target positions are real tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(_to(self.x, device), _to(self.y, device), _to(self.mask, device))


def _to(obj: Any, device: torch.device) -> Any:
    """Tensors, and tensors in tuples, lists and dicts, on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Dataset:
    name: str
    task: Task
    train: Split
    test: Split
    input_shape: tuple[int, ...]  # of one sample (lm: the vocabulary size, as (V,))
    num_outputs: int
    max_len: int = 0  # lm: the longest sequence


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[[DataConfig], Dataset]
    task: Task


def load_dataset(cfg: DataConfig) -> Dataset:
    return dataset_entry(cfg.name).load(cfg)


def dataset_entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ConfigError("data.name", name, f"one of {sorted(DATASETS)}")
    return DATASETS[name]


def _digits_file() -> Path:
    """scikit-learn's bundled copy of the UCI digits (what ``sklearn.datasets.load_digits``
    reads), found without importing scikit-learn: that import costs more than half a second,
    paid by every rank of every run."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.name", "digits", "a data set whose package is installed (scikit-learn)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


@functools.lru_cache(maxsize=1)
def _digits_table(path: Path) -> np.ndarray:
    """The digits file parsed (1797 rows: 64 pixels, then the label), read-only; kept, as a
    process that runs many runs (a study's ranks, a sweep's) would parse it every time (about 30 ms
    a run, for the same 1797 rows)."""
    table = np.loadtxt(path, delimiter=",")
    table.flags.writeable = False
    return table


def _digits(cfg: DataConfig) -> Dataset:
    table = _digits_table(_digits_file())
    x = torch.tensor(table[:, :-1] / 16.0, dtype=torch.float32)
    y = torch.tensor(table[:, -1], dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(cfg.data_seed).permutation(len(x)))
    n_test = int(round(len(x) * cfg.test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(
        "digits",
        Task.classification,
        Split(x[train], y[train]),
        Split(x[test], y[test]),
        input_shape=(64,),
        num_outputs=10,
    )


@dataclass
class LinearProblem:
    """y = x·w* + noise, x ~ N(0, Q diag(λ) Qᵀ): the spectrum is known in closed form."""

    dataset: Dataset
    eigenvalues: np.ndarray  # of the population covariance, descending
    rotation: np.ndarray  # Q
    w_star: np.ndarray
    noise_std: float

    def second_moment(self, bias: bool = True) -> np.ndarray:
        """H = X̃ᵀX̃ / n over the training inputs (float64): the Hessian of the mean loss.

        With ``bias`` the inputs get a constant 1 appended (X̃ = [X, 1]): the model's bias is a
        parameter too (``model=linear`` has one).
        """
        x = self.dataset.train.x.double().numpy()
        if bias:
            x = np.hstack([x, np.ones((len(x), 1))])
        return x.T @ x / len(x)

    def lambda_max(self, bias: bool = True) -> float:
        return float(np.linalg.eigvalsh(self.second_moment(bias))[-1])


def linear_problem(cfg: DataConfig) -> LinearProblem:
    return _linear(cfg)


def _linear(cfg: DataConfig) -> LinearProblem:
    rng = np.random.default_rng(cfg.data_seed)
    d = cfg.dim
    eig = np.geomspace(cfg.eig_max, cfg.eig_min, d) if d > 1 else np.array([cfg.eig_max])
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w_star = rng.standard_normal(d) / np.sqrt(d)

    def draw(n: int) -> Split:
        x = (rng.standard_normal((n, d)) * np.sqrt(eig)) @ q.T
        y = x @ w_star + cfg.noise_std * rng.standard_normal(n)
        return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))

    train, test = draw(cfg.n_train), draw(cfg.n_test)
    ds = Dataset("linear", Task.regression, train, test, input_shape=(d,), num_outputs=1)
    return LinearProblem(ds, eig, q, w_star, cfg.noise_std)


def _sequences(cfg: DataConfig) -> Dataset:
    """Token sequences of variable length from a fixed random Markov chain."""
    rng = np.random.default_rng(cfg.data_seed)
    v = cfg.vocab_size
    transition = rng.dirichlet(np.full(v, cfg.concentration), size=v)
    cumulative = np.cumsum(transition, axis=1)

    def draw(n: int) -> Split:
        lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=n)
        tokens = np.zeros((n, cfg.max_len), dtype=np.int64)
        tokens[:, 0] = rng.integers(0, v, size=n)
        for t in range(1, cfg.max_len):
            u = rng.random(n)[:, None]
            nxt = (u > cumulative[tokens[:, t - 1]]).sum(axis=1)
            tokens[:, t] = np.minimum(nxt, v - 1)
        tokens[np.arange(cfg.max_len)[None, :] >= lengths[:, None]] = 0
        return Split(torch.from_numpy(tokens), torch.from_numpy(tokens), torch.from_numpy(lengths))

    train, test = draw(cfg.n_train), draw(cfg.n_test)
    return Dataset(
        "sequences", Task.lm, train, test, input_shape=(v,), num_outputs=v, max_len=cfg.max_len
    )


def text_documents(cfg: DataConfig) -> list[bytes]:
    """The documents of ``data=text``: blocks of text between blank lines (in source code: a
    function, a class, a docstring, an import block) of the files ``data.pattern`` finds under
    ``data.root``, in sorted order, at most ``data.max_documents`` of them.

    The default root is this Python's own standard library (installed packages excluded), so
    the data set is on every machine, offline, and the same on every run.
    """
    root = Path(cfg.root) if cfg.root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError("data.root", cfg.root, "an existing folder of text files")
    pattern = cfg.pattern
    if not pattern.strip() or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise ConfigError(
            "data.pattern", repr(pattern), "a glob relative to data.root (e.g. **/*.py), no '..'"
        )
    documents: list[bytes] = []
    for path in _files(root, pattern, cfg.root is None):
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                "data.root", str(root), f"a folder of readable files ({path}: {exc.strerror})"
            ) from None
        for block in re.split(rb"\n[ \t]*\n", text):
            if len(block.strip()) >= 2:
                documents.append(block.strip(b"\n"))
        if len(documents) >= cfg.max_documents:
            break
    if len(documents) < 2:
        raise ConfigError("data.pattern", cfg.pattern, f"a glob that finds text files under {root}")
    return documents[: cfg.max_documents]


@functools.lru_cache(maxsize=4)
def _files(root: Path, pattern: str, stdlib: bool) -> tuple[Path, ...]:
    """The files ``pattern`` finds under ``root``, sorted (the standard library's own: installed
    packages left out), kept per process: the glob walks the whole tree before the first file is
    read (0.6 s for the standard library's 13,000 files, of which a run reads about 20), which a
    process running many runs (a study's ranks, a sweep's) would pay every run."""
    found = []
    for path in sorted(root.glob(pattern)):
        if stdlib and {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        if path.is_file():
            found.append(path)
    return tuple(found)


def _text(cfg: DataConfig) -> Dataset:
    """Byte-level language modelling over local text files: one item per predicted byte."""
    docs = text_documents(cfg)
    lengths = torch.tensor([min(len(d), cfg.max_len) for d in docs], dtype=torch.int64)
    tokens = torch.zeros((len(docs), cfg.max_len), dtype=torch.int64)
    for i, d in enumerate(docs):
        row = d[: cfg.max_len]
        tokens[i, : len(row)] = torch.frombuffer(bytearray(row), dtype=torch.uint8).long()
    order = torch.from_numpy(np.random.default_rng(cfg.data_seed).permutation(len(docs)))
    n_test = max(1, int(round(len(docs) * cfg.test_fraction)))
    test, train = order[:n_test], order[n_test:]

    def split(rows: torch.Tensor) -> Split:
        return Split(tokens[rows], tokens[rows], lengths[rows])

    return Dataset(
        "text",
        Task.lm,
        split(train),
        split(test),
        input_shape=(256,),
        num_outputs=256,
        max_len=cfg.max_len,
    )


# The built-in data sets: name -> (loader, task). A new one: an entry here and conf/data/NAME.yaml.
DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(_digits, Task.classification),
    "linear": DatasetEntry(lambda cfg: _linear(cfg).dataset, Task.regression),
    "sequences": DatasetEntry(_sequences, Task.lm),
    "text": DatasetEntry(_text, Task.lm),
}


@dataclass
class UserData:
    """Your own data (data._target_): map-style Datasets of (input, target) pairs."""

    name: str
    train: Any
    test: Any

    task = None  # the loss decides what an item is (the default: one sample)


def load_data(cfg: DataConfig) -> Dataset | UserData:
    """The built-in data set named ``data.name``, or yours (``data._target_``)."""
    if cfg.target is None:
        return load_dataset(cfg)
    from ddp_reduce.targets import build

    what = "a callable returning (train, eval) map-style Datasets"
    made = build("data", cfg.target, cfg.kwargs, what)
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ConfigError("data._target_", cfg.target, f"{what}; it returned {type(made).__name__}")
    for name, split in zip(("train", "eval"), made, strict=True):
        if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
            raise ConfigError(
                "data._target_",
                cfg.target,
                f"{what}; its {name} part is a {type(split).__name__} without __getitem__ and "
                "__len__ (an IterableDataset cannot be sampled by the global batch sampler)",
            )
        if len(split) == 0:
            raise ConfigError("data._target_", cfg.target, f"{what}; its {name} part is empty")
    return UserData(cfg.target, made[0], made[1])


class GlobalBatchSampler:
    """The global batch of step t, from (seed, t) alone; each rank takes its slice.

    Each epoch is a permutation of the training set drawn from (seed, epoch). Step t takes the
    next N = W·b·A items of its epoch's permutation, so for a fixed N the global batch is the same
    set of items for every (W, b, A), and a resumed run sees the data it would have seen. The
    epoch's final partial batch is dropped or kept ragged; items are never duplicated to pad it.
    """

    def __init__(self, n_items: int, global_batch_size: int, seed: int, last_batch: LastBatch):
        self.n_items = n_items
        self.global_batch_size = global_batch_size
        self.seed = seed
        full, rest = divmod(n_items, global_batch_size)
        self.steps_per_epoch = full + (1 if rest and last_batch is LastBatch.keep else 0)
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = torch.from_numpy(rng.permutation(self.n_items))
            self._epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        n = self.global_batch_size
        return self._permutation(epoch)[k * n : (k + 1) * n]

    def micro_batches(
        self, step: int, rank: int, world_size: int, accum_steps: int
    ) -> list[torch.Tensor]:
        """This rank's A micro-batches of step t: contiguous slices of the global batch.

        With a full batch rank r holds items [r·b·A, (r+1)·b·A) and micro-step a the b items from
        a·b. A ragged batch is split as evenly as possible (earlier slices one item longer).
        """
        share = self.rank_shares(step, world_size)[rank]
        return list(torch.tensor_split(share, accum_steps))

    def rank_shares(self, step: int, world_size: int) -> tuple[torch.Tensor, ...]:
        """Every rank's contiguous slice of the global batch of step t."""
        return torch.tensor_split(self.global_batch(step), world_size)
