"""Models, the per-item objective, and a batch norm whose statistics span all ranks.

A model is one entry of :data:`MODELS`: its builder and the tasks it fits (so the models allowed
with a data set are derived, not listed), plus a YAML in ``conf/model/``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from ddp_reduce.config import ConfigError, ModelConfig, RunConfig, SeqArch
from ddp_reduce.data import Batch, Dataset, Task, UserData, dataset_entry

# torch.distributed.nn.functional.all_reduce warns that it is deprecated for the functional
# collectives, but those have no all_reduce with a backward in this torch: it is still the one
# differentiable all-reduce. Only that warning is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
    category=FutureWarning,
)


class GlobalBatchNorm(nn.Module):
    """Batch norm whose training statistics span the items of *all* ranks, on any device.

    PyTorch's SyncBatchNorm runs on GPUs only (and DDP refuses it on CPU modules), so the
    statistics are all-reduced here with differentiable collectives: the backward pass then sums
    across ranks too, exactly as one process would over the W·b items. The state dict has the
    same keys as ``nn.BatchNorm*d``; evaluation uses the running statistics as usual.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        synced = dist.is_initialized() and dist.get_world_size() > 1
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = torch.cat([count, x.sum(dims)])
        if synced:
            sums = dist_fn.all_reduce(sums)
        n = sums[0]
        mean = sums[1:] / n
        centered = x - mean.view(shape)
        sq = centered.pow(2).sum(dims)
        var = (dist_fn.all_reduce(sq) if synced else sq) / n
        with torch.no_grad():
            unbiased = var * (n / (n - 1)) if n > 1 else var
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
            self.num_batches_tracked += 1
        y = centered / torch.sqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape)


def _norm_layer(cfg: ModelConfig, features: int, dims: int) -> nn.Module:
    if cfg.sync_bn:
        return GlobalBatchNorm(features)
    return nn.BatchNorm1d(features) if dims == 1 else nn.BatchNorm2d(features)


def _mlp(cfg: ModelConfig, n_in: int, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in cfg.hidden:
        layers.append(nn.Linear(n_in, width))
        if cfg.batch_norm:
            layers.append(_norm_layer(cfg, width, 1))
        layers.append(nn.ReLU())
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Small convnet for 8x8 digits: conv blocks, one 2x2 pool, then an MLP head."""

    def __init__(self, cfg: ModelConfig, n_out: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
        c_in = 1
        for c in cfg.channels:
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            if cfg.batch_norm:
                layers.append(_norm_layer(cfg, c, 2))
            layers.append(nn.ReLU())
            c_in = c
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = _mlp(cfg, c_in * 16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flattened here, not as the last layer of features: under FSDP2 each child is a unit,
        # and a unit should not return a view (an in-place op on it would skip FSDP's hooks)
        return self.head(self.features(x).flatten(1))


class SeqModel(nn.Module):
    """Next-token model: embedding, one causal GRU or transformer layer, a linear head."""

    def __init__(self, cfg: ModelConfig, vocab: int, max_len: int):
        super().__init__()
        d = cfg.embed_dim
        self.arch = cfg.arch
        self.embed = nn.Embedding(vocab, d)
        if cfg.arch is SeqArch.gru:
            self.body: nn.Module = nn.GRU(d, d, batch_first=True)
        else:
            self.pos = nn.Parameter(torch.randn(max_len, d) / math.sqrt(d))
            self.body = nn.TransformerEncoderLayer(
                d, cfg.heads, 2 * d, dropout=0.0, batch_first=True
            )
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.arch is SeqArch.gru:
            h, _ = self.body(h)
        else:
            t = tokens.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
            h = self.body(h + self.pos[:t], src_mask=mask, is_causal=True)
        return self.head(h)


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[ModelConfig, Dataset], nn.Module]
    tasks: frozenset[Task]  # the data it fits


# The built-in models: name -> (builder, tasks). A new one: an entry here and
# conf/model/NAME.yaml; the data sets it may train on follow from its tasks.
MODELS: dict[str, ModelEntry] = {
    "linear": ModelEntry(
        lambda cfg, data: nn.Linear(data.input_shape[0], data.num_outputs),
        frozenset({Task.classification, Task.regression}),
    ),
    "mlp": ModelEntry(
        lambda cfg, data: _mlp(cfg, data.input_shape[0], data.num_outputs),
        frozenset({Task.classification, Task.regression}),
    ),
    "cnn": ModelEntry(
        lambda cfg, data: DigitsCNN(cfg, data.num_outputs), frozenset({Task.classification})
    ),
    "seq": ModelEntry(
        lambda cfg, data: SeqModel(cfg, data.num_outputs, data.max_len), frozenset({Task.lm})
    ),
}


def check_model_for_data(cfg: RunConfig) -> None:
    """Refuse a built-in model that is unknown or does not fit the data set's task."""
    model, data = cfg.model, cfg.data
    if model.target is not None:
        return  # your own model: built and tried on a batch in ``check_components``
    if data.target is not None:
        raise ConfigError(
            "model",
            model.name,
            f"model._target_ with data._target_ (the built-in models are shaped for the built-in "
            f"data; {sorted(MODELS)} cannot size themselves to yours)",
        )
    task = dataset_entry(data.name).task
    allowed = [name for name, entry in MODELS.items() if task in entry.tasks]
    if model.name not in allowed:
        raise ConfigError("model", model.name, f"with data={data.name} one of {allowed}")


def build_model(cfg: ModelConfig, data: Dataset | UserData) -> nn.Module:
    """The built-in model ``model.name``, or yours (``model._target_``)."""
    if cfg.target is None:
        return MODELS[cfg.name].build(cfg, data)
    from ddp_reduce.targets import build

    model = build("model", cfg.target, cfg.kwargs, "an nn.Module", kind=nn.Module)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model._target_", cfg.target, f"an nn.Module; it built a {type(model).__name__}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model._target_", cfg.target, "an nn.Module with parameters to train")
    return model


class Objective:
    """What a batch's output is scored by: ``(summed loss, correct predictions or None)``, and
    the batch's item count, known before the forward (the reduction plans the step with it)."""

    per_sample = True  # one item per sample (the noise scale's finite-population correction)
    # its count of a batch is the split's own item count (Split.items), which every rank can
    # read for every rank's batch before the step; otherwise the counts are all-reduced
    counts_split_items = False

    def count(self, batch: Batch) -> int:
        return len(batch.y)

    def __call__(
        self, out: Any, batch: Batch, accuracy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class TaskObjective(Objective):
    """The built-in tasks' losses (cross-entropy per sample also for your own data)."""

    counts_split_items = True  # Split.items: the rows, or the tokens after the first

    def __init__(self, task: Task):
        self.task = task
        self.per_sample = task is not Task.lm

    def count(self, batch: Batch) -> int:
        return int(batch.mask.sum()) if self.task is Task.lm else len(batch.y)

    def __call__(
        self, out: Any, batch: Batch, accuracy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss, correct = loss_sums(self.task, out, batch, accuracy)
        return loss, (None if self.task is Task.regression else correct)


class UserLoss(Objective):
    """Your loss (loss._target_): ``loss(output, target) -> (summed loss, item count)``. Its
    count of a batch before the forward is ``loss.count(target)`` if it has one, else one item
    per sample; the count it returns must agree."""

    def __init__(self, fn: Callable, target: str, rows_are_items: bool = False):
        """``rows_are_items``: the data's items are its rows (not tokens), so a loss without
        its own count counts what the data count."""
        self.fn, self.target = fn, target
        self.per_sample = not hasattr(fn, "count")
        self.counts_split_items = rows_are_items and self.per_sample

    def count(self, batch: Batch) -> int:
        if not hasattr(self.fn, "count"):
            return len(batch.y)
        return self._whole(self.fn.count(batch.y), "its count(target)")

    def _whole(self, value: Any, what: str) -> int:
        """An item count as given (an int, or a 0-d tensor or float holding one); refused
        where it is no positive whole number: the reduction divides by it."""
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if not (math.isfinite(number) and number == int(number) and number > 0):
            raise ValueError(
                f"loss._target_={self.target}: {what} gave {value!r:.40} items; an item count "
                "is a positive whole number"
            )
        return int(number)

    def __call__(
        self, out: Any, batch: Batch, accuracy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        result = self.fn(out, batch.y)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                f"loss._target_={self.target} must return (summed loss, item count), "
                f"not {type(result).__name__}"
            )
        loss, items = result
        items = self._whole(items, "the item count it returned")
        if items != self.count(batch):
            raise ValueError(
                f"loss._target_={self.target} counted {items} items in a batch whose count "
                f"before the forward was {self.count(batch)} (give the loss a count(target) "
                "method that counts the same items)"
            )
        return loss, None


class TermsLoss(Objective):
    """Your loss of several terms, each summed over its own units (loss._target_ with a
    ``counts(target) -> {unit: count}`` method): called as ``loss(output, target) -> {unit:
    (sum, count)}``, its ``weights`` ({unit: weight}, 1 where absent) set through its own
    arguments. The first unit is the step's items (what ``global_mean`` divides by and the
    logged loss is per); each term gets the factor of ``Reducer.term_scales`` for its unit.

    A step's factors are set by :meth:`plan` and used by that step's micro-batches; outside a
    step (evaluation) the loss is the first term alone."""

    per_sample = False

    def __init__(self, fn: Callable, target: str):
        self.fn, self.target = fn, target
        self._ratios: dict[str, float] | None = None  # each term's factor over the first's
        self._calls_left = 0  # micro-batches of the planned step still to come

    def units(self, batch: Batch) -> dict[str, int]:
        return {unit: int(n) for unit, n in self.fn.counts(batch.y).items()}

    def count(self, batch: Batch) -> int:
        return next(iter(self.units(batch).values()))

    def plan(self, reducer: Any, micro: list[Batch], **kw: Any) -> list[float]:
        """One all-reduce of every unit's count of the step; the loss scale of each micro-batch
        (the first term's factor: the others are carried as ratios to it)."""
        units: dict[str, int] = {}
        for batch in micro:
            for unit, n in self.units(batch).items():
                units[unit] = units.get(unit, 0) + n
        factors = reducer.term_scales(**kw, **units)
        first = next(iter(factors.values())) or 1.0  # 0 on a rank without items: unscaled
        weights = getattr(self.fn, "weights", None) or {}
        self._ratios = {u: float(weights.get(u, 1.0)) * f / first for u, f in factors.items()}
        self._calls_left = len(micro)
        return [first] * len(micro)

    def __call__(
        self, out: Any, batch: Batch, accuracy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        terms = self.fn(out, batch.y)
        want = self.units(batch)
        if not isinstance(terms, dict) or list(terms) != list(want):
            raise TypeError(
                f"loss._target_={self.target} must return {{unit: (sum, count)}} for the units "
                f"its counts() names, {list(want)}, in that order"
            )
        for unit, (_, n) in terms.items():
            if int(n) != want[unit]:
                raise ValueError(
                    f"loss._target_={self.target} counted {int(n)} {unit} in a batch whose "
                    f"counts() said {want[unit]}"
                )
        ratios = self._ratios if self._calls_left > 0 else {next(iter(want)): 1.0}
        self._calls_left -= 1
        return sum(r * terms[u][0] for u, r in ratios.items()), None


def build_objective(cfg: RunConfig, data: Dataset | UserData) -> Objective:
    if cfg.loss.target is not None:
        from ddp_reduce.targets import build

        fn = build("loss", cfg.loss.target, cfg.loss.kwargs, "a callable loss(output, target)")
        if not callable(fn):
            raise ConfigError(
                "loss._target_",
                cfg.loss.target,
                f"a factory of a callable loss(output, target); it built a {type(fn).__name__} "
                "(for a plain function add +loss._partial_=true)",
            )
        if hasattr(fn, "counts"):  # several terms, each with its own units
            return TermsLoss(fn, cfg.loss.target)
        return UserLoss(fn, cfg.loss.target, rows_are_items=data.task not in (None, Task.lm))
    return TaskObjective(data.task or Task.classification)


def loss_sums(
    task: Task, out: torch.Tensor, batch: Batch, accuracy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of the items' losses, number of correct predictions or None) of one batch.

    Always a *sum* over items: the division that makes it a mean, if any, is the reduction
    layer's (``ddp_reduce.layer.reduction.loss_scale``), so it can span all of the step's
    micro-batches.
    """
    if task is Task.regression:
        err = out.squeeze(-1) - batch.y
        return 0.5 * err.pow(2).sum(), torch.zeros((), device=out.device)
    if task is Task.lm:
        out, y = out[batch.mask], batch.y[batch.mask]
    else:
        y = batch.y
    loss = F.cross_entropy(out, y, reduction="sum")
    correct = (out.argmax(-1) == y).sum() if accuracy else None
    return loss, correct
