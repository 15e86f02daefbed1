"""The reduction layer under the Hugging Face Trainer: :func:`reduction_trainer` makes a
Trainer subclass.

    Trainer = reduction_trainer(transformers.Trainer)
    trainer = Trainer(model=model, args=args, train_dataset=data, reduction={"op": "global_mean"})

Each micro-batch's loss becomes this rank's *sum* over its items (the model's loss is given
``num_items_in_batch=1``, so the model needs to accept loss keywords, as the Trainer's causal
and masked language models do, or a ``compute_loss_func``), its items (labels other than -100,
shifted as the model shifts them) are counted per micro-batch, and the division by the step's
total happens in the reduction. The Trainer's own multiplication by the world size
(``average_tokens_across_devices``) is undone. c, the measured c (first step and logged ones),
the noise scale and the reduction's error go through the Trainer's ``log`` (TensorBoard with
``report_to="tensorboard"``).
"""

from __future__ import annotations

from typing import Any

from ddp_reduce.integrations.report import scalars
from ddp_reduce.layer.reducer import Reducer, StepReport
from ddp_reduce.layer.reducer import attach as attach_layer

IGNORE = -100  # the label the Trainer's losses skip


def token_items(inputs: dict[str, Any], shifted: bool) -> int:
    """The items a micro-batch's loss sums over: its labels other than -100 (a causal language
    model predicts token t+1 from t: the first label of each row is never a target)."""
    labels = inputs["labels"]
    if shifted:
        labels = labels[..., 1:]
    return int(labels.ne(IGNORE).sum())


def _shifts_labels(model: Any) -> bool:
    """Whether the model's loss is a causal LM's (labels shifted by one). The model's own
    ``loss_function`` is asked: the Trainer's ``_loss_shifts_labels`` reads ``loss_type``,
    which is None on a model built from a config, and then counts every label."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = getattr(model, "config", None)
    causal = getattr(model, "loss_function", None) is ForCausalLMLoss
    return causal and not getattr(config, "is_encoder_decoder", False)


def _measured_loss(shifted: bool):
    def loss_fn(forward, inputs):
        out = forward(**inputs, num_items_in_batch=1)
        return out["loss"] if isinstance(out, dict) else out[0], token_items(inputs, shifted)

    return loss_fn


def reduction_trainer(base: type) -> type:
    """A subclass of ``base`` (``transformers.Trainer`` or a subclass of it) with the layer."""

    class ReductionTrainer(base):
        def __init__(self, *args: Any, reduction: dict | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.reduction = {"loss": "sum", "op": "global_mean", **(reduction or {})}
            self.reducer: Reducer | None = None
            self.last_report: StepReport | None = None
            self._step_inputs: list[dict] = []
            self.add_callback(_report_callback(self))
            self._shifted = _shifts_labels(self.model)

        def _attach(self, model: Any) -> None:
            if not (self.model_accepts_loss_kwargs or self.compute_loss_func):
                raise ValueError(
                    f"{type(self.model).__name__}'s loss takes no num_items_in_batch: its loss "
                    "is a mean the layer cannot turn into a sum; pass compute_loss_func= "
                    "(called with num_items_in_batch) to the Trainer"
                )
            self.reducer = attach_layer(model, **self.reduction)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                self.reducer.undo = 1.0 / self.accelerator.num_processes

        def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None):
            if self.reducer is None:
                self._attach(model)
            every = max(int(self.args.logging_steps), 1)
            logged = self.state.global_step == 0 or (self.state.global_step + 1) % every == 0
            self.reducer.add_items(token_items(inputs, self._shifted), log=bool(logged))
            if logged:
                self._step_inputs.append(dict(inputs))
            # num_items_in_batch=1: the model's loss is the micro-batch's sum over its items
            return super().training_step(model, inputs, 1)

        def optimizer_step_report(self) -> StepReport:
            """After the step's backward: what the layer did (measured on logged steps)."""
            if self._step_inputs:
                report = self.reducer.measure(_measured_loss(self._shifted), self._step_inputs)
                self._step_inputs = []
            else:
                report = self.reducer.last_step
            self.last_report = report
            return report

    return ReductionTrainer


def _report_callback(trainer: Any) -> Any:
    from transformers import TrainerCallback  # lazily: `import ddp_reduce` never loads it

    class _Report(TrainerCallback):
        """After the step's backward (and clipping), before the optimizer: the layer's report,
        logged through the Trainer's log (its TensorBoard writer) on logged steps."""

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            measured = bool(trainer._step_inputs)
            report = trainer.optimizer_step_report()
            if measured:
                trainer.log(scalars(report))

    return _Report()
