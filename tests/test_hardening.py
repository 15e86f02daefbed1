"""What must not happen to a run people trust with days of training: files outside the run
touched, ports open to the network, faults that lose a status or a result, bad values that
get a traceback. Every test here fails without the behaviour it names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ddp_reduce.config import DistConfig
from ddp_reduce.run import checkpoint, launch
from ddp_reduce.run.launch import rank_main
from ddp_reduce.run.pool import RankPool
from ddp_reduce.run.rank_server import TEMP_DIR_MAX
from ddp_reduce.run.rundir import json_ready
from tests.helpers import REPO, VENV_BIN, config, ddp_reduce, project_env, run_cli

LONG = ("train.steps=1000000", "train.log_every=1", "train.eval_every=0", "dist.threads_per_rank=1")


def _state(step: int) -> dict:
    return {
        "step": step,
        "config": {},
        "global_batch_size": 64,
        "model": {"w": torch.full((3,), float(step))},
    }


def _manifest(run: Path) -> Path:
    return run / "checkpoints" / "manifest.json"


# -- files outside the run ------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["absolute", "parent"])
def test_a_manifest_pointing_outside_the_run_deletes_and_reads_nothing(tmp_path, outside):
    run = tmp_path / "run"
    checkpoint.save(run, _state(10), keep=1)
    # a valid checkpoint outside the run, with its true digest: the old code would load it,
    # and delete it as "stale" at the next save
    victim = tmp_path / "victim.pt"
    torch.save({"format": checkpoint.FORMAT, **_state(20)}, victim)
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    name = str(victim) if outside == "absolute" else "../../victim.pt"
    manifest = json.loads(_manifest(run).read_text())
    manifest["checkpoints"].append({"file": name, "step": 20, "sha256": digest})
    _manifest(run).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load_latest(run)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.save(run, _state(30), keep=1)
    assert victim.exists() and hashlib.sha256(victim.read_bytes()).hexdigest() == digest
    assert not (run / "checkpoints" / "step_00000030.pt").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_run_resuming_from_a_hostile_manifest_says_so_in_one_line(tmp_path, nproc):
    run = tmp_path / "run"
    first = ddp_reduce(
        "train.steps=10", "train.checkpoint_every=5", "train.eval_every=0", f"dist.nproc={nproc}",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads(_manifest(run).read_text())
    manifest["checkpoints"][0]["file"] = "../../../etc/passwd"
    _manifest(run).write_text(json.dumps(manifest))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    proc = ddp_reduce(
        "train.steps=20", "train.checkpoint_every=5", "train.eval_every=0", f"dist.nproc={nproc}",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("manifest.json is corrupt") == 1, proc.stderr
    recorded = json.loads((run / "summary.json").read_text())
    assert recorded["status"] == "failed" and "manifest.json is corrupt" in recorded["error"]
    assert "above" not in recorded["error"]  # the record stands alone


@pytest.mark.parametrize(
    "entries",
    [
        [{"file": "step_00000010.pt", "step": 10}],
        [{"file": "step_00000010.pt", "step": "10", "sha256": "0" * 64}],
        [{"file": "step_00000010.pt", "step": 11, "sha256": "0" * 64}],
        [{"file": 7, "step": 10, "sha256": "0" * 64}],
        ["step_00000010.pt"],
        {"file": "step_00000010.pt"},
    ],
    ids=["no-digest", "step-string", "step-mismatch", "file-int", "not-a-dict", "not-a-list"],
)
def test_malformed_manifest_entries_are_a_checkpoint_error(tmp_path, entries):
    checkpoint.save(tmp_path, _state(10), keep=1)
    _manifest(tmp_path).write_text(json.dumps({"checkpoints": entries}))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load_latest(tmp_path)


def test_stale_temporary_checkpoints_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / ".step_00000005.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = folder / "notes.txt"
    mine.write_text("not the run's to delete")
    checkpoint.save(tmp_path, _state(10), keep=1)
    assert not stale.exists() and mine.exists()


# -- the network ----------------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening(pid: int) -> list[str]:
    """The addresses this process listens on (TCP, IPv4 and IPv6), as hex from /proc."""
    inodes, found = _socket_inodes(pid), []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A: LISTEN
                found.append(fields[1])
    return found


def _is_loopback(address: str) -> bool:
    host = address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian hex: 127.x.x.x
        return host.endswith("7F")
    return host == "00000000000000000000000001000000"  # ::1


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            children = (task / "children").read_text().split()
            todo += [int(c) for c in children]
    return out


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ranks(pid: int) -> list[int]:
    """The rank processes under a launcher, in rank order (they are started in it): forked
    from its forkserver, whose command line they share."""
    tree = _tree(pid)
    forked = [p for p in tree if b"forkserver" in _cmdline(p)]
    return sorted(p for p in forked if _parent(p) in forked)


def _default_signals() -> None:
    """In the child before it runs: the signals a terminal's job reacts to, whatever the test
    runner's own process ignores (a runner's worker may ignore SIGHUP or SIGINT)."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``ddp-reduce ARGS`` as a terminal's job: its own process group, default signals."""
    return subprocess.Popen(
        [str(VENV_BIN / "ddp-reduce"), *args],
        cwd=REPO,
        env=project_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_signals,
    )


def _start(run: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    return _popen(*LONG, *overrides, f"hydra.run.dir={run}", env=env)


def _kill_group(proc: subprocess.Popen) -> None:
    """A run of LONG that a failed test left running is killed, not left to train for hours."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_training(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Polls until the ranks are past their first steps (the event under test comes after)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.stat().st_size > 200:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the run did not start training")


def test_a_one_machine_run_listens_on_loopback_only(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    try:
        _wait_training(run, proc)
        pids = _tree(proc.pid)
        assert len(_ranks(proc.pid)) == 2
        open_ = {pid: _listening(pid) for pid in pids}
        assert any(open_.values()), "the ranks' gloo sockets should be seen"
        wide = {pid: a for pid, addrs in open_.items() for a in addrs if not _is_loopback(a)}
        assert not wide, f"listening beyond loopback: {wide}"
    finally:
        _kill_group(proc)


def _all_reduce_ones(ctx) -> tuple[float, str | None]:
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    return t.item(), os.environ.get("GLOO_SOCKET_IFNAME")


def test_the_rank_pools_ranks_listen_on_loopback_only(monkeypatch):
    # the pool that sweeps and studies use forks its ranks as the launcher does; gloo would
    # otherwise bind the address the host name resolves to (loopback on some machines, this
    # one included: hence the interface the ranks were given is checked too)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    pool = RankPool(DistConfig(threads_per_rank=1), 2)
    try:
        assert pool.call(_all_reduce_ones) == [(2.0, "lo"), (2.0, "lo")]
        open_ = {p.pid: _listening(p.pid) for p in pool._procs}
        assert all(open_.values()), f"the ranks' gloo sockets should be seen: {open_}"
        wide = {pid: a for pid, addrs in open_.items() for a in addrs if not _is_loopback(a)}
        assert not wide, f"listening beyond loopback: {wide}"
    finally:
        pool.close()


# -- faults: every one leaves a status, none loses a result ---------------------------------


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _start(run)
    try:
        _wait_training(run, first)
        second = ddp_reduce("train.steps=5", "seed=1", f"hydra.run.dir={run}")
        assert second.returncode == 2, second.stderr
        assert f"process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
    assert "seed: 0" in (run / "config.yaml").read_text()  # the holder's, untouched
    # the holder is gone (its lock with it): the directory can be used again
    again = ddp_reduce("train.steps=5", "train.eval_every=0", f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path, hung):
    run = tmp_path / "run"
    proc = _start(run, "dist.timeout_s=5")
    try:
        _wait_training(run, proc)
        ranks = _ranks(proc.pid)
        os.kill(ranks[hung], signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        _kill_group(proc)
    assert proc.returncode == 1
    assert elapsed < 5 + 15, elapsed  # the timeout plus a small margin
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["hung_ranks"] == [hung]
    assert f"rank {hung} hung" in summary["error"] and f"rank {hung} hung" in err
    assert "Traceback" not in err  # the survivor's timeout is said in one line
    assert not (run / "model.pt").exists()


def test_ctrl_c_records_interrupted(tmp_path):
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    proc = _start(run, env={"TMPDIR": str(tmp)})
    try:
        _wait_training(run, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends every process of the job
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in err
    assert not _temporaries(tmp)  # the ranks' store and the forkserver's folder are gone


def test_sigterm_to_the_launcher_stops_the_ranks_and_cleans_up(tmp_path):
    """kill PID, or a scheduler cancelling the job: the ranks record their status and the
    launcher leaves none of its temporary folders behind."""
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    proc = _start(run, env={"TMPDIR": str(tmp)})
    try:
        _wait_training(run, proc)
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2 and _temporaries(tmp)  # the store's folder exists while running
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "SIGTERM" in summary["error"]
    assert not (run / "model.pt").exists()
    assert not [r for r in ranks if _running(r)]
    assert not _temporaries(tmp)


def _temporaries(tmp: Path) -> list[str]:
    """The launcher's temporary folders (its ranks' store; multiprocessing's forkserver) in
    TMPDIR; torch's own compile cache (torchinductor_*) is torch's to keep."""
    return [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]


def test_ranks_die_with_a_killed_launcher(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_training(run, proc)
    ranks = _ranks(proc.pid)
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{r}").exists() for r in ranks):
        time.sleep(0.2)  # polls for the ranks to be gone; the signal is what is tested
    alive = [r for r in ranks if _running(r)]
    assert not alive


def _running(pid: int) -> bool:
    return launch._process_state(pid) not in (None, "Z")  # gone, or a zombie: not running


def test_a_sweep_goes_on_past_a_refused_point_and_says_so(tmp_path):
    proc = ddp_reduce(
        "--multirun",
        "optim.lr=0.1,-1,0.05",
        "train.steps=5",
        "train.eval_every=0",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 points: 2 completed, 0 diverged, 0 failed, 1 refused" in proc.stdout
    assert "optim.lr=-1" in proc.stderr and "Traceback" not in proc.stderr
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2
    # the sweep's report lists the refused point beside the two runs
    report = ddp_reduce("report", str(tmp_path / "sweep"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "2 runs: 2 completed; 1 more point refused before it ran" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1_optim.lr=-1"))
    assert "optim.lr=-1.0 is not allowed: a positive number" in row, row
    # a hostile or broken record is shown as such, one line, never trusted further
    with open(tmp_path / "sweep" / "refused.jsonl", "a") as f:
        f.write('[1, 2]\n{"point": "x\\n| y", "error": "a\\nb"}\n')
    assert ddp_reduce("report", str(tmp_path / "sweep")).returncode == 0
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "an unreadable line in refused.jsonl" in text and "| x \\| y | a b |" in text


def test_a_diverged_result_is_neither_rerun_nor_replaced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"status": "diverged", "diverged_at_step": 7, "note": "a result"}
    (run / "summary.json").write_text(json.dumps(summary))
    proc = ddp_reduce("train.steps=5", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "diverged" in proc.stderr and "overwrite" in proc.stderr
    assert json.loads((run / "summary.json").read_text()) == summary
    # a run that fails inside (here: a checkpoint of another config) keeps it too
    (run / "checkpoints").mkdir()
    checkpoint.save(run, {**_state(3), "config": {"model": {"hidden": [1]}}}, keep=1)
    with pytest.raises(checkpoint.CheckpointError):
        rank_main(config("train.steps=5", "train.checkpoint_every=5"), str(run))
    assert json.loads((run / "summary.json").read_text()) == summary


def test_a_half_written_metrics_line_does_not_block_a_resume(tmp_path, capfd):
    run = tmp_path / "run"
    base = ("train.eval_every=0", "train.log_every=5", "train.checkpoint_every=5", "dist.nproc=1")
    rank_main(config(*base, "train.steps=10"), str(run))
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # the process died mid-write
    summary = rank_main(config(*base, "train.steps=20"), str(run))
    assert summary.status == "completed" and summary.resumed_from_step == 10
    assert "not a whole record" in capfd.readouterr().err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 20 in steps


def test_a_checkpoint_past_the_planned_steps_is_refused(tmp_path):
    run = tmp_path / "run"
    base = ("train.eval_every=0", "train.checkpoint_every=10", "dist.nproc=1")
    rank_main(config(*base, "train.steps=20"), str(run))
    (run / "summary.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="past train.steps=10"):
        rank_main(config(*base, "train.steps=10"), str(run))


def _temp_dir_of_length(tmp_path: Path, length: int) -> Path:
    """A fresh folder whose path has exactly ``length`` characters (for TMPDIR)."""
    base = Path(tempfile.mkdtemp(prefix="t", dir="/tmp" if len(str(tmp_path)) > 40 else tmp_path))
    folder = base / ("p" * (length - len(str(base)) - 1))
    folder.mkdir()
    return folder


def test_a_run_leaves_no_launcher_folders_in_the_temp_dir(tmp_path):
    # this run's own temp dir, so other processes' do not count; as long as one may be
    private = _temp_dir_of_length(tmp_path, TEMP_DIR_MAX)
    try:
        proc = ddp_reduce(
            "train.steps=5",
            "train.eval_every=0",
            f"hydra.run.dir={tmp_path / 'r'}",
            env={"TMPDIR": str(private)},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not _temporaries(private)
    finally:
        shutil.rmtree(private.parent)


def test_a_temp_dir_too_long_for_the_ranks_socket_is_refused_before_the_run(tmp_path):
    too_long = _temp_dir_of_length(tmp_path, TEMP_DIR_MAX + 1)
    try:
        proc = ddp_reduce(
            "train.steps=5", f"hydra.run.dir={tmp_path / 'r'}", env={"TMPDIR": str(too_long)}
        )
    finally:
        shutil.rmtree(too_long.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"TMPDIR={too_long} is not allowed" in proc.stderr
    assert "at most 75 characters (76 given)" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_blow_up_without_nan_is_a_divergence(tmp_path):
    # just above the stability edge: the loss grows by orders of magnitude, still finite
    summary = rank_main(
        config(
            "data=linear",
            "model=linear",
            "optim.momentum=0",
            "optim.lr=2.2",
            "train.steps=200",
            "train.log_every=5",
            "train.eval_every=0",
            "dist.nproc=1",
        ),
        str(tmp_path / "run"),
    )
    assert summary.status == "diverged" and "blow-up" in summary.diverged_why
    assert summary.steps_done == summary.diverged_at_step - 1


def test_non_finite_numbers_are_null_and_flagged():
    out = json_ready({"loss": float("inf"), "nested": {"x": [1.0, float("nan")]}, "ok": 2.0})
    assert out["loss"] is None and out["nested"]["x"] == [1.0, None] and out["ok"] == 2.0
    assert out["nonfinite"] == {"loss": "inf", "nested.x[1]": "nan"}
    json.dumps(out, allow_nan=False)  # strict JSON


# -- bad values: refused with key, value and what is allowed; exit 2; no traceback ----------

BAD_VALUES = [
    (["+foo=1"], "foo"),
    (["+train.stepz=5"], "train.stepz"),
    (["seed=-1"], "seed"),
    ([f"seed={2**63}"], "seed"),
    (["dist.timeout_s=1e300"], "dist.timeout_s"),
    (["data.data_seed=-1"], "data.data_seed"),
    (["train.blowup_factor=0.5"], "train.blowup_factor"),
    (["fault.nan_rank=2", "fault.nan_at_step=3"], "fault.nan_rank"),
    (["hydra.run.dir="], "hydra.run.dir"),
    (["hydra.run.dir=/proc/1/not-here"], "hydra.run.dir"),
    ([f"hydra.run.dir=/tmp/{'x' * 300}"], "hydra.run.dir"),
    (["reduce.predivide=banana"], "reduce.predivide"),
    (["reduce.predivide=0"], "reduce.predivide"),
    (["model.hidden=abc"], "model.hidden"),
]


@pytest.mark.parametrize(
    "overrides,key", BAD_VALUES, ids=[b[1] + str(i) for i, b in enumerate(BAD_VALUES)]
)
def test_bad_values_are_refused_cleanly(tmp_path, overrides, key):
    run = (
        []
        if any(o.startswith("hydra.run.dir") for o in overrides)
        else [f"hydra.run.dir={tmp_path / 'r'}"]
    )
    hydra_record_here = (REPO / ".hydra").exists()  # the folder the command runs in
    proc = ddp_reduce(*overrides, *run)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    if not hydra_record_here:  # an empty hydra.run.dir must not make it Hydra's output folder
        assert not (REPO / ".hydra").exists()
    assert f"ddp-reduce: error: {key}" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, said once
    assert not list(tmp_path.glob("**/summary.json"))
    if run:  # nothing that looks like a run is left (Hydra made the folder before the checks)
        assert not (tmp_path / "r").exists()


def test_a_run_directory_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    proc = ddp_reduce(f"hydra.run.dir={target}")
    assert proc.returncode == 2 and "this is a file" in proc.stderr
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("content", ['{"status": "compl', "[1, 2]", "\xff\xfe"])
def test_an_unreadable_summary_is_named_never_a_traceback(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_bytes(content.encode("latin-1"))
    # a run directory holding it is refused, the file left alone
    proc = ddp_reduce("train.steps=2", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "summary.json" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "summary.json").read_bytes() == content.encode("latin-1")
    # a report lists the run as unreadable, says why, and exits 1
    proc = ddp_reduce("report", str(run))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "run run:" in proc.stderr and "summary.json" in proc.stderr
    assert "| run | unreadable |" in (run / "report.md").read_text()


def test_a_failure_is_recorded_over_an_unreadable_summary_never_over_a_result(tmp_path):
    # the launcher records a rank's failure in the run's summary: one made unreadable during
    # the run (by another program) is replaced by the record, a finished run's is kept
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "runn')
    two = config("dist.nproc=2")
    launch._failure(1, -9, {}, two, str(run))
    record = json.loads((run / "summary.json").read_text())
    assert (record["status"], record["failed_rank"], record["world_size"]) == ("failed", 1, 2)
    assert "SIGKILL" in record["error"]
    done = json.dumps({"status": "completed", "final_eval_loss": 0.5})
    (run / "summary.json").write_text(done)
    launch._failure(0, 1, {}, two, str(run))
    assert (run / "summary.json").read_text() == done
    launch._failure(0, 1, {}, two, str(tmp_path / "gone"))  # no folder: none is made
    assert not (tmp_path / "gone").exists()


def test_torchrun_refuses_dist_nproc_it_does_not_run(tmp_path):
    proc = run_cli(
        str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=1", "-m", "ddp_reduce.train",
        "dist.nproc=4", f"hydra.run.dir={tmp_path / 'r'}",
    )  # fmt: skip
    assert proc.returncode != 0 and "ddp-reduce: error: dist.nproc=4" in proc.stderr
    assert "ddp_reduce/" not in proc.stderr  # torchrun reports the exit; no traceback of ours


@pytest.mark.parametrize(
    "argv",
    [
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--momentum", "2"],
        ["--weight-decay", "-1"],
        ["--world-size", "3e9"],
    ],
)
def test_convert_refuses_impossible_numbers(argv):
    base = {"--from": "sum/sum", "--to": "mean/mean", "--world-size": "2", "--batch-size": "16",
            "--optim": "sgd", "--lr": "0.1"}  # fmt: skip
    base[argv[0]] = argv[1]
    args = [x for kv in base.items() for x in kv]
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_reduce.cli", "convert", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


_TWO_CTRL_C = """
import os, signal, sys
from ddp_reduce.run import signals
if sys.argv[1] == "rank":
    signals.process_ends_with_run()
try:
    with signals.signals_as_errors():
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
        signal.pause()
except signals.Stopped:
    print("stopped", flush=True)
try:
    os.kill(os.getpid(), signal.SIGINT)  # the launcher's, forwarded, during the teardown
    print("ignored", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


@pytest.mark.parametrize("process, after", [("rank", "ignored"), ("caller", "KeyboardInterrupt")])
def test_a_second_ctrl_c_in_a_ranks_teardown_is_ignored_and_a_callers_is_not(process, after):
    """A rank that recorded its stop ignores the next SIGINT until it exits (it used to raise
    KeyboardInterrupt inside destroy_process_group: a traceback); a process that goes on after
    the run (a notebook, a test) gets its own Ctrl-C handling back."""
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_CTRL_C, process],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_default_signals,
    )
    assert proc.stdout.split() == ["stopped", after], proc.stdout + proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_study_says_so_and_writes_no_report(tmp_path, sig):
    """``timeout`` or a scheduler (SIGTERM), or Ctrl-C (SIGINT), to every process of a study:
    one line says what stopped it, its record says so, no rank prints a traceback, and no report
    presents part of a study as the whole; ``ddp-reduce report`` then reports it, marked."""
    out, tmp = tmp_path / "study", tmp_path / "tmp"
    tmp.mkdir()
    proc = _popen("study", "lr_batch", "--quick", "--out", str(out), env={"TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 180
        index = out / "runs.jsonl"
        while not (index.exists() and index.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)  # polls for the study to be under way; the signal is what is tested
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "leaked" not in err, err[-3000:]
    done = index.read_text().count("\n")
    what = "stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted (SIGINT, Ctrl-C)"
    stopped = json.loads((out / "study.json").read_text())["stopped"]
    assert stopped.startswith(f"{what} after {done} of ") and stopped.endswith("planned runs")
    assert f"study lr_batch {stopped}; no report written" in err
    assert not (out / "report.md").exists()
    assert not _temporaries(tmp)
    report = subprocess.run(
        [str(VENV_BIN / "ddp-reduce"), "report", str(out)],
        env=project_env(),
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    assert f"**This study was stopped: {stopped}." in (out / "report.md").read_text()
