"""ddp_reduce: sum or mean? The gradient reduction of data-parallel training, made explicit.

The public API (everything else is private):

    reducer = ddp_reduce.attach(ddp_model, loss="sum", op="global_mean", noise=True)
    scale = reducer.loss_scale(local_items)       # multiply this rank's summed loss by it
    reducer.add_items(n)                          # or count one micro-batch at a time
    reducer.last_step                             # c, exact, global_items, the noise scale
    reducer.term_scales(tokens=n, sequences=m)    # several loss terms: a factor per unit
    reducer.measure(loss_fn, micro_batches)       # the c the optimizer received, measured
    ddp_reduce.convert(ddp_reduce.Setting(...), to="mean/mean")   # per-knob rows, as data
    ddp_reduce.rank_batch_sampler(n, N, rank=r, world_size=W, steps=T)  # a DataLoader sampler
    ddp_reduce.audit(["train.py", "--batch", "{b}"], global_batch=16)  # -> AuditResult

Names are imported on first use, so ``ddp-reduce convert`` never loads torch. The frameworks'
integrations are in ``ddp_reduce.integrations`` (imported only when asked for).
"""

__version__ = "0.1.0"

_API = {
    "attach": "ddp_reduce.layer.reducer",
    "Reducer": "ddp_reduce.layer.reducer",
    "StepReport": "ddp_reduce.layer.reducer",
    "convert": "ddp_reduce.analysis.convert",
    "Setting": "ddp_reduce.analysis.convert",
    "Conversion": "ddp_reduce.analysis.convert",
    "rank_batch_sampler": "ddp_reduce.batches",
    "audit": "ddp_reduce.auditing.runner",
    "AuditResult": "ddp_reduce.auditing.result",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ddp_reduce' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names too (they are loaded on first use), so completion offers them."""
    return sorted({*globals(), *__all__})
