"""How a rank's micro-batches reach the model: from memory (the fast path) or a DataLoader.

Both follow the global batch sampler (:class:`ddp_reduce.data.GlobalBatchSampler`): the global
batch of step t is a function of (seed, t), the same items for every (W, b, A), and each rank
takes its slice. :class:`RankMicroBatches` is that sampler as a ``torch.utils.data`` batch
sampler, so a DataLoader (workers, prefetching, any map-style Dataset) serves the same items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from ddp_reduce.config import LastBatch
from ddp_reduce.data import Batch, GlobalBatchSampler, Split


class RankMicroBatches(Sampler[list[int]]):
    """This rank's micro-batches, step after step: for step t (0-based) from ``start`` to
    ``stop``, the A index lists of the rank's slice of the global batch."""

    def __init__(
        self,
        sampler: GlobalBatchSampler,
        rank: int,
        world_size: int,
        accum_steps: int,
        start: int,
        stop: int,
    ):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.accum_steps, self.start, self.stop = accum_steps, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            for idx in self.sampler.micro_batches(
                step, self.rank, self.world_size, self.accum_steps
            ):
                yield idx.tolist()

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum_steps


def rank_batch_sampler(
    n_items: int,
    global_batch_size: int,
    *,
    rank: int,
    world_size: int,
    steps: int,
    accum_steps: int = 1,
    seed: int = 0,
    start_step: int = 0,
    last_batch: str = "drop",
) -> RankMicroBatches:
    """The global batch sampler for your own DataLoader: ``DataLoader(dataset,
    batch_sampler=ddp_reduce.rank_batch_sampler(len(dataset), N, rank=..., world_size=...,
    steps=...))`` yields this rank's micro-batches of steps ``start_step`` to ``steps - 1``.

    Step t's global batch is a function of (seed, t) only: the same items for every (W, b, A),
    so runs at different world sizes are comparable item for item, and a resumed run sees the
    data it would have seen. An epoch's last partial batch is dropped or kept ragged, never
    padded with duplicated items."""
    _check_sampler_args(n_items, global_batch_size, rank, world_size, accum_steps, last_batch)
    if global_batch_size % (world_size * accum_steps):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of world_size x "
            f"accum_steps = {world_size} x {accum_steps}"
        )
    sampler = GlobalBatchSampler(n_items, global_batch_size, seed, LastBatch[last_batch])
    return RankMicroBatches(sampler, rank, world_size, accum_steps, start_step, steps)


def _check_sampler_args(
    n_items: int, global_batch_size: int, rank: int, world_size: int, accum_steps: int, last: str
) -> None:
    """ValueError naming the argument, its value and what is allowed."""
    for name, value, low in (
        ("n_items", n_items, 1),
        ("global_batch_size", global_batch_size, 1),
        ("world_size", world_size, 1),
        ("accum_steps", accum_steps, 1),
        ("rank", rank, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: allowed a whole number >= {low}")
    if rank >= world_size:
        raise ValueError(f"rank={rank}: allowed 0 to world_size - 1 = {world_size - 1}")
    if last not in LastBatch.__members__:
        raise ValueError(f"last_batch={last!r}: allowed {', '.join(LastBatch.__members__)}")
    if global_batch_size > n_items and LastBatch[last] is LastBatch.drop:
        raise ValueError(
            f"global_batch_size={global_batch_size} > n_items={n_items} with last_batch='drop': "
            "every batch would be dropped; allowed a global batch of at most n_items, or "
            "last_batch='keep' (one ragged batch an epoch)"
        )


class _Indices(torch.utils.data.Dataset):
    """A built-in split seen as a map-style Dataset of its row indices (the collate function
    builds the batch), so the DataLoader path serves exactly the in-memory path's batches."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class SplitCollate:
    """Row indices of a built-in split to its batch (a class: DataLoader workers pickle it)."""

    def __init__(self, split: Split):
        self.split = split

    def __call__(self, indices: list[int]) -> Batch:
        return self.split.batch(torch.tensor(indices, dtype=torch.int64))


def pairs_collate(samples: list[Any]) -> Batch:
    """Map-style samples of (input, target), collated as PyTorch does."""
    try:
        x, y = default_collate(samples)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "data._target_: each sample must be an (input, target) pair of tensors or numbers "
            f"that PyTorch's default_collate can stack ({exc})"
        ) from None
    return Batch(x, y)


def as_dataset(data: Split | Any) -> tuple[Any, Callable[[list], Batch]]:
    """A map-style Dataset and its collate function, for a built-in split or your own data."""
    if isinstance(data, Split):
        return _Indices(len(data)), SplitCollate(data)
    return data, pairs_collate


@dataclass
class MicroBatches:
    """A step's micro-batches on this rank and, where the data know them (the split's own
    item counts, read on the host: no device sync), the item counts the step is planned with."""

    micro: list[Batch]
    micro_items: list[int] | None = None  # this rank's micro-batches' counts
    counts: list[int] | None = None  # every rank's count
    micro_equal: bool | None = None  # every micro-batch of every rank holds the same count


class MemoryBatches:
    """The fast path: the whole split on the device; with ``counts_known`` (the loss counts
    the split's own items) every rank's item count known up front."""

    def __init__(
        self,
        split: Split,
        sampler: GlobalBatchSampler,
        rank: int,
        world_size: int,
        accum_steps: int,
        counts_known: bool = True,
    ):
        self.split, self.sampler = split, sampler
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.counts_known = counts_known

    def step(self, step: int, micro_equal: bool = False) -> MicroBatches:
        """Step ``step`` (1-based); ``micro_equal``: also say whether all micro-batches of all
        ranks hold the same count (what ``loss=micro_mean`` needs to be exact)."""
        shares = self.sampler.rank_shares(step - 1, self.world_size)
        # each rank's A micro-batches: as the sampler's micro_batches splits them
        mine = torch.tensor_split(shares[self.rank], self.accum_steps)
        out = MicroBatches([self.split.batch(idx) for idx in mine])
        if self.counts_known:
            out.micro_items = [self.split.items(idx) for idx in mine]
            out.counts = [self.split.items(s) for s in shares]
            if micro_equal:
                out.micro_equal = 1 == len(
                    {
                        self.split.items(idx)
                        for share in shares
                        for idx in torch.tensor_split(share, self.accum_steps)
                    }
                )
        return out


class LoaderBatches:
    """A ``torch.utils.data.DataLoader`` over a map-style Dataset, its batches drawn by
    :class:`RankMicroBatches`; the other ranks' counts are not known here (the reduction layer
    all-reduces them)."""

    def __init__(
        self,
        data: Split | Any,
        sampler: GlobalBatchSampler,
        rank: int,
        world_size: int,
        accum_steps: int,
        device: torch.device,
        num_workers: int,
        start: int,
        stop: int,
    ):
        dataset, collate = as_dataset(data)
        self.device, self.accum_steps, self.next_step = device, accum_steps, start + 1
        batches = RankMicroBatches(sampler, rank, world_size, accum_steps, start, stop)
        self._iter = iter(
            DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collate,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
            )
        )

    def step(self, step: int, micro_equal: bool = False) -> MicroBatches:
        """The step's micro-batches; no counts: the other ranks' batches are theirs."""
        if step != self.next_step:
            raise RuntimeError(f"the DataLoader is at step {self.next_step}, not {step}")
        self.next_step += 1
        return MicroBatches([next(self._iter).to(self.device) for _ in range(self.accum_steps)])


def eval_batches(
    data: Split | Any,
    rank: int,
    world_size: int,
    device: torch.device,
    num_workers: int = 0,
    size: int = 2048,
) -> Iterator[Batch]:
    """This rank's share of a whole split, in batches of at most ``size``: as many batches on
    every rank (a sharded model's forward is a collective: no rank may skip one)."""
    shard: Sequence[int] = torch.tensor_split(torch.arange(len(data)), world_size)[rank]
    longest = math.ceil(len(data) / world_size)  # the largest rank's share
    chunks_n = max(1, math.ceil(longest / size))
    chunks = torch.tensor_split(shard, chunks_n)
    if isinstance(data, Split):
        for idx in chunks:
            yield data.batch(idx)
        return
    dataset, collate = as_dataset(data)
    chunks = [c.tolist() for c in chunks]
    loader = DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, num_workers=num_workers)
    for batch in loader:
        yield batch.to(device)
