"""ddp-reduce convert: per-knob verdicts, checked by running both settings."""

from __future__ import annotations

import pytest
import torch

from ddp_reduce.analysis.convert import (
    APPROX,
    EXACT,
    PRESETS,
    ConvertError,
    Setting,
    convert,
    main,
    resolve,
)
from ddp_reduce.layer.reduction import (
    LossReduction,
    ReduceImpl,
    ReduceOp,
    check_combination,
    plan_step,
)
from ddp_reduce.run.launch import rank_main
from tests.helpers import REPO, config

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
    rank_main(config(*STEPS, *setting.overrides(), "dist.nproc=1"), str(tmp_path / name))
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
        config(*src.overrides(), "train.steps=200", "train.eval_every=0"),
        str(tmp_path / "src"),
    )
    s = rank_main(
        config(*dst.overrides(), "train.steps=100", "train.eval_every=0"),
        str(tmp_path / "dst"),
    )
    assert s.final_train_loss == pytest.approx(ref.final_train_loss, rel=0.5)
    assert s.final_train_loss != ref.final_train_loss


def test_lr_scaling_in_a_run(tmp_path):
    s = rank_main(
        config(
            "train.steps=2",
            "data.batch_size=64",
            "optim.lr=0.1",
            "optim.lr_scaling=linear",
            "optim.base_batch_size=32",
        ),
        str(tmp_path / "a"),
    )
    assert s.optim_effective["lr"] == pytest.approx(0.2) and s.optim_effective["kappa"] == 2
    s = rank_main(
        config(
            "train.steps=2",
            "data.batch_size=64",
            "optim=adam",
            "optim.lr_scaling=adam_sqrt",
            "optim.base_batch_size=16",
        ),
        str(tmp_path / "b"),
    )
    eff = s.optim_effective
    assert eff["betas"] == pytest.approx([0.6, 0.996]) and eff["lr"] == pytest.approx(0.006)


# --- presets: the conventions of frameworks, by name ------------------------------------------

W, B, A = 2, 4, 3  # N = 24


def test_every_preset_resolves_to_a_convention_ddp_reduce_runs():
    # c with equal counts, written here independently of the presets' own text
    expected_c = {"summed-loss": W * B * A, "horovod-sum": W}
    assert len(PRESETS) >= 11
    for name, preset in PRESETS.items():
        loss, op = resolve(name)
        assert (loss, op) == (preset.loss, preset.op)
        assert check_combination(LossReduction[loss], ReduceOp[op], ReduceImpl.hook) is None
        setting = Setting(loss, op, W, B, A, "sgd", lr=0.1)
        assert setting.c == expected_c.get(name, 1), name
        assert setting.overrides()[:2] == [f"reduce.loss={loss}", f"reduce.op={op}"]
        assert preset.source.startswith("https://") and preset.c and preset.what


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| preset |"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_list_presets_prints_every_preset_with_c_and_source_and_needs_nothing_else(capsys):
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == set(PRESETS)
    for name, (_, what, conv, c, exact, source) in rows.items():
        preset = PRESETS[name]
        assert conv == preset.convention and what == preset.what
        assert c == preset.c and source == preset.source
        assert exact == ("yes" if preset.loss == "sum" else "no"), name
    # per-token conventions write c with token counts
    assert "T" in rows["hf-trainer-2024-fix-devices"][3]
    assert "T_r" in rows["hf-trainer-2024-fix"][3]
    for preset in PRESETS.values():
        if preset.note:
            assert f"- {preset.name}: {preset.note}" in out


def test_the_docs_cite_every_preset():
    docs = (REPO / "docs" / "conventions.md").read_text()
    readme = (REPO / "README.md").read_text()
    for name, preset in PRESETS.items():
        assert f"`{name}`" in docs and f"`{name}`" in readme, name
        assert preset.source in docs, name
        assert f"| `{name}` | {preset.convention} |" in docs, name


def test_converting_still_requires_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--from", "pytorch-ddp", "--to", "sum/sum"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "required: --world-size, --batch-size, --optim, --lr" in err


@pytest.mark.parametrize("world", [2, 256])
def test_the_printed_commands_fit_the_world_size(capsys, world):
    """A few ranks run on this machine; beyond that convert also gives the torchrun form,
    which leaves the world size to torchrun (a dist.nproc there is refused)."""
    main(
        ["--from", "sum/sum", "--to", "mean/mean", "--world-size", str(world)]
        + "--batch-size 32 --optim sgd --lr 0.0001".split()
    )
    out = capsys.readouterr().out
    commands = out.split("run the target with:\n", 1)[1].strip().splitlines()
    assert f"dist.nproc={world}" in commands[0] and commands[0].lstrip().startswith("ddp-reduce")
    if world == 2:
        assert len(commands) == 1
    else:
        assert len(commands) == 2 and "torchrun" in commands[1]
        assert "dist.nproc" not in commands[1] and "optim.lr=0.8192" in commands[1]


_ARGS = "--world-size 4 --batch-size 8 --accum 2 --optim sgd --lr 0.1 --momentum 0.9"
_ARGS += " --weight-decay 1e-4 --clip-norm 2"


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_is_its_convention_in_from_and_in_to(capsys, name):
    conv = PRESETS[name].convention

    def run(src: str, dst: str) -> str:
        assert main(["--from", src, "--to", dst, *_ARGS.split()]) == 0
        return capsys.readouterr().out

    other = "sum/sum" if conv != "sum/sum" else "mean/mean"
    by_name, by_convention = run(name, other), run(conv, other)
    assert by_name == by_convention and f"loss={PRESETS[name].loss} " in by_name
    assert run(other, name) == run(other, conv)
    # the Python function takes a name too
    src = Setting("sum", "sum", 4, 8, 2, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert convert(src, name) == convert(src, conv)


@pytest.mark.parametrize("flag", ["--from", "--to"])
def test_an_unknown_preset_exits_2_naming_it_and_the_presets(capsys, flag):
    argv = {"--from": "sum/sum", "--to": "mean/mean"} | {flag: "pytorch-dpp"}
    with pytest.raises(SystemExit) as e:
        main(["--from", argv["--from"], "--to", argv["--to"], *_ARGS.split()])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "'pytorch-dpp'" in err and all(name in err for name in PRESETS)
    with pytest.raises(ConvertError, match="pytorch-dpp"):
        convert(Setting("sum", "sum", 2, 8, 1, "sgd", lr=0.1), "pytorch-dpp")


# Each framework's reduction as its source code does it, on one step of scalar per-item
# "gradients" g: g[r][a] holds the items of rank r's micro-batch a. See docs/conventions.md.
def _mean(xs):
    return sum(xs) / len(xs)


def _ddp_average(rank_grads):  # DDP, Horovod Average, DeepSpeed, Megatron default: sum / W
    return sum(rank_grads) / len(rank_grads)


def _horovod(g, op, predivide=4.0):
    # the user's loss: each sub-batch's mean / A (Horovod's ImageNet example)
    ranks = [sum(_mean(m) / len(r) for m in r) for r in g]
    if op == "sum":
        return sum(ranks)
    return sum(x / predivide for x in ranks) * predivide / len(g)  # prescale, sum, postscale


def _deepspeed(g, predivide=4.0):
    # engine.backward: loss / gradient_accumulation_steps; allreduce_bucket: * 1/f, sum, * f/W
    ranks = [sum(_mean(m) / len(r) for m in r) for r in g]
    return sum(x / predivide for x in ranks) * predivide / len(g)


def _hf_fix(g, devices):
    # get_batch_samples: num_items_in_batch = this rank's tokens over its A micro-batches,
    # gathered over ranks with average_tokens_across_devices; compute_loss: sum / num_items,
    # times num_processes with devices; DDP then averages
    total = sum(len(m) for r in g for m in r)
    ranks = []
    for r in g:
        items = total if devices else sum(len(m) for m in r)
        ranks.append(sum(sum(m) / items * (len(g) if devices else 1) for m in r))
    return _ddp_average(ranks)


def _megatron(g, per_token):
    # schedules.forward_step: without per-token loss, sum / num_tokens / num_microbatches;
    # DDP scales by 1/dp (1.0 with per-token loss); finalize_model_grads: / all-reduced tokens
    if not per_token:
        return _ddp_average([sum(sum(m) / len(m) / len(r) for m in r) for r in g])
    return sum(sum(sum(m) for m in r) for r in g) / sum(len(m) for r in g for m in r)


def _torchtitan(g):
    # loss: reduction="sum" / global_valid_tokens; FSDP gradient divide factor 1.0 (a sum)
    tokens = sum(len(m) for r in g for m in r)
    return sum(sum(sum(m) / tokens for m in r) for r in g)


FRAMEWORKS = {
    "pytorch-ddp": lambda g: _ddp_average([_mean([x for m in r for x in m]) for r in g]),
    "horovod-average": lambda g: _horovod(g, "average"),
    "horovod-sum": lambda g: _horovod(g, "sum"),
    "deepspeed": _deepspeed,
    # transformers < 4.46: the model's per-micro-batch mean, accelerator.backward divides by A
    "hf-trainer-pre-2024-fix": lambda g: _ddp_average(
        [sum(_mean(m) / len(r) for m in r) for r in g]
    ),
    "hf-trainer-2024-fix": lambda g: _hf_fix(g, devices=False),
    "hf-trainer-2024-fix-devices": lambda g: _hf_fix(g, devices=True),
    "megatron-default": lambda g: _megatron(g, per_token=False),
    "megatron-per-token": lambda g: _megatron(g, per_token=True),
    "torchtitan": _torchtitan,
    "summed-loss": lambda g: sum(x for r in g for m in r for x in m),  # sum, all-reduce SUM
}


def _ddp_reduce(loss, op, g):
    """What ddp_reduce's own arithmetic gives for (loss, op) on the same step."""
    counts = [sum(len(m) for m in r) for r in g]
    sizes = {len(m) for r in g for m in r}
    out = 0.0
    for r, rank in enumerate(g):
        plan = plan_step(
            LossReduction[loss],
            ReduceOp[op],
            len(g),
            counts[r],
            counts=counts,
            micro_items=[len(m) for m in rank],
            micro_equal=len(sizes) == 1,
        )
        out += sum(s * sum(m) for s, m in zip(plan.loss_scales, rank, strict=True)) / plan.divisor
    return out, plan


CONVENTIONS = [
    (loss.name, op.name)
    for loss in LossReduction
    for op in ReduceOp
    if check_combination(loss, op, ReduceImpl.hook) is None
]


def _step(counts):
    """Per-item gradients with the given counts per (rank, micro-batch); all distinct."""
    g, k = [], 1
    for rank in counts:
        g.append([])
        for n in rank:
            g[-1].append([((7 * (k + i)) % 11 - 4.5) / 3 for i in range(n)])
            k += n
    return g


def test_each_preset_does_what_its_framework_does_on_ragged_tokens():
    """On a ragged step (ranks and micro-batches of unequal token counts) the framework's own
    arithmetic equals ddp_reduce's for the preset's convention, and for no other."""
    g = _step([[3, 1], [2, 6]])  # W=2, A=2
    for name, preset in PRESETS.items():
        framework = FRAMEWORKS[name](g)
        matches = {
            (loss, op)
            for loss, op in CONVENTIONS
            if _ddp_reduce(loss, op, g)[0] == pytest.approx(framework, rel=1e-12)
        }
        assert matches == {(preset.loss, preset.op)}, name


def test_ragged_counts_bias_the_per_micro_batch_mean_and_not_the_global_token_mean():
    g = _step([[3, 1], [2, 6]])
    items = [x for r in g for m in r for x in m]
    G = sum(items) / len(items)  # the per-token mean gradient of the whole step
    for name, preset in PRESETS.items():
        got, plan = _ddp_reduce(preset.loss, preset.op, g)
        exact = got == pytest.approx(plan.c * G, rel=1e-12)
        assert exact == preset.exact_with_ragged_counts == plan.exact, name
    # the 2024 fix as the Trainer does it with average_tokens_across_devices: exactly G;
    # before it, each micro-batch averaged on its own: off by more than 10% here
    assert FRAMEWORKS["hf-trainer-2024-fix-devices"](g) == pytest.approx(G, rel=1e-12)
    assert abs(FRAMEWORKS["hf-trainer-pre-2024-fix"](g) / G - 1) > 0.1
    assert not PRESETS["hf-trainer-pre-2024-fix"].exact_with_ragged_counts
    assert PRESETS["hf-trainer-2024-fix-devices"].exact_with_ragged_counts


def test_with_equal_counts_every_framework_gives_its_presets_c():
    g = _step([[B] * A] * W)
    items = [x for r in g for m in r for x in m]
    G = sum(items) / len(items)
    for name, preset in PRESETS.items():
        c = Setting(preset.loss, preset.op, W, B, A, "sgd", lr=0.1).c
        assert FRAMEWORKS[name](g) == pytest.approx(c * G, rel=1e-12), name
