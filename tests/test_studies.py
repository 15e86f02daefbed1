"""Each study's quick variant, run for real: the numbers must say what the theory says."""

from __future__ import annotations

import csv
import re

import pytest

from ddp_reduce.analysis.report import read_records, write_report
from ddp_reduce.analysis.studies import blew_up, relative_weight_difference
from ddp_reduce.analysis.study import load_spec, run_study
from ddp_reduce.analysis.study import studies as all_studies


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            report = run_study(name, quick=True, out=out, common=[])
            cache[name] = (out, report.read_text())
        return cache[name]

    return get


def _csv(out):
    with open(out / "runs.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", all_studies())
def test_every_study_writes_a_figure_its_report_links(studies, name):
    out, report = studies(name)
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures, f"{name} wrote no figure"
    for fig in figures:
        assert (out / fig).stat().st_size > 10_000
        assert f"]({fig})" in report, f"{fig} is not linked from the report"


def test_equivalence_every_prediction_holds(studies):
    out, report = studies("equivalence")
    spec = load_spec("equivalence", quick=True)
    assert f"**{len(spec.rows)} of {len(spec.rows)} rows agree with the prediction.**" in report
    assert "**NO**" not in report
    assert len(_csv(out)) == len(read_records(out))


def _stability_rows(out):
    from ddp_reduce.analysis.studies.stability import thresholds

    return thresholds(read_records(out))


def test_stability_thresholds_match_theory(studies):
    out, report = studies("stability")
    rows = _stability_rows(out)
    spec = load_spec("stability", quick=True)
    assert len(rows) == len(spec.modes) * (len(spec.momentum) + len(spec.nesterov))
    for t in rows:
        assert t["measured"] is not None, t
        assert 0.9 < t["measured"] / t["predicted"] < 1.1, (t["mode"], t["momentum"], t)
    assert "bracket / predicted" in report


def test_stability_nesterov_threshold_is_its_own(studies):
    out, report = studies("stability")
    rows = _stability_rows(out)
    nesterov = [t for t in rows if t["nesterov"]]
    assert nesterov and "Nesterov" in report
    for t in nesterov:
        mu, c, lam = t["momentum"], t["c"], t["lambda_max"]
        theory = 2 * (1 + mu) / (c * lam * (1 + 2 * mu))
        assert t["predicted"] == pytest.approx(theory)
        assert 0.9 < t["measured"] / theory < 1.1
        # and not the heavy-ball bound, 1 + 2 mu = 2.8 times larger
        heavy = 2 * (1 + mu) / (c * lam)
        assert t["smallest_unstable"] < heavy / 2


def test_stability_shows_its_own_blow_up_criterion(studies):
    out, report = studies("stability")
    records = read_records(out)
    # runs that completed with a loss above their initial loss: blown up, said so in the table
    completed_up = [
        r for r in records if r["summary"]["status"] == "completed" and blew_up(r["summary"])
    ]
    assert completed_up, "expected runs that completed above their initial loss"
    header = next(line for line in report.splitlines() if line.startswith("| run | status |"))
    assert "blew up" in header
    col = header.split("|").index(" blew up (NaN/inf, failed, or final > initial loss) ")
    for r in completed_up:
        line = next(row for row in report.splitlines() if row.startswith(f"| {r['name']} |"))
        assert line.split("|")[col].strip() == "yes"


def test_ragged_global_mean_is_exact_and_mean_of_means_is_biased(studies):
    out, report = studies("ragged")
    runs = out / "runs"
    assert relative_weight_difference(runs / "global_mean", runs / "reference") < 1e-5
    assert relative_weight_difference(runs / "mean_of_means", runs / "reference") > 1e-3
    # loss=mean over the step's tokens (not each micro-batch's own): accumulation is exact
    assert relative_weight_difference(runs / "accumulation", runs / "reference") < 1e-5
    assert "mean \\|g - G\\|/\\|G\\|" in report  # a '|' in a table cell is escaped


def test_ragged_micro_mean_trains_a_different_model(studies):
    out, report = studies("ragged")
    runs = out / "runs"
    exact = relative_weight_difference(runs / "global_mean", runs / "reference")
    buggy = relative_weight_difference(runs / "micro_mean", runs / "reference")
    assert buggy > 1e-3 and buggy > 100 * exact
    loss = {r["name"]: r["summary"]["final_train_loss"] for r in read_records(out)}
    assert abs(loss["micro_mean"] - loss["reference"]) > abs(
        loss["global_mean"] - loss["reference"]
    )
    assert "| micro_mean | 1 | 2 | micro_mean/mean | no |" in report
    assert re.search(r"differ from it: [^\n]*`micro_mean`", report)


def _lr_batch_groups(out):
    from ddp_reduce.analysis.studies.lr_batch import _groups

    spec = load_spec("lr_batch", quick=True)
    return spec, _groups(spec, read_records(out))


def test_lr_batch_refined_optima_agree_in_c1_units(studies):
    out, report = studies("lr_batch")
    spec, groups = _lr_batch_groups(out)
    assert len(spec.seeds) >= 3
    assert len(groups) == len(spec.seeds) * len(spec.modes) * len(spec.global_batch)
    grid_step = 10 ** (1 / spec.lr.per_decade)
    for g in groups.values():
        assert g.search is not None and g.optimum is not None, (g.seed, g.mode, g.n)
        lo, hi = g.search.bracket
        assert lo <= g.search.best <= hi
        # refined below the grid's spacing (a bracket of two grid steps to start with)
        assert hi / lo < grid_step / 2, (g.mode, g.n, lo, hi)
        assert g.optimum["summary"]["steps_to_target"] is not None
        for r in g.runs.values():  # every run took lr x c / c, and its c is the run's own
            assert r["labels"]["c"] == r["summary"]["grad_scale"]
            assert r["labels"]["lr"] * r["summary"]["grad_scale"] == pytest.approx(
                r["labels"]["lr_c1"], rel=1e-12
            )
    spreads = {}
    for seed in spec.seeds:
        for n in spec.global_batch:
            opts = [groups[(seed, m, n)].search.best for m in spec.modes]
            spreads[(seed, n)] = max(opts) / min(opts) - 1
    tol = spec.agree_within
    if all(s <= tol for s in spreads.values()):
        assert f"agree within {100 * tol:g}% at every (seed, N)" in report
    else:
        assert "do not agree" in report
    # the theory: the same steps in other units, so the same optimum
    assert all(s <= tol for s in spreads.values()), spreads


def test_lr_batch_reports_intervals_the_knee_and_b_simple(studies):
    from ddp_reduce.analysis.studies import lr_batch_report as rep
    from ddp_reduce.analysis.studies.lr_batch import optima

    out, report = studies("lr_batch")
    spec, groups = _lr_batch_groups(out)
    opt = optima(spec, groups)
    for m in spec.modes:
        for n in spec.global_batch:
            i = opt.interval(m, n)
            assert i is not None and i.n == len(spec.seeds)
            assert i.text() in report  # c = 1 units
            c = opt.c[(m, n)]
            assert f"{i.median / c:.3g} [{i.low / c:.3g}, {i.high / c:.3g}]" in report  # raw
    pooled = rep.pooled_intervals(opt)
    ns = sorted(pooled)
    falls = any(pooled[b].high < pooled[a].low for a, b in zip(ns, ns[1:], strict=False))
    assert ("**not monotonic**" in report) == falls
    assert "lr_opt(N) = lr_max/(1 + B/N)" in report
    assert "B_simple at the optimum runs" in report
    # c is a power of two here: at equal lr x c the conventions' runs are the same runs
    same = {}
    for r in _csv(out):
        same.setdefault((r["seed"], r["global_batch"], r["lr_c1"]), set()).add(
            r["final_train_loss"]
        )
    assert same and all(len(v) == 1 for v in same.values())
    assert "the same runs" in report


def test_noise_scale_best_lr_is_inside_the_lrs_tried_or_flagged(studies):
    from ddp_reduce.analysis.studies.noise_scale import searches

    out, report = studies("noise_scale")
    spec = load_spec("noise_scale", quick=True)
    found = searches(spec, read_records(out))
    assert len(spec.seeds) >= 3
    assert sorted(found) == sorted((s, n) for s in spec.seeds for n in spec.global_batch)
    for (seed, n), search in found.items():
        tried = sorted(search.scores)
        grid_edge = search.best in (min(spec.lr), max(spec.lr))
        if search.edge:
            assert re.search(rf"\| {seed} \| {n} \|[^\n]*on the {search.edge} edge", report)
        else:
            assert tried[0] < search.best < tried[-1]
        if grid_edge:  # an edge of the grid given: extended, or flagged
            assert search.extended or search.edge


def test_noise_scale_reports_three_critical_batches_with_intervals(studies):
    from ddp_reduce.analysis.report import _runs_of
    from ddp_reduce.analysis.studies.noise_scale import estimates, per_seed, searches

    out, report = studies("noise_scale")
    spec = load_spec("noise_scale", quick=True)
    runs = _runs_of(out)
    est = estimates(per_seed(spec, runs, searches(spec, runs)))
    for key in ("tradeoff", "knee", "b_simple", "b_noise"):
        i = est[key]
        assert i is not None and i.n == len(spec.seeds), key
        assert i.low <= i.median <= i.high
        assert i.text() in report, key
    # every comparison sentence follows from the intervals it names
    for b in ("b_simple", "b_noise"):
        for ref in ("tradeoff", "knee"):
            apart = not est[b].overlaps(est[ref])
            assert (f"ratio of medians {est[b].median / est[ref].median:.2g}") in report
            assert report.count("does not predict") >= int(apart)
    assert "B_noise = tr(HΣ)/(GᵀHG)" in report


def test_report_regenerates_from_the_directory(studies):
    out, first = studies("equivalence")
    (out / "report.md").unlink()
    path = write_report(out)
    assert path.read_text() == first


def test_all_failed_study_exits_non_zero_naming_the_failures(tmp_path, capsys):
    from ddp_reduce.analysis.study import main

    # an override after --quick, applied to every run: each of them is refused by the schema
    rc = main(["ragged", "--quick", "--out", str(tmp_path / "s"), "data.vocab_size=1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 of 3 runs failed" in err and "the first 3 runs all failed" in err
    assert "reference: data.vocab_size=1 is not allowed" in err
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Every run failed" in report and "## Failed runs" in report


def test_a_conflicting_override_is_refused_before_any_run(tmp_path, capsys):
    from ddp_reduce.analysis.study import main

    rc = main(["lr_batch", "--quick", "optim.lr=0.5", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "optim.lr=0.5 is not allowed" in err and "sets optim.lr in its own runs" in err
    assert not (tmp_path / "s").exists()
    # a key only the study's YAML sets (here a config group) is refused the same way
    assert main(["ragged", "--quick", "model=mlp", "--out", str(tmp_path / "t")]) == 2
    assert "the study ragged sets model" in capsys.readouterr().err


def test_precision_gives_each_seeds_threshold_and_the_median_slope(studies):
    """The arithmetic runs per seed (initial weights and items): the fp16 overflow thresholds
    per seed and the error's growth with W as a median over the seeds, each recomputed here
    from the study's rows by another route (numpy's least squares)."""
    import json
    import math
    import statistics

    import numpy as np

    out, report = studies("precision")
    spec = load_spec("precision", quick=True)
    rows = json.loads((out / "arithmetic.json").read_text())["rows"]
    seeds = sorted({r["seed"] for r in rows})
    assert seeds == sorted(spec.seeds) and len(seeds) >= 3
    # the seeds give other gradients: the largest local gradient differs between them
    amax = {r["seed"]: r["local_amax"] for r in rows if r["world"] == 2 and r["scale"] == 1.0}
    assert len(set(amax.values())) == len(seeds)
    for dtype in ("bf16", "fp16"):
        slopes = []
        for seed in seeds:
            pts = [
                (math.log(r["world"]), math.log(r["rel_error"]))
                for r in rows
                if (r["seed"], r["dtype"], r["op"], r["loss"], r["predivide"], r["scale"])
                == (seed, dtype, "mean", "mean", "full", 1.0)
            ]
            slopes.append(np.polyfit(*zip(*pts, strict=True), 1)[0])
        row = next(line for line in report.splitlines() if line.startswith(f"| {dtype} |"))
        assert f"| {statistics.median(slopes):.3g} [" in row, (row, slopes)
    # the first W that overflows, per seed, for fp16 sums without pre-division at the top scale
    top = max(spec.scales)
    firsts = []
    for seed in seeds:
        over = [
            r["world"]
            for r in rows
            if (r["seed"], r["dtype"], r["loss"], r["op"], r["predivide"], r["scale"])
            == (seed, "fp16", "sum", "mean", "none", top)
            and r["overflow"]
        ]
        firsts.append(str(min(over)) if over else "-")
    cell = firsts[0] if len(set(firsts)) == 1 else " / ".join(firsts)
    assert any(
        line.startswith("| sum/mean | none |") and line.rstrip().endswith(f"| {cell} |")
        for line in report.splitlines()
        if f"| {top:.3g} |" in line
    ), cell
