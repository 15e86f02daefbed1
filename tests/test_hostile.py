"""Hostile checkpoints, run folders and targets: nothing they hold runs, nothing outside the
run is written through them, and each ends in a clear error or a fallback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ddp_reduce.run import checkpoint
from tests.helpers import ddp_reduce


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
