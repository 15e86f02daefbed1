"""The reduction layer under Lightning: a Callback for the Trainer, and the Fabric recipe.

Trainer (strategy="ddp"; ``training_step`` returns this rank's *summed* loss)::

    trainer = L.Trainer(strategy="ddp", accumulate_grad_batches=2,
                        callbacks=[ReductionCallback(op="global_mean", noise=True)])

The callback attaches the layer to the strategy's DDP model when training starts, counts each
micro-batch's items (``items(batch)``; by default the length of the batch's last element, its
targets), undoes the Trainer's division by ``accumulate_grad_batches``, and logs c (measured on
the first step and every ``log_every``-th when ``loss_fn`` is given), the noise scale and the
reduction's error through the Trainer's logger.

Fabric: ``ddp_reduce.attach(fabric.setup(model))`` takes Fabric's wrapper; Fabric's backward
does not scale the loss, so nothing is undone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddp_reduce.integrations.report import scalars
from ddp_reduce.layer.reducer import Reducer, StepReport
from ddp_reduce.layer.reducer import attach as attach_layer


def _targets(batch: Any) -> int:
    return len(batch[-1]) if isinstance(batch, (tuple, list)) else len(batch)


def _callback_base() -> type:
    import lightning.pytorch as pl  # lazily: `import ddp_reduce` never loads Lightning

    return pl.Callback


class ReductionCallback(_callback_base()):  # type: ignore[misc]
    """Attach the reduction layer in a Lightning Trainer (see the module's docstring)."""

    def __init__(
        self,
        items: Callable[[Any], int] = _targets,
        loss_fn: Callable | None = None,
        log_every: int = 50,
        **attach_kwargs: Any,
    ):
        super().__init__()
        attach_kwargs.setdefault("loss", "sum")
        self.items, self.loss_fn, self.log_every = items, loss_fn, log_every
        self.attach_kwargs = attach_kwargs
        self.reducer: Reducer | None = None
        self.last: StepReport | None = None
        self._batches: list[Any] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.reducer = attach_layer(trainer.strategy.model, **self.attach_kwargs)
        self.reducer.undo = float(trainer.accumulate_grad_batches)

    def _logged(self, trainer: Any) -> bool:
        return trainer.global_step == 0 or (trainer.global_step + 1) % self.log_every == 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        logged = self._logged(trainer)
        self.reducer.add_items(self.items(batch), log=logged)
        if logged and self.loss_fn is not None:
            self._batches.append(batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._batches:
            report = self.reducer.measure(self.loss_fn, self._batches)
            self._batches = []
        else:
            report = self.reducer.last_step
        self.last = report
        if self._logged(trainer) and trainer.logger is not None:
            trainer.logger.log_metrics(scalars(report), step=trainer.global_step)
