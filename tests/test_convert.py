"""ddp-reduce convert: per-knob verdicts, checked by running both settings."""

from __future__ import annotations

import pytest
import torch

from ddp_reduce.analysis.convert import APPROX, EXACT, ConvertError, Setting, convert, main
from ddp_reduce.run.launch import rank_main
from tests.helpers import config_dict

STEPS = ("train.steps=25", "train.eval_every=0", "train.log_every=5", "noise.enabled=false")


def _convert(src, to, **kw):
    result = convert(src, to, **kw)
    return result.target, result.knobs


def _knobs(knobs):
    return {k.name: k for k in knobs}


def test_sgd_sum_to_mean_values_and_verdicts():
    src = Setting(
        "sum", "sum", 2, 16, 1, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, clip_norm=5.0
    )
    dst, knobs = _convert(src, "mean/mean")
    k = _knobs(knobs)
    assert (src.c, dst.c) == (32, 1)
    assert dst.lr == pytest.approx(3.2) and dst.weight_decay == pytest.approx(3.125e-5)
    assert dst.clip_norm == pytest.approx(5 / 32) and dst.momentum == 0.9
    assert {kn.verdict for kn in knobs} == {EXACT}
    assert "weight_decay/k" in k["weight_decay"].why


def test_adam_and_adamw():
    src = Setting("mean", "mean", 2, 16, 1, "adam", lr=1e-3, eps=1e-8, weight_decay=0.01)
    dst, knobs = _convert(src, "sum/sum")
    assert dst.lr == 1e-3 and dst.eps == pytest.approx(32e-8)
    assert dst.weight_decay == pytest.approx(0.32)  # coupled: scaled
    assert "eps/k" in _knobs(knobs)["eps"].why
    srcw = Setting("mean", "mean", 2, 16, 1, "adamw", lr=1e-3, weight_decay=0.01)
    dstw, _ = _convert(srcw, "sum/sum")
    assert dstw.weight_decay == 0.01  # decoupled: untouched


def test_a_batch_change_needs_a_rule_and_is_approximate():
    src = Setting("mean", "mean", 8, 32, 1, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    with pytest.raises(ConvertError, match="name a scaling rule"):
        _convert(src, "mean/mean", world_size=256)
    dst, knobs = _convert(src, "mean/mean", world_size=256, rule="linear")  # Goyal et al.
    assert dst.global_batch == 8192 and dst.lr == pytest.approx(3.2)
    assert {kn.verdict for kn in knobs} == {APPROX}
    dst, _ = _convert(src, "mean/mean", world_size=256, rule="sqrt")
    assert dst.lr == pytest.approx(0.1 * 32**0.5)
    adam = Setting("mean", "mean", 1, 64, 1, "adam", lr=1e-3, eps=1e-8, betas=(0.9, 0.999))
    dst, _ = _convert(adam, "mean/mean", batch_size=256, rule="adam_sqrt")  # Malladi et al.
    assert dst.lr == pytest.approx(2e-3) and dst.eps == pytest.approx(5e-9)
    assert dst.betas == pytest.approx((0.6, 0.996))


def _cli(source: str) -> list[str]:
    args = "--world-size 2 --batch-size 8 --optim sgd --lr 0.1 --to sum/sum"
    return ["--from", source, *args.split()]


@pytest.mark.parametrize(
    "source,message",
    [("mean/global_mean", "reduce.loss=sum"), ("sum", "expected LOSS/OP"), ("avg/sum", "loss is")],
)
def test_cli_refuses_what_it_cannot_convert(capsys, source, message):
    with pytest.raises(SystemExit) as e:
        main(_cli(source))
    assert e.value.code == 2 and message in capsys.readouterr().err


def _run(setting: Setting, tmp_path, name: str) -> dict[str, torch.Tensor]:
    rank_main(config_dict(*STEPS, *setting.overrides(), "dist.nproc=1"), str(tmp_path / name))
    return torch.load(tmp_path / name / "model.pt")


@pytest.mark.parametrize(
    "src,target",
    [
        (
            Setting(
                "sum",
                "sum",
                1,
                32,
                1,
                "sgd",
                lr=0.003,
                momentum=0.9,
                weight_decay=0.5,
                clip_norm=20.0,
            ),
            ("mean", "mean"),
        ),
        (
            Setting(
                "mean",
                "mean",
                1,
                32,
                1,
                "adam",
                lr=3e-3,
                eps=1e-6,
                weight_decay=0.05,
                clip_norm=0.5,
            ),
            ("sum", "mean"),
        ),
        (
            Setting("mean", "mean", 1, 32, 1, "adamw", lr=3e-3, eps=1e-6, weight_decay=0.05),
            ("sum", "sum"),
        ),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_exact_verdicts_hold_when_both_settings_run(tmp_path, src, target):
    dst, knobs = _convert(src, "/".join(target))
    assert all(k.verdict == EXACT for k in knobs)
    a, b = _run(src, tmp_path, "src"), _run(dst, tmp_path, "dst")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # the check can fail: keeping the source's knobs is another run
    kept = Setting(**{**src.__dict__, "loss": target[0], "op": target[1]})
    c = _run(kept, tmp_path, "kept")
    assert max((c[k] - a[k]).abs().max() for k in a) > 1e-3


def test_approximate_batch_rule_lands_near(tmp_path):
    """Linear scaling from N=32 to 64 at the same number of epochs: close, not equal."""
    src = Setting("mean", "mean", 1, 32, 1, "sgd", lr=0.05, momentum=0.9)
    dst, _ = _convert(src, "mean/mean", batch_size=64, rule="linear")
    ref = rank_main(
        config_dict(*src.overrides(), "train.steps=200", "train.eval_every=0"),
        str(tmp_path / "src"),
    )
    s = rank_main(
        config_dict(*dst.overrides(), "train.steps=100", "train.eval_every=0"),
        str(tmp_path / "dst"),
    )
    assert s["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=0.5)
    assert s["final_train_loss"] != ref["final_train_loss"]


def test_lr_scaling_in_a_run(tmp_path):
    s = rank_main(
        config_dict(
            "train.steps=2",
            "data.batch_size=64",
            "optim.lr=0.1",
            "optim.lr_scaling=linear",
            "optim.base_batch_size=32",
        ),
        str(tmp_path / "a"),
    )
    assert s["optim_effective"]["lr"] == pytest.approx(0.2) and s["optim_effective"]["kappa"] == 2
    s = rank_main(
        config_dict(
            "train.steps=2",
            "data.batch_size=64",
            "optim=adam",
            "optim.lr_scaling=adam_sqrt",
            "optim.base_batch_size=16",
        ),
        str(tmp_path / "b"),
    )
    eff = s["optim_effective"]
    assert eff["betas"] == pytest.approx([0.6, 0.996]) and eff["lr"] == pytest.approx(0.006)
