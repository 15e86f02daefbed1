"""The examples, run as a user runs them, against one-process references:
a plain torchrun script using ``ddp_reduce.attach``, and a user package trained by ``ddp-reduce``
through ``_target_``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ddp_reduce.config import load_config
from tests.helpers import REPO, VENV_BIN, ddp_reduce, run_cli

EXAMPLES = REPO / "examples"
SCRIPT = str(EXAMPLES / "ddp_script.py")
USER = {"PYTHONPATH": str(EXAMPLES)}
TOL = dict(rtol=1e-5, atol=1e-6)


def _script(tmp_path, name: str, nproc: int, *args: str) -> dict:
    out = tmp_path / f"{name}.pt"
    if nproc == 1:
        proc = run_cli(str(VENV_BIN / "python"), SCRIPT, *args, "--out", str(out))
    else:
        torchrun = str(VENV_BIN / "torchrun")
        proc = run_cli(
            torchrun, "--standalone", f"--nproc-per-node={nproc}", SCRIPT, *args, "--out", str(out)
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "c = " in proc.stdout
    return torch.load(out)


def _close(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("script")
    return {
        "w2_b16": _script(tmp, "w2_b16", 2, "--batch-size", "16"),
        "w1_b32": _script(tmp, "w1_b32", 1, "--batch-size", "32"),
        "w1_b16_a2": _script(tmp, "w1_b16_a2", 1, "--batch-size", "16", "--accum", "2"),
        "sum_sum_lr_over_N": _script(
            tmp,
            "sum_sum",
            2,
            "--batch-size",
            "16",
            "--loss",
            "sum",
            "--op",
            "sum",
            "--lr",
            str(0.1 / 32),
        ),
        "sum_global_mean": _script(
            tmp, "sum_gm", 2, "--batch-size", "16", "--loss", "sum", "--op", "global_mean"
        ),
    }


def test_the_script_at_two_ranks_is_one_process_with_the_whole_batch(script_runs):
    _close(script_runs["w2_b16"], script_runs["w1_b32"])
    _close(script_runs["w1_b16_a2"], script_runs["w1_b32"])


@pytest.mark.parametrize("name", ["sum_sum_lr_over_N", "sum_global_mean"])
def test_the_script_in_other_conventions_with_lr_over_c(script_runs, name):
    _close(script_runs[name], script_runs["w2_b16"])


USER_RUN = (
    "+model._target_=userpkg.nets.Classifier",
    "+model.width=32",
    "+data._target_=userpkg.data.make_splits",
    "train.steps=30",
    "train.eval_every=10",
    "train.log_every=5",
)


def _user(tmp_path, name: str, *overrides: str) -> dict:
    proc = ddp_reduce(*USER_RUN, *overrides, f"hydra.run.dir={tmp_path / name}", env=USER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / name / "model.pt")


def test_a_user_package_through_ddp_reduce_matches_one_process(tmp_path):
    w2 = _user(tmp_path, "w2", "dist.nproc=2", "data.batch_size=16")
    w1 = _user(tmp_path, "w1", "dist.nproc=1", "data.batch_size=32")
    _close(w2, w1)
    summary = json.loads((tmp_path / "w2" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["grad_scale"] == 1
    assert summary["final_eval_accuracy"] > 0.5  # the default loss: cross-entropy per sample
    saved = (tmp_path / "w2" / "config.yaml").read_text()
    assert "_target_: userpkg.nets.Classifier" in saved and "width: 32" in saved


def test_a_user_loss_with_its_own_arguments(tmp_path):
    _user(
        tmp_path,
        "loss",
        "+loss._target_=userpkg.losses.SmoothedCrossEntropy",
        "+loss.smoothing=0.2",
        "dist.nproc=1",
    )
    summary = json.loads((tmp_path / "loss" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_eval_accuracy"] is None


def test_a_user_loss_counting_its_own_items_on_built_in_data(tmp_path):
    # ten items per sample: the step is planned with the loss's counts, not the data's rows
    # (the sum over every item divided by the global item count is the mean of the means)
    common = ("+loss._target_=userpkg.losses.OneVsRestBCE", "train.steps=10", "dist.nproc=2")
    runs = {}
    for loss, op in (("sum", "global_mean"), ("mean", "mean"), ("sum", "sum")):
        name = f"{loss}_{op}"
        lr = 0.1 / 640 if op == "sum" else 0.1  # c = N = 2 x 32 x 10 items for sum/sum
        proc = ddp_reduce(
            *common,
            f"reduce.loss={loss}",
            f"reduce.op={op}",
            f"optim.lr={lr}",
            f"hydra.run.dir={tmp_path / name}",
            env=USER,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        c = 640 if op == "sum" else 1
        assert summary["grad_scale_range"] == [c, c], summary["grad_scale_range"]
        printed = f"c = {c} on every step" if c != 1 else "c = 1  ["
        assert printed in proc.stdout, proc.stdout
        runs[name] = torch.load(tmp_path / name / "model.pt")
    _close(runs["sum_global_mean"], runs["mean_mean"])
    _close(runs["sum_sum"], runs["mean_mean"])


def test_the_readmes_user_package_command_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = readme.split("**Through `ddp-reduce`**", 1)[1].split("```bash", 1)[1].split("```")[0]
    words = block.replace("\\\n", " ").split()
    assert words[:2] == ["PYTHONPATH=examples", "ddp-reduce"], words
    run = tmp_path / "readme"
    proc = ddp_reduce(
        *words[2:], "train.steps=5", "train.eval_every=0", f"hydra.run.dir={run}", env=USER
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    # the argument named like a built-in key reached the callable (its own default: 1024)
    assert summary["train_items"] == 512, summary
    # ... and stays apart when the run's config is saved and read back (resume, ranks)
    saved = load_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.data.kwargs == {"n_train": 512, "n_eval": 128}


NET = "+model._target_=userpkg.nets.Classifier"
DATA = "+data._target_=userpkg.data.make_splits"
BAD_TARGETS = [
    ([NET.replace("nets.Classifier", "nope.Net"), DATA], ["userpkg.nope.Net", "no attribute"]),
    ([NET, "+model.widht=3", DATA], ["unexpected keyword", "widht"]),
    ([NET.replace("nets.Classifier", "data.make_splits"), DATA], ["an nn.Module"]),
    ([NET, "+model.inputs=5", DATA], ["the model's forward", "shapes"]),
    (
        [NET, DATA.replace("data.make_splits", "nets.Classifier")],
        ["data._target_", "(train, eval)"],
    ),
    ([NET, DATA, "+loss._target_=userpkg.data.Blobs"], ["loss._target_"]),
    (["model=mlp", DATA], ["model=mlp", "model._target_ with data._target_"]),
    # a key of the built-in data or models beside a _target_: refused, not dropped
    ([NET, DATA, "data.n_train=512"], ["data.n_train=512", "+data.kwargs.n_train="]),
    ([NET, "model.hidden=[8]", DATA], ["model.hidden=[8]", "+model.kwargs.hidden="]),
]


@pytest.mark.parametrize("overrides,words", BAD_TARGETS, ids=range(len(BAD_TARGETS)))
def test_bad_targets_are_refused_before_any_rank_starts(tmp_path, overrides, words):
    proc = ddp_reduce(*overrides, f"hydra.run.dir={tmp_path / 'bad'}", env=USER)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ddp-reduce: error:" in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()
