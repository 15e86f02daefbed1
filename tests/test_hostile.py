"""Hostile checkpoints, run folders and targets: nothing they hold runs, nothing outside the
run is written through them, and each ends in a clear error or a fallback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ddp_reduce.run import checkpoint, rundir
from tests.helpers import VENV_BIN, ddp_reduce, run_cli


def _rewrite_digest(run: Path, name: str) -> None:
    """Recompute the manifest's digest of checkpoint ``name`` as an attacker would."""
    manifest_path = run / "checkpoints" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["checkpoints"]:
        if entry["file"] == name:
            entry["sha256"] = checkpoint._digest(run / "checkpoints" / name)
    manifest_path.write_text(json.dumps(manifest))


class _Payload:
    """Unpickled, it creates the file ``marker`` (what a real payload would do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _unfinish(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))


def test_a_pickle_payload_in_a_sharded_checkpoint_index_is_never_run(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    common = ("dist.strategy=fsdp", "train.eval_every=0", "train.checkpoint_every=5")
    first = ddp_reduce(
        *common, "train.steps=10", "train.keep_checkpoints=2", f"hydra.run.dir={run}"
    )
    assert first.returncode == 0, first.stderr[-2000:]
    newest = "step_00000010.dcp"
    (run / "checkpoints" / newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_digest(run, newest)
    _unfinish(run)
    proc = ddp_reduce(*common, "train.steps=15", f"hydra.run.dir={run}")
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{newest}: .metadata is not a checkpoint index" in proc.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 5


def test_the_restricted_reader_reads_what_the_library_writes(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ddp_reduce.run.dcp_metadata import SafeReader

    state = {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    }
    dcp.save(state, checkpoint_id=tmp_path / "x.dcp", no_dist=True)
    into = {"model": {"w": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}}
    dcp.load(into, storage_reader=SafeReader(tmp_path / "x.dcp"), no_dist=True)
    assert torch.equal(into["model"]["w"], state["model"]["w"])
    assert torch.equal(into["model"]["b"], state["model"]["b"])


def test_a_checkpoint_holding_a_list_falls_back_to_the_previous_one(tmp_path):
    state = {"step": 10, "config": {}, "global_batch_size": 64, "model": {}}
    checkpoint.save(tmp_path, state, keep=2)
    checkpoint.save(tmp_path, {**state, "step": 20}, keep=2)
    newest = tmp_path / "checkpoints" / "step_00000020.pt"
    torch.save([1, 2, 3], newest)
    _rewrite_digest(tmp_path, newest.name)
    found = checkpoint.load_latest(tmp_path)
    assert found is not None and found.state["step"] == 10
    assert "holds a list" in found.skipped[0]


# -- symbolic links planted in a run folder -------------------------------------------------

QUICK = ("train.eval_every=0", "train.log_every=1", "dist.nproc=1")


def _plant(run: Path, victims: Path) -> dict[Path, bytes]:
    """Links in place of the files and folders a run writes; returns each victim's bytes."""
    run.mkdir(parents=True, exist_ok=True)
    victims.mkdir(exist_ok=True)
    planted = {}
    for name in ("metrics.jsonl", ".lock", "config.yaml", "model.pt"):
        victim = victims / f"victim-{name}"
        victim.write_bytes(b"precious\n")
        (run / name).symlink_to(victim)
        planted[victim] = victim.read_bytes()
    (victims / "dir-tb").mkdir()
    (run / "tb").symlink_to(victims / "dir-tb")
    return planted


def _untouched(planted: dict[Path, bytes], victims: Path) -> None:
    for victim, content in planted.items():
        assert victim.read_bytes() == content, f"{victim.name} was written through a link"
    assert not any((victims / "dir-tb").iterdir()), "tb/ was written through"


def test_a_run_never_writes_through_links_planted_in_its_folder(tmp_path):
    run, victims = tmp_path / "run", tmp_path / "victims"
    planted = _plant(run, victims)
    proc = ddp_reduce(*QUICK, "train.steps=6", "train.checkpoint_every=3", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _untouched(planted, victims)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / "metrics.jsonl").is_file() and not (run / "metrics.jsonl").is_symlink()
    # a resume rewrites metrics.jsonl (the lines up to its step): a link there is not followed
    _unfinish(run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victims / "victim-metrics.jsonl")
    proc = ddp_reduce(*QUICK, "train.steps=9", "train.checkpoint_every=3", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 6
    _untouched(planted, victims)


def test_checkpoints_are_never_read_or_written_through_a_linked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    checkpoint.save(elsewhere, {"step": 10, "config": {}, "global_batch_size": 64}, keep=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere / "checkpoints")
    with pytest.raises(checkpoint.CheckpointError, match="is a symbolic link"):
        checkpoint.load_latest(run)
    before = sorted(p.name for p in (elsewhere / "checkpoints").iterdir())
    checkpoint.save(run, {"step": 20, "config": {}, "global_batch_size": 64}, keep=1)
    assert sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == before
    assert (run / "checkpoints" / "step_00000020.pt").is_file()


def test_a_summary_that_is_a_link_is_refused_and_never_written(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.write_text("precious\n")
    (run / "summary.json").symlink_to(victim)
    proc = ddp_reduce(*QUICK, "train.steps=2", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "summary.json is a symbolic link" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert victim.read_text() == "precious\n"


def test_a_report_never_writes_through_links(tmp_path):
    run, victims = tmp_path / "run", tmp_path / "victims"
    proc = ddp_reduce(*QUICK, "train.steps=3", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    victims.mkdir()
    planted = {}
    for name in ("report.md", "runs.csv", "loss_curves.png"):
        victim = victims / name
        victim.write_bytes(b"precious\n")
        (run / name).symlink_to(victim)
        planted[victim] = victim.read_bytes()
    report = run_cli(str(VENV_BIN / "ddp-reduce"), "report", str(run))
    assert report.returncode == 0, report.stderr
    for victim, content in planted.items():
        assert victim.read_bytes() == content
    assert "## All runs" in (run / "report.md").read_text()


def test_refused_points_are_never_appended_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "refused.jsonl").symlink_to(victim)
    rundir.record_refused(tmp_path / "sweep", "0_x", ["x=1"], "bad")
    assert victim.read_text() == "precious\n"
    assert rundir.read_refused(tmp_path / "sweep") == [{"point": "0_x", "error": "bad"}]


# -- report on hostile folders --------------------------------------------------------------


def _sweep_of_hostile_runs(sweep: Path, good: dict) -> list[str]:
    """A sweep folder of one sound run and one hostile run per way a folder can be broken;
    returns the hostile runs' names."""
    import os

    def point(name: str, summary: bytes | None = None, overrides: str = "- x=1\n") -> Path:
        run = sweep / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(overrides)
        if summary is not None:
            (run / "summary.json").write_bytes(summary)
        return run

    point("0_good", json.dumps(good).encode())
    point("1_status_list", json.dumps({**good, "status": ["completed"]}).encode())
    point("2_range_int", json.dumps({**good, "grad_scale_range": 3}).encode())
    point("3_nested", b"[" * 100_000 + b"]" * 100_000)
    point("4_overrides_scalar", json.dumps(good).encode(), overrides="7\n")
    point("5_overrides_nested", json.dumps(good).encode(), overrides="- [a, [b]]\n")
    os.mkfifo(point("6_fifo") / "summary.json")
    (point("7_zero") / "summary.json").symlink_to("/dev/zero")
    bad_metrics = point("8_metrics", json.dumps(good).encode())
    (bad_metrics / "metrics.jsonl").write_bytes(b'{"step": 1, "train/loss": 1.5}\n\xff\xfe\n')
    return ["1_", "2_", "3_", "4_", "5_", "6_", "7_"]


def test_report_on_hostile_folders_names_each_unreadable_run_in_one_line(tmp_path):
    good = {
        "status": "completed",
        "reduce_loss": "mean",
        "reduce_op": "mean",
        "world_size": 2,
        "global_batch_size": 64,
        "grad_scale": 1,
        "grad_scale_range": [1, 1],
        "grad_scale_exact": True,
        "final_train_loss": 0.5,
    }
    sweep = tmp_path / "sweep"
    hostile = _sweep_of_hostile_runs(sweep, good)
    proc = run_cli(str(VENV_BIN / "ddp-reduce"), "report", str(sweep), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddp-reduce: error")]
    assert len(errors) == len(hostile), proc.stderr
    text = (sweep / "report.md").read_text()
    assert "9 runs: 2 completed, 7 unreadable" in text, text
    assert "line 2 is not a whole record" in proc.stderr  # the non-UTF-8 metrics line


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"study": "../../x"}', b"\xff"])
def test_report_on_a_broken_study_record_reports_the_runs_as_a_plain_set(tmp_path, content, capsys):
    from ddp_reduce.analysis import report

    run = tmp_path / "study" / "r"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "study" / "study.json").write_bytes(content)
    assert report.main([str(tmp_path / "study")]) == 1
    assert "study.json" in capsys.readouterr().err
    assert "reported as a plain set" in (tmp_path / "study" / "report.md").read_text()


def test_the_run_table_marks_a_c_that_is_not_exact():
    from ddp_reduce.analysis.report import _measured_c

    ragged = {"grad_scale": 1, "grad_scale_range": [1, 1], "grad_scale_exact": False}
    assert _measured_c(ragged) == "1 (not exact)"
    assert _measured_c({**ragged, "grad_scale_exact": True}) == 1


# -- _target_: a config file is code; what can be checked is checked before any call ----------


@pytest.mark.parametrize(
    "key,target,kwargs",
    [
        ("model", "builtins.open", {"file": "{victim}", "mode": "w"}),
        ("data", "shutil.copyfile", {"src": "{other}", "dst": "{victim}"}),
        ("model", "os.mkdir", {"path": "{victim}.d"}),
        ("model", "torch.nn.Linear", {"in_features": {"_target_": "os.remove", "path": "{v}"}}),
        ("model", "userpkg.data.Blobs", {"n": 0}),  # a class, not an nn.Module
    ],
    ids=["builtins.open", "shutil.copyfile", "os.mkdir", "nested", "not-a-module-class"],
)
def test_a_target_is_refused_before_it_is_called(tmp_path, monkeypatch, key, target, kwargs):
    import torch.nn as nn

    from ddp_reduce.config import ConfigError
    from ddp_reduce.targets import build
    from tests.helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    victim, other = tmp_path / "victim", tmp_path / "other"
    victim.write_text("precious\n")
    other.write_text("overwritten\n")
    text = json.dumps(kwargs).replace("{v}", "{victim}").replace("{victim}", str(victim))
    filled = json.loads(text.replace("{other}", str(other)))
    with pytest.raises(ConfigError) as refused:
        build(key, target, filled, "an nn.Module", kind=nn.Module)
    assert str(refused.value).startswith(key) and "._target_=" in str(refused.value)
    assert victim.read_text() == "precious\n" and not (tmp_path / "victim.d").exists()


def test_a_target_module_that_exits_at_import_is_refused_not_a_success(tmp_path):
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit(0)\n")
    run = tmp_path / "run"
    proc = ddp_reduce(
        "+model._target_=quitter.Net", "+data._target_=quitter.make_splits",
        f"hydra.run.dir={run}", env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "called sys.exit(0)" in proc.stderr and "Traceback" not in proc.stderr


# -- sweeps: bad data patterns, and one sweep folder per sweep ---------------------------------


def test_bad_text_patterns_are_refused_points_and_a_second_sweep_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    proc = ddp_reduce(
        "--multirun", "data=text", "model=seq", "data.pattern=/etc/*.conf,''",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "2 points: 0 completed, 0 diverged, 0 failed, 2 refused" in proc.stdout
    refused = rundir.read_refused(sweep)
    assert len(refused) == 2 and all("data.pattern" in r["error"] for r in refused), refused
    record = (sweep / "multirun.yaml").read_bytes()
    # another sweep into the same folder: refused before Hydra rewrites the first one's record
    again = ddp_reduce("--multirun", "optim.lr=0.1,0.2", f"hydra.sweep.dir={sweep}")
    assert again.returncode == 2, again.stdout + again.stderr
    assert "hydra.sweep.dir" in again.stderr and "data.pattern" in again.stderr
    assert (sweep / "multirun.yaml").read_bytes() == record
    assert len(rundir.read_refused(sweep)) == 2
    # the same sweep again is let through (its points are refused or resumed one by one)
    rundir.check_sweep_dir(str(sweep), ["data=text", "model=seq", "data.pattern=/etc/*.conf,''"])


def test_text_data_refuses_a_bad_pattern_naming_the_key(tmp_path):
    from ddp_reduce.config import ConfigError, DataConfig
    from ddp_reduce.data import text_documents

    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    for pattern in ("/etc/*.conf", "", "../*.txt"):
        with pytest.raises(ConfigError) as err:
            text_documents(DataConfig(name="text", root=str(tmp_path), pattern=pattern))
        assert err.value.key == "data.pattern"


def test_text_data_refuses_an_unreadable_file_naming_the_key(tmp_path):
    import os

    from ddp_reduce.config import ConfigError, DataConfig
    from ddp_reduce.data import text_documents

    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000: an unreadable file cannot be made here")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "a.txt").chmod(0)
    with pytest.raises(ConfigError) as err:
        text_documents(DataConfig(name="text", root=str(tmp_path), pattern="*.txt"))
    assert err.value.key == "data.root" and "a.txt" in str(err.value)


def test_a_plus_on_a_key_the_config_has_says_what_to_write(tmp_path):
    proc = ddp_reduce("+data.n_train=512", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.n_train=512" in proc.stderr and "+data.kwargs.n_train=512" in proc.stderr


# -- a full disk: the run's status is left, no half-written checkpoint ------------------------


def _file_size_limit(limit: int):
    """For a child process: files over ``limit`` bytes cannot be written (EFBIG; Python
    ignores SIGXFSZ), as on a disk that fills up while a large file is written."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _run_limited(limit: int, *overrides: str):
    import subprocess

    from tests.helpers import REPO, project_env

    return subprocess.run(
        [str(VENV_BIN / "ddp-reduce"), *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=project_env(),
        preexec_fn=_file_size_limit(limit),
    )  # fmt: skip


def test_a_sharded_checkpoint_on_a_full_disk_leaves_a_status_and_no_temporary(tmp_path):
    run = tmp_path / "run"
    proc = _run_limited(
        100_000, "dist.strategy=fsdp", "model.hidden=[512]", "train.steps=4",
        "train.checkpoint_every=2", "train.eval_every=0", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "CheckpointException" in summary["error"], summary
    assert not list((run / "checkpoints").glob(".step_*")), list((run / "checkpoints").iterdir())


def test_metrics_on_a_full_disk_leave_a_status(tmp_path):
    run = tmp_path / "run"
    proc = _run_limited(
        30_000, "dist.nproc=1", "train.steps=400", "train.log_every=1", "train.eval_every=0",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    # one line of the run's own (TensorBoard's writer thread may print its own traceback)
    assert "ddp-reduce: error: [Errno 27] File too large" in proc.stderr, proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr, proc.stderr[-3000:]  # Hydra's traceback
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"], summary


# -- what the README says is what happens --------------------------------------------------


@pytest.mark.parametrize(
    "src,dst,caveat", [("torchtitan", "mean/mean", True), ("mean/mean", "sum/sum", False)]
)
def test_convert_from_an_exact_convention_to_a_mean_of_means_says_so(capsys, src, dst, caveat):
    from ddp_reduce.analysis import convert

    argv = ["--from", src, "--to", dst, "--world-size", "2", "--batch-size", "8", "--accum", "1"]
    assert convert.main([*argv, "--optim", "sgd", "--lr", "0.1"]) == 0
    out = capsys.readouterr().out
    assert ("note: the verdicts assume equal item counts" in out) is caveat, out


def test_the_makefile_installs_the_torch_the_readme_names():
    import subprocess

    from tests.helpers import REPO

    readme = (REPO / "README.md").read_text()
    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"make setup TORCH_INDEX={cpu}" in readme
    dry = subprocess.run(
        ["make", "-n", "setup", "VENV=/nonexistent/venv", f"TORCH_INDEX={cpu}"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    assert f'--index-url {cpu} "torch==2.13.0"' in dry.stdout, dry.stdout
