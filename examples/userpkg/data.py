"""Your data: a callable returning (train, eval) map-style Datasets of (input, target) pairs."""

import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Points around one centre per class; generated from a seed, so every rank has the same."""

    def __init__(self, n: int, inputs: int, classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(classes, inputs, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centres[self.y] + 0.8 * torch.randn(n, inputs, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_splits(n_train: int = 1024, n_eval: int = 256, inputs: int = 12, classes: int = 4):
    return Blobs(n_train, inputs, classes, seed=0), Blobs(n_eval, inputs, classes, seed=1)
