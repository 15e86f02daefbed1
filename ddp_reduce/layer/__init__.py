"""The reduction layer: the arithmetic of the factor c (``reduction``), ``attach`` and its
communication hook (``reducer``), the online noise scale (``noise``) and what it needs to know of
the strategy (``strategy``).

This package imports torch and the standard library only, never another part of ddp_reduce, so a
user of ``ddp_reduce.attach`` loads nothing of the trainer, its data, models, Hydra or TensorBoard.
Nothing is imported here: ``reduction`` (no torch) stays importable without torch.
"""
