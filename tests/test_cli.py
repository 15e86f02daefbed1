"""Both launch paths end to end, as a user runs them: outputs, equivalence, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tests.helpers import ddp_reduce, torchrun

SHORT = ("train.steps=30", "train.log_every=5", "train.eval_every=10")
TAGS = {
    "train/loss",
    "eval/loss",
    "eval/accuracy",
    "optim/lr",
    "grad/global_norm",
    "grad/local_norm_mean",
    "optim/update_to_weight",
    "perf/items_per_s",
    "perf/step_time_s",
    "reduce/grad_scale",
}


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    app = ddp_reduce(*SHORT, f"hydra.run.dir={root / 'app'}")
    tr = torchrun(2, *SHORT, f"hydra.run.dir={root / 'torchrun'}")
    return root, app, tr


def test_ddp_reduce_prints_summary_and_leaves_a_run_directory(launched):
    root, app, _ = launched
    _ok(app)
    run = root / "app"
    out = app.stdout
    assert "ddp-reduce: completed" in out
    assert "gradient factor c = 1" in out
    assert str(run) in out and f"tensorboard --logdir {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["world_size"], summary["global_batch_size"], summary["grad_scale"]) == (
        2,
        64,
        1,
    )
    assert 0 < summary["final_eval_accuracy"] <= 1
    assert (run / "config.yaml").exists() and (run / "model.pt").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [5, 10, 15, 20, 25, 30]


def test_tensorboard_events_hold_the_tags_and_only_rank0_wrote(launched):
    root, _, _ = launched
    tb = root / "app" / "tb"
    events = list(tb.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: rank 0
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert TAGS <= set(acc.Tags()["scalars"])
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # the final metrics sit at the run's last step (not at step 0, far left of every chart)
    for tag in ("final/train_loss", "final/eval_loss", "final/eval_accuracy", "final/diverged"):
        assert [e.step for e in acc.Scalars(tag)] == [30], tag
    # the HParams view's plugin data is there, in the same events file
    content = acc.PluginTagToContent("hparams")
    experiment = hparams_metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    infos = [(h.name, h.differs) for h in experiment.hparam_infos]
    axes = ["reduce.loss", "reduce.op", "lr", "global_batch_size", "world_size", "grad_scale"]
    assert infos[:6] == [(name, True) for name in axes]  # listed first, marked to be shown
    assert not any(differs for _, differs in infos[6:])
    assert [m.name.tag for m in experiment.metric_infos] == [
        "final/train_loss",
        "final/eval_loss",
        "final/eval_accuracy",
        "final/diverged",
    ]
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content["_hparams_/session_start_info"]
    )
    assert start.hparams["reduce.op"].string_value == "mean"
    assert start.hparams["world_size"].number_value == 2
    # optim.clip_norm is null: the column is declared, this run leaves its cell empty (not 0.0)
    assert "clip_norm" in {name for name, _ in infos}
    assert "clip_norm" not in start.hparams


def test_torchrun_and_ddp_reduce_give_identical_weights(launched):
    root, app, tr = launched
    _ok(app)
    _ok(tr)
    assert "ddp-reduce: completed" in tr.stdout
    a = torch.load(root / "app" / "model.pt")
    b = torch.load(root / "torchrun" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((root / "app" / "summary.json").read_text())
    sb = json.loads((root / "torchrun" / "summary.json").read_text())
    assert sa["final_train_loss"] == sb["final_train_loss"]


def test_one_process_without_torchrun(tmp_path):
    app = ddp_reduce(*SHORT, "dist.nproc=1", f"hydra.run.dir={tmp_path / 'a'}")
    _ok(app)
    plain = torchrun(1, *SHORT, f"hydra.run.dir={tmp_path / 'b'}")
    _ok(plain)
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["world_size"] == 1


def test_divergence_stops_all_ranks_and_exits_zero(tmp_path):
    run = tmp_path / "div"
    proc = ddp_reduce(
        "data=linear",
        "model=linear",
        "optim.lr=50",
        "optim.momentum=0",
        "train.steps=200",
        f"hydra.run.dir={run}",
    )
    _ok(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_at_step"], int) and 1 < summary["diverged_at_step"] < 200
    assert summary["steps_done"] == summary["diverged_at_step"] - 1
    assert f"diverged at step {summary['diverged_at_step']}" in proc.stdout


def test_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    run = tmp_path / "nan"
    proc = torchrun(2, *SHORT, "fault.nan_at_step=7", "fault.nan_rank=1", f"hydra.run.dir={run}")
    _ok(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["diverged_at_step"], summary["steps_done"]) == (
        "diverged",
        7,
        6,
    )
    assert Path(run / "model.pt").exists()
