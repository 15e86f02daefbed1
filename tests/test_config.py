"""Every config composes; every bad value is refused before training, naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import HydraException

from ddp_reduce.config import ConfigError
from ddp_reduce.data import DATASETS
from ddp_reduce.models import MODELS
from ddp_reduce.run.claim import check_run_dir
from ddp_reduce.run.cli_errors import error_message
from ddp_reduce.run.validate import validate
from tests.helpers import REPO, config_dict, ddp_reduce, torchrun

CONF = REPO / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("data", _options("data"))
@pytest.mark.parametrize("optim", _options("optim"))
def test_every_data_and_optim_option_composes(data, optim):
    task = DATASETS[data].task
    model = next(name for name, entry in MODELS.items() if task in entry.tasks)
    cfg = validate(config_dict(f"data={data}", f"model={model}", f"optim={optim}"), 2)
    assert cfg.data.name == data and cfg.optim.name.name == optim


@pytest.mark.parametrize("model", ["linear", "mlp", "cnn"])
def test_every_digits_model_composes(model):
    validate(config_dict(f"model={model}"), 2)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    validate(config_dict(f"experiment={experiment}"), 1)


BAD = [
    # (overrides, world size, key named in the message, words of what is allowed)
    (["reduce.loss=mean", "reduce.op=global_mean"], 2, "reduce.op", "reduce.loss=sum"),
    (["reduce.impl=builtin", "reduce.op=sum"], 2, "reduce.op", "allowed with builtin"),
    (["optim.lr=-0.1"], 2, "optim.lr", "positive"),
    (["optim.lr=0"], 2, "optim.lr", "positive"),
    (["optim.lr=nan"], 2, "optim.lr", "positive"),
    (["data.batch_size=0"], 2, "data.batch_size", "positive"),
    (["data.global_batch_size=63"], 2, "data.global_batch_size", "multiple of"),
    (["data.global_batch_size=64", "train.accum_steps=3"], 2, "data.global_batch_size", "6"),
    (["data.batch_size=1000"], 2, "data.batch_size", "at most the 1438 training items"),
    (["train.accum_steps=0"], 2, "train.accum_steps", "positive"),
    (["train.steps=0"], 2, "train.steps", "positive"),
    (["train.target_loss=1.5", "train.eval_every=0"], 2, "train.eval_every", "target_loss=1.5"),
    (["optim.momentum=1.5"], 2, "optim.momentum", "0 <= momentum < 1"),
    (["optim.nesterov=true", "optim.momentum=0"], 2, "optim.nesterov", "momentum > 0"),
    (["optim.clip_norm=0"], 2, "optim.clip_norm", "positive"),
    (["model=cnn", "data=linear"], 2, "model", "one of"),
    (["model=seq"], 2, "model", "with data=digits"),
    (["model.sync_bn=true"], 2, "model.sync_bn", "batch_norm=true"),
    (["dist.nproc=0"], 2, "dist.nproc", "positive"),
    (["dist.device=cpu", "dist.backend=nccl"], 2, "dist.backend", "gloo"),
    (
        ["data.last_batch=keep", "data.batch_size=179", "train.accum_steps=4"],
        2,
        "data.last_batch",
        "fewer than one per rank",
    ),
]


@pytest.mark.parametrize("overrides,world,key,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_refused_with_key_and_allowed(overrides, world, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate(config_dict(*overrides), world)
    assert err.value.key == key
    assert allowed in str(err.value)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["reduce.op=median"], ["reduce.op", "sum, mean, global_mean"]),
        (["reduce.loss=avg"], ["reduce.loss", "sum, mean"]),
        (["optim.lr=fast"], ["optim.lr", "fast"]),
        (["data=imagenet"], ["data", "imagenet", "digits"]),
        (["optim.typo=1"], ["typo"]),
    ],
)
def test_unknown_choices_and_types_are_refused_at_composition(overrides, words):
    with pytest.raises(HydraException) as err:
        config_dict(*overrides)
    for w in words:
        assert w in error_message(err.value)


def _study_overrides() -> list[list[str]]:
    """Each study's own overrides as a run of it composes them, with a value of every type (a
    key given twice: the last value holds, as in Hydra)."""
    import yaml

    out = []
    for path in sorted((CONF / "study").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        common = spec.get("common") or spec.get("training", {}).get("common") or []
        out.append([*common, "seed=2", "optim.lr=0.30000000000000004", "train.target_loss=null"])
    return out


COMPOSED = [
    [],
    ["experiment=debug", "train.steps=7"],
    ["optim=adamw", "optim.betas=[0.8,0.9]", "optim.clip_norm=1e-3"],
    ["model=cnn", "model.channels=[4,8]", "data.root='/tmp/a b'", "noise.steps=every"],
    ["train.steps=5", "data=text", "model=seq", "model.arch=transformer"],
    *_study_overrides(),
]


@pytest.mark.parametrize("overrides", COMPOSED, ids=range(len(COMPOSED)))
def test_plain_values_on_a_kept_composition_give_hydras_own(overrides):
    from omegaconf import OmegaConf

    from ddp_reduce.run import compose

    def plain(cfg):
        out = OmegaConf.to_container(cfg, resolve=False)
        out.pop("hydra")
        return out

    for _ in range(2):  # the second time from the kept composition of the groups
        kept = compose._with_values(overrides)
        assert kept is not None, "plain key=value overrides take the kept composition"
        assert plain(kept) == plain(compose._compose(tuple(overrides)))
    assert compose._composed_groups.cache_info().hits >= 1
    # the run directory's ${now:...} (microseconds) is resolved per composition, never kept
    assert compose.compose_config(overrides)[1] != compose.compose_config(overrides)[1]


@pytest.mark.parametrize(
    "overrides",
    [["+model.extra=1"], ["~optim.lr"], ["hydra.run.dir=/tmp/x"], ["hydra/job_logging=none"]],
)
def test_other_overrides_are_left_to_hydra(overrides):
    from ddp_reduce.run import compose

    assert compose._with_values(overrides) is None


def test_completed_run_is_not_overwritten(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="train.overwrite=true"):
        check_run_dir(tmp_path, overwrite=False)
    check_run_dir(tmp_path, overwrite=True)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    check_run_dir(tmp_path, overwrite=False)


def _refused(proc, run: Path, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert not (run / "summary.json").exists()
    assert not (run / "model.pt").exists()


@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            ["reduce.loss=mean", "reduce.op=global_mean"],
            ["reduce.op=global_mean", "reduce.loss=sum"],
        ),
        (["data.global_batch_size=63"], ["data.global_batch_size=63", "multiple of"]),
        (["reduce.op=median"], ["reduce.op", "global_mean"]),
        (["dist.device=cuda"], ["dist.device"]),
    ],
)
@pytest.mark.cli
def test_ddp_reduce_refuses_bad_input_with_nonzero_exit(tmp_path, overrides, words):
    run = tmp_path / "run"
    proc = ddp_reduce(*overrides, f"hydra.run.dir={run}")
    _refused(proc, run, *words)


@pytest.mark.cli
def test_torchrun_refuses_a_batch_the_world_size_does_not_divide(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(2, "data.global_batch_size=63", f"hydra.run.dir={run}")
    _refused(proc, run, "data.global_batch_size=63", "multiple of world size")
    # every rank says it (torchrun stops the others when the first exits: at least that one has)
    said = [line for line in proc.stderr.splitlines() if line.startswith("ddp-reduce: error")]
    assert 1 <= len(said) <= 2, proc.stderr
    for line in said:
        assert "data.global_batch_size=63" in line and "multiple of world size" in line, line
