"""Checkpoints: atomic, verified, resumed bitwise; corrupt ones are never trusted."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ddp_reduce.run import checkpoint
from ddp_reduce.run.launch import rank_main
from tests.helpers import config, torchrun

RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _state(step: int, **config) -> dict:
    return {
        "step": step,
        "config": {"model": {"hidden": [64]}, **config},
        "global_batch_size": 64,
        "model": {"w": torch.full((3,), float(step))},
    }


def test_newest_valid_checkpoint_is_loaded_and_old_ones_pruned(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, _state(step), keep=2)
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert files == ["step_00000020.pt", "step_00000030.pt"]
    found = checkpoint.load_latest(tmp_path)
    assert found.state["step"] == 30 and torch.equal(
        found.state["model"]["w"], torch.full((3,), 30.0)
    )


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    for step in (10, 20):
        checkpoint.save(tmp_path, _state(step), keep=2)
    newest = tmp_path / "checkpoints" / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    found = checkpoint.load_latest(tmp_path)
    assert found.state["step"] == 10
    assert "step_00000020.pt does not match its SHA-256" in capsys.readouterr().err


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    checkpoint.save(tmp_path, _state(10), keep=2)
    path = tmp_path / "checkpoints" / "step_00000010.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="refusing to start over from step 0"):
        checkpoint.load_latest(tmp_path)


def test_checkpoint_files_without_manifest_are_refused(tmp_path):
    checkpoint.save(tmp_path, _state(10), keep=2)
    (tmp_path / "checkpoints" / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no manifest.json"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path / "empty") is None


def test_checkpoint_of_another_config_is_refused_naming_the_difference():
    state = _state(10)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"model.hidden=\[64\] in the checkpoint, \[128\] now"
    ):
        checkpoint.check_compatible(state, {"model": {"hidden": [128]}}, 64)
    with pytest.raises(
        checkpoint.CheckpointError, match="global batch N=64 in the checkpoint, 32 now"
    ):
        checkpoint.check_compatible(state, {"model": {"hidden": [64]}}, 32)
    # how the run is spread may change
    checkpoint.check_compatible(state, {"model": {"hidden": [64]}, "dist": {"nproc": 4}}, 64)


def test_a_checkpoint_older_than_a_key_is_compared_with_the_behaviour_it_had():
    """noise.steps came after checkpoints without it, which fed the estimate every step."""
    state = _state(10)
    assert "noise" not in state["config"]
    now = {"model": {"hidden": [64]}, "noise": {"steps": "every"}}
    checkpoint.check_compatible(state, now, 64)
    now["noise"]["steps"] = "logged"
    with pytest.raises(
        checkpoint.CheckpointError, match="noise.steps='every' in the checkpoint, 'logged' now"
    ):
        checkpoint.check_compatible(state, now, 64)


BASE = ("train.steps=30", "train.eval_every=0", "train.log_every=5")


def _weights(run):
    return torch.load(run / "model.pt")


def test_resume_after_a_truncated_checkpoint_in_one_process(tmp_path):
    """A stopped run resumes from the previous valid checkpoint and ends where an uninterrupted
    run ends, bitwise."""
    ref = tmp_path / "ref"
    rank_main(config(*BASE, "dist.nproc=1"), str(ref))
    run = tmp_path / "run"
    rank_main(config(*BASE, "train.steps=20", "train.checkpoint_every=5"), str(run))
    newest = run / "checkpoints" / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:-10])  # a truncated write
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    summary = rank_main(config(*BASE, "train.checkpoint_every=5"), str(run))
    assert summary.resumed_from_step == 15
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(20) == 1  # the lost attempt's lines dropped


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run = tmp_path / "run"
    rank_main(config(*BASE, "train.steps=10", "train.checkpoint_every=5"), str(run))
    (run / "summary.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="model.hidden"):
        rank_main(config(*BASE, "train.checkpoint_every=5", "model.hidden=[32]"), str(run))


def test_crash_and_torchrun_restart_give_bitwise_equal_weights(tmp_path):
    common = ("train.steps=60", "train.log_every=10", "train.eval_every=0")
    ref = torchrun(2, *common, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    crash = torchrun(
        2,
        *common,
        "train.checkpoint_every=10",
        "fault.crash_at_step=37",
        "fault.crash_rank=1",
        f"hydra.run.dir={tmp_path / 'crash'}",
        extra_args=("--max-restarts=1",),
        env=RESTART_ENV,
    )
    assert crash.returncode == 0, crash.stderr[-3000:]
    assert "killing rank 1 at step 37" in crash.stdout
    assert "resuming from" in crash.stderr and "step_00000030.pt" in crash.stderr
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert (summary["status"], summary["resumed_from_step"], summary["steps_done"]) == (
        "completed",
        30,
        60,
    )
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "crash")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lost_rank_without_restarts_ends_the_run_nonzero_and_named(tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = torchrun(
        2,
        *BASE,
        "fault.crash_at_step=5",
        "fault.crash_rank=1",
        "dist.timeout_s=60",
        f"hydra.run.dir={run}",
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60
    assert "rank      : 1" in proc.stderr  # torchrun's root cause names the lost rank
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert not (run / "model.pt").exists()


def test_a_rank_stopped_by_sigterm_records_a_failed_run(tmp_path):
    """What torchrun does to the surviving ranks when one dies: the run says it failed."""
    import signal
    import subprocess
    import sys

    from tests.helpers import REPO, project_env

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ddp_reduce.train",
            "train.steps=1000000",
            "train.log_every=1",
            "train.eval_every=0",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.2)  # polls for the run to have started; the signal is what is tested
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "SIGTERM" in summary["error"]
    assert not (run / "model.pt").exists()
