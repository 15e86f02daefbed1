"""Faults that must leave a status and a clear message: a NaN result, signals from a closed
terminal, a rank's own error, your own data and loss misbehaving, and numbers out of range."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from ddp_reduce.config import ConfigError
from ddp_reduce.run.rundir import json_ready
from ddp_reduce.run.summary import FINISHED, RunSummary, Status, format_summary, read_summary
from ddp_reduce.trainer import prepare
from tests.helpers import REPO, VENV_BIN, config, ddp_reduce, project_env
from tests.test_hardening import LONG, _kill_group, _ranks, _running, _wait_training

EXAMPLES = REPO / "examples"
USER = {"PYTHONPATH": f"{REPO}{os.pathsep}{EXAMPLES}"}  # tests.fault_targets and userpkg
FAST = ("train.steps=3", "train.eval_every=0", "train.log_every=1", "dist.threads_per_rank=1")


# --- the summary, typed --------------------------------------------------------------------------


def test_a_summary_reads_back_as_written_and_old_ones_still_read(tmp_path):
    summary = RunSummary(
        status=Status.diverged, steps_done=4, final_train_loss=math.nan, grad_scale_range=[1, 1]
    )
    (tmp_path / "summary.json").write_text(json.dumps(json_ready(summary.to_dict())))
    back = read_summary(tmp_path)
    assert back.status is Status.diverged and back.steps_done == 4
    assert math.isnan(back.final_train_loss)  # written as null, flagged, restored
    assert json.loads((tmp_path / "summary.json").read_text())["final_train_loss"] is None
    # a summary of an earlier version: a failure's few keys, and a key unknown here
    (tmp_path / "summary.json").write_text('{"status": "failed", "error": "x", "old": 1}')
    assert read_summary(tmp_path) == RunSummary(status=Status.failed, error="x")
    assert [s.value for s in FINISHED] == ["completed", "diverged"]


@pytest.mark.parametrize(
    "content, named",
    [
        ({"status": ["completed"]}, "status"),
        ({"status": "done"}, "status"),
        ({"error": "no status"}, "status"),
        ({"status": "completed", "grad_scale_range": 3}, "grad_scale_range"),
        ({"status": "completed", "steps_done": "4"}, "steps_done"),
        ({"status": "completed", "grad_scale_exact": 1}, "grad_scale_exact"),
        ({"status": "completed", "nonfinite": {"final_eval_loss": "x"}}, "nonfinite"),
    ],
)
def test_a_hostile_summary_is_a_value_error_naming_the_field(tmp_path, content, named):
    (tmp_path / "summary.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=named):
        read_summary(tmp_path)


def test_the_printed_summary_of_a_nan_result_read_back_from_disk(tmp_path):
    nan = float("nan")
    summary = RunSummary(
        status=Status.diverged,
        diverged_at_step=2,
        diverged_why="a NaN or inf in a rank's loss",
        steps_done=1,
        wall_time_s=1.0,
        grad_scale=1.0,
        grad_scale_range=[math.inf, -math.inf],  # no step measured c
        grad_scale_exact=True,
        final_train_loss=nan,
        final_eval_loss=nan,
        final_eval_accuracy=0.1,
    )
    (tmp_path / "summary.json").write_text(json.dumps(json_ready(summary.to_dict())))
    text = format_summary(read_summary(tmp_path))
    assert "diverged at step 2" in text and "train loss nan" in text
    assert "accuracy 0.1000" in text


def test_a_diverged_run_with_a_nan_final_loss_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = ddp_reduce(*FAST, "optim.lr=1e30", "dist.nproc=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ddp-reduce: diverged at step" in proc.stdout
    summary = read_summary(run)
    assert summary.status is Status.diverged and not math.isfinite(summary.final_train_loss)


# --- signals: a closed terminal ends a run as Ctrl-C does ----------------------------------------


@pytest.mark.parametrize(
    "signum, group, code",
    [(signal.SIGHUP, True, 128 + signal.SIGHUP), (signal.SIGINT, False, 130)],
    ids=["sighup-to-the-group", "sigint-to-the-launcher"],
)
def test_a_closed_terminal_or_sigint_to_the_launcher_records_interrupted(
    tmp_path, signum, group, code
):
    run = tmp_path / "run"

    def as_from_a_terminal():  # whatever the test runner ignores, a terminal's job does not
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        # the launcher alone: started as a script's background job is, with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL if group else signal.SIG_IGN)

    proc = subprocess.Popen(
        [str(VENV_BIN / "ddp-reduce"), *LONG, f"hydra.run.dir={run}"],
        cwd=REPO,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        _wait_training(run, proc)
        ranks = _ranks(proc.pid)
        if group:
            os.killpg(proc.pid, signum)  # a closed terminal: every process of the session
        else:
            os.kill(proc.pid, signum)  # the launcher alone
        _, err = proc.communicate(timeout=120)
    finally:  # a launcher that did not stop is not left running
        _kill_group(proc)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    summary = read_summary(run)
    assert summary.status is Status.interrupted, summary
    assert not [r for r in ranks if _running(r)]


# --- a rank's own error --------------------------------------------------------------------------


def test_one_rank_raising_is_recorded_as_that_ranks_error(tmp_path):
    run = tmp_path / "run"
    proc = ddp_reduce(
        *FAST,
        "dist.nproc=2",
        "+loss._target_=tests.fault_targets.RaisesOnRank1",
        f"hydra.run.dir={run}",
        env=USER,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = read_summary(run)
    assert summary.status is Status.failed and summary.failed_rank == 1, summary
    assert "a loss of yours that fails on rank 1" in summary.error, summary.error
    assert "fault_targets.py" in summary.traceback  # that rank's traceback, not rank 0's
    assert "rank 1 failed" in proc.stderr and "SIGTERM" not in summary.error


# --- your own data and loss ----------------------------------------------------------------------


def test_training_sets_of_different_lengths_per_rank_are_refused(tmp_path):
    run = tmp_path / "run"
    proc = ddp_reduce(
        *FAST,
        "dist.nproc=2",
        "+model._target_=userpkg.nets.Classifier",
        "+data._target_=tests.fault_targets.uneven_splits",
        f"hydra.run.dir={run}",
        env=USER,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("rank 0: 256 and 64, rank 1: 257 and 64") == 1, proc.stderr
    summary = read_summary(run)
    assert summary.status is Status.failed and "data._target_" in summary.error


@pytest.mark.parametrize(
    "overrides, shown",
    [
        (["+loss.factor=-1"], "-2.0"),  # a negative count (of a batch of two)
        (["+loss.factor=0"], "0.0"),
        (["+loss.offset=0.5"], "2.5"),  # not a whole number: never truncated
    ],
)
def test_a_loss_count_that_is_no_positive_whole_number_is_refused(monkeypatch, overrides, shown):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    cfg = config(
        "+model._target_=userpkg.nets.Classifier",
        "+data._target_=userpkg.data.make_splits",
        "+loss._target_=tests.fault_targets.CountedLoss",
        *overrides,
    )
    with pytest.raises(ConfigError) as err:
        prepare(cfg, 1)
    assert err.value.key == "loss._target_"
    assert f"gave {shown} items" in str(err.value) and "positive whole number" in str(err.value)


# --- numbers out of range ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.precision=fp16", "train.loss_scale_init=1e-45"], "train.loss_scale_init"),
        (["train.precision=fp16", "train.loss_scale_init=1e308"], "train.loss_scale_init"),
        ([f"train.steps={10**23}"], "train.steps"),
        (["model.hidden=[]"], "model.hidden"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert err.value.key == key


def test_the_smallest_loss_scale_allowed_gives_finite_weights(tmp_path):
    from ddp_reduce.config import LOSS_SCALE_BOUNDS
    from ddp_reduce.run.launch import rank_main

    low, _ = LOSS_SCALE_BOUNDS
    cfg = config(*FAST, "dist.nproc=1", "train.precision=fp16", f"train.loss_scale_init={low!r}")
    summary = rank_main(cfg, str(tmp_path / "run"))
    assert summary.status is Status.completed and math.isfinite(summary.final_train_loss)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddp_reduce.cli", *args], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize(
    "flag, value",
    [("--world-size", str(10**20)), ("--to-world-size", str(10**400))],
)
def test_convert_refuses_world_sizes_beyond_torchs_bound(flag, value):
    base = {"--from": "sum/sum", "--to": "mean/mean", "--world-size": "2", "--batch-size": "16",
            "--optim": "sgd", "--lr": "0.1"}  # fmt: skip
    base[flag] = value
    proc = _cli("convert", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert flag in proc.stderr and "at most 2147483647" in proc.stderr


def test_study_refuses_a_file_as_out_and_an_unknown_key_before_running(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("mine")
    proc = _cli("study", "equivalence", "--quick", "--out", str(afile))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--out" in proc.stderr and afile.read_text() == "mine"
    out = tmp_path / "out"
    proc = _cli("study", "equivalence", "--quick", "--out", str(out), "nosuch.key=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "nosuch" in proc.stderr and not (out / "runs").exists()
