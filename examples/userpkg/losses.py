"""Your loss: built from the config's keys, called as loss(output, target) -> (sum, item count).

The sum is over items (the reduction layer decides whether and by what it is divided); the
count must be the number of items the sum is over.
"""

import torch.nn.functional as F


class SmoothedCrossEntropy:
    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing

    def __call__(self, output, target):
        loss = F.cross_entropy(output, target, reduction="sum", label_smoothing=self.smoothing)
        return loss, len(target)


class OneVsRestBCE:
    """Each sample as ``classes`` binary problems: every (sample, class) pair is an item, as
    ``F.binary_cross_entropy_with_logits(reduction="mean")`` counts them. ``count(target)``
    says so before the forward, so the item counts differ from the sample counts."""

    def __init__(self, classes: int = 10):
        self.classes = classes

    def count(self, target):
        return len(target) * self.classes

    def __call__(self, output, target):
        onehot = F.one_hot(target, self.classes).to(output.dtype)
        loss = F.binary_cross_entropy_with_logits(output, onehot, reduction="sum")
        return loss, self.count(target)
