"""``ddp-reduce audit``: the comparison's arithmetic on gradients built here (no processes), then
real audits of the example scripts in real process groups (torchrun, gloo): a correct script is
invariant, each planted bug gets its verdict and exponents, bad input gets a clear answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from ddp_reduce.auditing import probe
from ddp_reduce.auditing.compare import assemble, compare, fit_exponents, same_items
from ddp_reduce.auditing.result import AuditError, LayoutResult
from ddp_reduce.auditing.runner import _numpy, audit, fill, parse_layout
from tests.helpers import REPO

SCRIPT = str(REPO / "examples" / "audit" / "ddp_train.py")
CMD = [SCRIPT, "--per-device-batch", "{b}", "--grad-accum", "{A}", "--steps", "2"]
SEPARATING = ["1x1", "2x1", "1x2"]  # W and A varied independently, W <= 2


def test_layouts_and_placeholders():
    row = parse_layout("2x2", 16)
    assert (row.world_size, row.accum_steps, row.batch_size) == (2, 2, 4)
    assert fill(["--b={b}", "{W}x{A}", "{N}"], row, 16) == ["--b=4", "2x2", "16"]
    with pytest.raises(AuditError, match="3x1 does not divide --global-batch 16"):
        parse_layout("3x1", 16)
    with pytest.raises(AuditError, match="no layout"):
        parse_layout("2by2", 16)


def test_the_fit_names_each_exponent_and_refuses_what_it_cannot_separate():
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]
    fit = fit_exponents([(w, a, w**1.0 * a**-1.0) for w, a in layouts])
    assert fit == pytest.approx({"world_size_exponent": 1.0, "accum_exponent": -1.0}, abs=1e-9)
    tied = fit_exponents([(1, 4, 1.0), (2, 2, 2.0), (4, 1, 4.0)])  # W·A fixed: W is 1/A
    assert tied == {"world_size_exponent": None, "accum_exponent": None}


def _records(grads: list[torch.Tensor], items: list[str], exact: bool) -> list[dict]:
    """One rank's record of a step, as the probe writes it, for gradients made here."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    rec = {"rank": 0, "world_size": 1, "step": 1, "items": items, "clip": {}, "dims": 256,
           "exact": exact, **probe.describe(grads, params, 256, exact)}  # fmt: skip
    return [_numpy(rec)]


@pytest.mark.parametrize("case", ["scaled", "differs", "invariant"])
def test_the_projection_gives_the_verdicts_and_factors_of_the_exact_gradient(case):
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(300, 70, generator=gen), torch.randn(70, generator=gen)]
    layouts = [(1, 1), (2, 1), (1, 2)]
    items = [f"item{i}" for i in range(8)]
    caps = []
    for w, a in layouts:
        scale = float(w) if case == "scaled" else 1.0
        noise = 0.05 * (w + a - 2) if case == "differs" else 1e-9
        grads = [scale * t + noise * torch.randn(t.shape, generator=gen) for t in g]
        caps.append([assemble(_records(grads, items, exact=True))])

    def verdict(exact: bool):
        rows = [LayoutResult(w, a, 8 // (w * a)) for w, a in layouts]
        return compare(rows, caps, 8, 1, 1e-4, exact=exact)

    exact, projected = verdict(True), verdict(False)
    assert exact.verdict == projected.verdict == case
    for e, p in zip(exact.layouts, projected.layouts, strict=True):
        assert p.factor[0] == pytest.approx(e.factor[0], rel=0.05 if case == "differs" else 1e-9)
        if case == "differs":  # the projection keeps a distance to within ~1/sqrt(256)
            assert p.direction_error[0] == pytest.approx(e.direction_error[0], rel=0.3)
    if case == "scaled":
        assert exact.fit["world_size_exponent"] == pytest.approx(1.0, abs=1e-6)
        assert exact.fit["accum_exponent"] == pytest.approx(0.0, abs=1e-6)


def test_item_fingerprints_ignore_padding_marked_by_the_attention_mask():
    seq = torch.tensor([5, 6, 7])
    short = probe.item_hashes(
        (),
        {
            "input_ids": torch.tensor([[5, 6, 7]]),
            "attention_mask": torch.ones(1, 3, dtype=torch.long),
        },
    )
    padded = probe.item_hashes((), {"input_ids": torch.tensor([[5, 6, 7, 0, 0], [1, 2, 0, 0, 0]]),
                                    "attention_mask": torch.tensor([[1, 1, 1, 0, 0],
                                                                    [1, 1, 0, 0, 0]])})  # fmt: skip
    assert short[0] == padded[0] != padded[1]
    # a shifted input (tokens[:, :-1]) cuts the last token of the longest sequence only
    longest = Counter(probe.item_hashes((torch.tensor([[5, 6, 7], [1, 2, 0]]),), {}))
    unpadded = Counter(probe.item_hashes((torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]]),), {}))
    assert longest != unpadded and same_items(longest, unpadded) and same_items(unpadded, longest)
    assert not same_items(longest, Counter(probe.item_hashes((torch.tensor([[5, 6, 9]]),), {})))
    no_mask = probe.item_hashes((torch.tensor([[5, 6, 7, 0], [5, 6, 7, 1]]),), {})
    assert no_mask[0] == probe.item_hashes((torch.tensor([[5, 6, 7]]),), {})[0] != no_mask[1]
    assert probe.item_hashes((seq[None],), {}) != probe.item_hashes((seq[None] + 1,), {})


# ---- real audits (torchrun, gloo) ---------------------------------------------------------------


def test_a_correct_ddp_script_is_invariant_and_the_cli_writes_json_and_a_folder(tmp_path):
    out = tmp_path / "audit"
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_reduce.cli", "audit", "--global-batch", "16", "--layouts",
         *SEPARATING, "--steps", "2", "--out", str(out), "--json", str(tmp_path / "a.json"),
         "--", *CMD],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "layout 3/3 1x2 (W=1, A=2, b=8)" in proc.stderr  # progress per layout
    result = json.loads((tmp_path / "a.json").read_text())
    assert set(result) == {"verdict", "global_batch", "steps", "layouts", "fit", "diagnosis"}
    assert result["verdict"] == "invariant" and result["steps"] == 2
    row = result["layouts"][1]
    assert set(row) == {"world_size", "accum_steps", "batch_size", "factor", "direction_error",
                        "grad_norm", "clipped", "same_batch", "error"}  # fmt: skip
    assert row["factor"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert all(row["same_batch"]) and row["error"] is None
    assert (out / "audit.png").stat().st_size > 0 and (out / "layout-2x1" / "log.txt").exists()


@pytest.mark.parametrize(
    "flags, exponents, words",
    [
        (["--loss", "mean", "--reduce", "sum"], (1, 0), "sums across ranks: ∝ W"),
        (["--divide-accum-twice"], (0, -1), "divides by A twice: ∝ 1/A"),
        (["--loss", "global", "--reduce", "mean"], (-1, 0), "a mean over ranks on top of a"),
    ],
    ids=["sum-over-ranks", "accum-twice", "mean-over-global-count"],
)
def test_each_planted_factor_bug_is_scaled_with_its_exponents(flags, exponents, words):
    result = audit([*CMD[:-2], "--steps", "1", *flags], global_batch=16, layouts=SEPARATING)
    assert result.verdict == "scaled", result.diagnosis
    fit = result.fit
    assert (fit["world_size_exponent"], fit["accum_exponent"]) == pytest.approx(exponents, abs=1e-4)
    assert words in result.diagnosis
    assert result.exit_status == 1


def test_ragged_tokens_mean_of_means_differs_and_the_global_count_is_invariant():
    ragged = [*CMD[:-2], "--steps", "1", "--data", "ragged"]
    means = audit([*ragged, "--loss", "mean"], global_batch=16, layouts=["1x1", "2x2"])
    assert means.verdict == "differs", means.diagnosis
    assert "between 1x1 and 2x2" in means.diagnosis
    fixed = audit([*ragged, "--loss", "global", "--reduce", "sum"], global_batch=16,
                  layouts=["1x1", "2x2"])  # fmt: skip
    assert fixed.verdict == "invariant", fixed.diagnosis
    with pytest.raises(AssertionError, match="differs"):
        means.assert_invariant()


def test_a_sampler_that_depends_on_w_is_incomparable_and_said_so():
    result = audit([*CMD[:-2], "--steps", "1", "--shuffle-by-rank"], global_batch=16,
                   layouts=["1x1", "2x1"])  # fmt: skip
    assert result.verdict == "incomparable" and result.exit_status == 3
    assert "a sampler that depends on W" in result.diagnosis
    assert result.layouts[1].same_batch == [False]


# ---- the project's own trainer, through a launcher template ---------------------------------


def _own(tmp_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ddp_reduce.cli", "dist.nproc={W}", "train.accum_steps={A}",
            "data.batch_size={b}", "train.steps=1", "train.eval_every=0", "noise.enabled=false",
            f"hydra.run.dir={tmp_path}/run-{{W}}x{{A}}", *overrides]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, layouts, verdict, world_exponent",
    [
        (["reduce.loss=mean", "reduce.op=mean"], ["2x1", "1x2"], "invariant", None),
        (["reduce.loss=sum", "reduce.op=sum"], ["2x1", "1x2"], "invariant", None),
        (["reduce.loss=mean", "reduce.op=sum"], ["1x1", "2x1"], "scaled", 1.0),
        (["data=sequences", "model=seq", "reduce.loss=mean", "reduce.op=mean"], ["1x1", "2x2"],
         "differs", None),
        (["data=sequences", "model=seq", "reduce.loss=sum", "reduce.op=global_mean"],
         ["1x1", "2x2"], "invariant", None),
    ],
    ids=["mean-mean", "sum-sum", "mean-sum", "ragged-mean-mean", "ragged-global_mean"],
)  # fmt: skip
def test_the_projects_own_trainer_through_the_audit(
    tmp_path, overrides, layouts, verdict, world_exponent
):
    result = audit(_own(tmp_path, *overrides), global_batch=16, layouts=layouts,
                   launcher="{command}")  # fmt: skip
    assert result.verdict == verdict, result.diagnosis
    if world_exponent is not None:
        assert result.fit["world_size_exponent"] == pytest.approx(world_exponent, abs=1e-4)


# ---- bad input ----------------------------------------------------------------------------------


def test_a_layout_that_does_not_divide_is_refused_by_the_cli_with_status_2():
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_reduce.cli", "audit", "--global-batch", "16", "--layouts",
         "1x1", "3x1", "--", *CMD],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "3x1 does not divide --global-batch 16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_crash_at_one_layout_is_shown_and_the_others_still_compared():
    result = audit([*CMD[:-2], "--steps", "1", "--crash-at-world-size", "2"], global_batch=16,
                   layouts=["1x1", "2x1", "1x2"])  # fmt: skip
    assert result.verdict == "invariant", result.diagnosis
    failed = result.layouts[1]
    assert failed.error == "exit status 1: RuntimeError: no GPU interconnect for 2 ranks"
    assert failed.factor == [None] and "layout 2x1 failed" in result.diagnosis


def test_a_script_that_ignores_the_placeholders_is_incomparable():
    fixed = [SCRIPT, "--per-device-batch", "8", "--grad-accum", "1", "--steps", "1"]
    result = audit(fixed, global_batch=16, layouts=["1x1", "2x1"])
    assert result.verdict == "incomparable"
    assert "1x1 fed 8" in result.diagnosis and "ignores the placeholders" in result.diagnosis


NEVER_STEPS = """
import sys, time, torch
model = torch.nn.Linear(4, 1)
model(torch.randn(8, 4)).sum().backward()  # a gradient, but no optimizer step
if sys.argv[1] == "2":
    time.sleep(600)  # ... and, at A=2, no end either
"""


def test_a_script_that_never_steps_the_optimizer_ends_or_times_out_with_a_named_reason(tmp_path):
    script = tmp_path / "never_steps.py"
    script.write_text(NEVER_STEPS)
    result = audit([sys.executable, str(script), "{A}"], global_batch=4, layouts=["1x1", "1x2"],
                   launcher="{command}", timeout_s=20)  # fmt: skip
    assert result.verdict == "incomparable"
    assert result.layouts[0].error == "the script never stepped an optimizer"
    assert result.layouts[1].error.startswith("no result within 20 s (--timeout)")


# ---- FSDP2: each rank's optimizer sees its shard ------------------------------------------------

FSDP2 = [str(REPO / "examples" / "audit" / "fsdp2_train.py"), "--per-device-batch", "{b}",
         "--grad-accum", "{A}", "--steps", "1"]  # fmt: skip


def test_fsdp2_shards_are_put_together_invariant_and_a_global_count_is_divided_twice():
    right = audit(FSDP2, global_batch=16, layouts=["1x2", "2x1"])
    assert right.verdict == "invariant", right.diagnosis
    wrong = audit([*FSDP2, "--loss", "global"], global_batch=16, layouts=["1x1", "2x1"])
    assert wrong.verdict == "scaled", wrong.diagnosis
    assert wrong.layouts[1].factor[0] == pytest.approx(0.5, rel=1e-5)
    assert wrong.fit["world_size_exponent"] == pytest.approx(-1.0, abs=1e-4)
