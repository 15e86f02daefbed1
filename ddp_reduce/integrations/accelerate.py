"""The reduction layer under Hugging Face Accelerate.

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    reducer = ddp_reduce.integrations.accelerate.attach(accelerator, model, op="global_mean")
    for x, y in loader:
        reducer.add_items(len(y))                 # before each micro-batch's forward
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y, reduction="sum"))
            optimizer.step(); optimizer.zero_grad()

``accelerator.backward`` divides the loss by ``gradient_accumulation_steps``: the layer
multiplies it back (``reducer.undo``), so ``reducer.last_step.c`` is what the optimizer gets.
"""

from __future__ import annotations

from typing import Any

from ddp_reduce.layer.reducer import Reducer
from ddp_reduce.layer.reducer import attach as attach_layer


def attach(accelerator: Any, model: Any, **kwargs: Any) -> Reducer:
    """:func:`ddp_reduce.attach` on the model ``accelerator.prepare`` returned (DDP, FSDP2 or
    compiled), the accelerator's division of the loss undone. ``kwargs``: attach's
    (``loss`` defaults to ``"sum"`` here: count with ``reducer.add_items``)."""
    kwargs.setdefault("loss", "sum")
    reducer = attach_layer(model, **kwargs)
    reducer.undo = float(getattr(accelerator, "gradient_accumulation_steps", 1))
    return reducer
