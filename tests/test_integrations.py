"""The reduction layer where people train, each in a real gloo group (W=2, ragged counts,
A=2 micro-batches of ragged size): Accelerate, Lightning's Trainer and Fabric, the Hugging Face
Trainer. The received gradient is checked against G computed in one process in float64 (1e-5),
and the c the layer states against the c measured (torch.func)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ddp_reduce
from ddp_reduce.config import DistConfig
from ddp_reduce.distributed import distributed
from tests.helpers import W, assert_close, spawn

SPLIT = [[2, 3], [7, 4]]  # each rank's micro-batch item counts
COUNTS = [sum(s) for s in SPLIT]


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(sum(COUNTS), 6, generator=g), torch.randn(sum(COUNTS), generator=g)
    return x.to(dtype), y.to(dtype)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


def _loss(model, x, y) -> torch.Tensor:
    return (0.5 * (model(x).squeeze(-1) - y) ** 2).sum()


def _sum_loss(forward, batch):
    x, y = batch
    return _loss(forward, x, y), len(y)


def _micro(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches (contiguous slices of the global batch)."""
    x, y = _data()
    start = sum(COUNTS[:rank])
    bounds = torch.tensor(SPLIT[rank]).cumsum(0).tolist()[:-1]
    idx = torch.tensor_split(torch.arange(start, start + COUNTS[rank]), bounds)
    return [(x[i], y[i]) for i in idx]


def _reference() -> torch.Tensor:
    """G: the mean gradient over every item of the step, one process, float64."""
    model = _model(torch.float64)
    x, y = _data(torch.float64)
    (_loss(model, x, y) / len(y)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in module.parameters()])


def _result(report, grad) -> dict:
    return {"grad": grad, "c": report.c, "exact": report.exact, "measured": report.measured_c}


def _check(results: list[dict], c: float = 1.0) -> None:
    g = _reference()
    for r in results:
        assert r["c"] == c and r["exact"], r
        assert r["measured"] == pytest.approx(r["c"], rel=1e-5)  # stated c = received c
        assert_close(r["grad"], c * g)


# -- Accelerate --------------------------------------------------------------------------------


def _accelerate_job(init: str) -> dict:
    from accelerate import Accelerator

    from ddp_reduce.integrations import accelerate as integration

    out = {}
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
        micro = _micro(ctx.rank)
        for route in ("add_items", "loss_scale"):
            model = accelerator.prepare(_model())
            reducer = integration.attach(accelerator, model, op="global_mean")
            scale = reducer.loss_scale(COUNTS[ctx.rank]) if route == "loss_scale" else 1.0
            for x, y in micro:
                if route == "add_items":
                    reducer.add_items(len(y))
                with accelerator.accumulate(model):
                    accelerator.backward(_loss(model, x, y) * scale)
            report = reducer.measure(_sum_loss, micro)
            out[route] = _result(report, _flat(accelerator.unwrap_model(model)))
        # the plain layer, Accelerate's division not undone: measured, and the warning says so
        model = accelerator.prepare(_model())
        reducer = ddp_reduce.attach(model, loss="sum", op="global_mean")
        for x, y in micro:
            reducer.add_items(len(y))
            with accelerator.accumulate(model):
                accelerator.backward(_loss(model, x, y))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = reducer.measure(_sum_loss, micro)
        out["not_undone"] = (report.c, report.measured_c, [str(w.message) for w in caught])
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def accelerated(tmp_path_factory):
    pytest.importorskip("accelerate")
    return spawn(_accelerate_job, W, tmp_path_factory.mktemp("accelerate"))


@pytest.mark.parametrize("route", ["add_items", "loss_scale"])
def test_accelerate_gives_the_stated_c(accelerated, route):
    # Accelerate divides the loss by its 2 accumulation steps; the integration undoes it
    _check([rank[route] for rank in accelerated])


def test_accelerate_alone_halves_c_and_the_measurement_says_why(accelerated):
    for rank in accelerated:
        stated, measured, warned = rank["not_undone"]
        assert stated == 1 and measured == pytest.approx(0.5, rel=1e-5)
        assert (
            len(warned) == 1 and "1/2" in warned[0] and "gradient_accumulation_steps" in warned[0]
        )


# -- Lightning: the Trainer's callback, and Fabric --------------------------------------------


class _RankBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of the step, as index lists (ragged)."""

    def __init__(self, rank: int):
        start = sum(COUNTS[:rank])
        bounds = torch.tensor(SPLIT[rank]).cumsum(0).tolist()[:-1]
        idx = torch.tensor_split(torch.arange(start, start + COUNTS[rank]), bounds)
        self.batches = [i.tolist() for i in idx]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _lightning_job(init: str, logs: str) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from ddp_reduce.integrations.lightning import ReductionCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            x, y = batch
            return _loss(self, x, y)  # this rank's summed loss: the layer divides

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    received = {}

    class Grab(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            received["grad"] = _flat(pl_module.net)

    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        loader = DataLoader(TensorDataset(*_data()), batch_sampler=_RankBatches(ctx.rank))
        reduction = ReductionCallback(op="global_mean", loss_fn=_sum_loss, log_every=1)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=W,
            strategy="ddp",
            accumulate_grad_batches=2,
            max_steps=1,
            use_distributed_sampler=False,
            logger=TensorBoardLogger(logs, name="lightning"),
            callbacks=[reduction, Grab()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(), loader)
        out = _result(reduction.last, received["grad"])
        dist.barrier()
    return out


def _fabric_job(init: str) -> dict:
    import lightning as L

    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        fabric = L.Fabric(accelerator="cpu", devices=W, strategy="ddp")
        fabric.launch()
        model = fabric.setup(_model())
        reducer = ddp_reduce.attach(model, loss="sum", op="global_mean")  # Fabric's wrapper
        micro = _micro(ctx.rank)
        for a, (x, y) in enumerate(micro):
            reducer.add_items(len(y))
            with fabric.no_backward_sync(model, enabled=a < len(micro) - 1):
                fabric.backward(_loss(model, x, y))
        report = reducer.measure(_sum_loss, micro)
        out = _result(report, _flat(model.module))
        dist.barrier()
    return out


def _scalars(logs) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(logs.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_lightning_trainer_callback_gives_the_stated_c_and_logs_it(tmp_path):
    pytest.importorskip("lightning")
    # the Trainer divides the loss by accumulate_grad_batches=2; the callback undoes it
    results = spawn(_lightning_job, W, tmp_path, str(tmp_path / "logs"))
    _check(results)
    logged = _scalars(tmp_path / "logs")
    assert logged["ddp_reduce/c"] == [1.0]
    assert logged["ddp_reduce/measured_c"][0] == pytest.approx(1.0, rel=1e-5)
    assert logged["ddp_reduce/global_items"] == [float(sum(COUNTS))]


def test_lightning_fabric_model_is_attached_as_fabric_returns_it(tmp_path):
    pytest.importorskip("lightning")
    _check(spawn(_fabric_job, W, tmp_path))


# -- the Hugging Face Trainer -----------------------------------------------------------------

VOCAB, SEQ = 40, 6
# tokens per sequence that are targets (the rest -100): ragged over ranks and micro-batches
TARGETS = [6, 2, 5, 3, 6, 6, 1, 4]


def _gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype)


def _sequences() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in TARGETS:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[n:] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _hf_run(ctx, out_dir: str, average_tokens: bool) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ddp_reduce.integrations.transformers import reduction_trainer

    seen, received = [], {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            received["grad"] = _flat(trainer.model)

    class Recording(reduction_trainer(Trainer)):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        ddp_backend="gloo",
        average_tokens_across_devices=average_tokens,
        report_to=["tensorboard"],
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    trainer = Recording(
        model=_gpt2(),
        args=args,
        train_dataset=_sequences(),
        reduction={"op": "global_mean"},
    )
    trainer.add_callback(Grab())
    trainer.train()
    out = _result(trainer.last_report, received["grad"])
    out["seen"] = seen
    out["rank"] = ctx.rank
    return out


def _hf_job(init: str, out_dir: str) -> dict:
    """Every rank: one Trainer step with average_tokens_across_devices on, one with it off."""
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        out = {on: _hf_run(ctx, f"{out_dir}/{on}", on) for on in (True, False)}
        dist.barrier()
    return out


def _hf_reference(ranks: list[dict]) -> torch.Tensor:
    """G over every token target the ranks saw, one process, float64: the model's own loss
    given num_items_in_batch=1 is the sum over its (shifted) targets."""
    model = _gpt2(torch.float64)
    total = 0
    for r in ranks:
        for inputs in r["seen"]:
            model(**inputs, num_items_in_batch=1).loss.backward()
            total += int(inputs["labels"][..., 1:].ne(-100).sum())
    return torch.cat([p.grad.flatten() for p in model.parameters()]) / total


@pytest.fixture(scope="module")
def hf_trained(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    return out, spawn(_hf_job, W, out, str(out / "out"))


@pytest.mark.parametrize("average_tokens", [True, False])
def test_hugging_face_trainer_gives_the_stated_c(hf_trained, average_tokens):
    # on: the Trainer multiplies each loss by W (undone); off: it does not. Either way the
    # loss is the micro-batch's sum and the layer divides by the step's token total
    out, both = hf_trained
    ranks = [r[average_tokens] for r in both]
    g = _hf_reference(ranks)
    assert sum(len(r["seen"]) for r in ranks) == 4  # W=2 ranks, A=2 micro-batches each
    for r in ranks:
        assert r["c"] == 1 and r["exact"]
        assert r["measured"] == pytest.approx(1.0, rel=1e-5)
        assert_close(r["grad"], g)
    logged = _scalars(out / "out" / str(average_tokens))  # the Trainer's TensorBoard: train/...
    assert logged["train/ddp_reduce/c"] == [1.0]
    assert logged["train/ddp_reduce/measured_c"][0] == pytest.approx(1.0, rel=1e-5)
