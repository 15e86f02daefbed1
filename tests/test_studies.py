"""Each study's quick variant, run for real: the numbers must say what the theory says."""

from __future__ import annotations

import csv
import math

import pytest

from ddp_reduce.analysis.report import read_records, write_report
from ddp_reduce.analysis.studies import relative_weight_difference
from ddp_reduce.analysis.study import load_spec, run_study


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


def test_equivalence_every_prediction_holds(studies):
    out, report = studies("equivalence")
    spec = load_spec("equivalence", quick=True)
    assert f"**{len(spec.rows)} of {len(spec.rows)} rows agree with the prediction.**" in report
    assert "**NO**" not in report
    assert len(_csv(out)) == len(read_records(out))


def test_stability_thresholds_match_theory(studies):
    out, report = studies("stability")
    records = read_records(out)
    groups = {}
    for r in records:
        groups.setdefault((r["labels"]["mode"], r["labels"]["momentum"]), []).append(r)
    assert len(groups) == 6
    for (mode, mu), group in groups.items():
        from ddp_reduce.analysis.studies import blew_up

        stable = [r["labels"]["lr"] for r in group if not blew_up(r["summary"])]
        unstable = [r["labels"]["lr"] for r in group if blew_up(r["summary"])]
        predicted = group[0]["labels"]["predicted"]
        measured = math.sqrt(max(stable) * min(unstable))
        assert 0.9 < measured / predicted < 1.1, (mode, mu, measured, predicted)
    assert "bracket / predicted" in report


def test_ragged_global_mean_is_exact_and_mean_of_means_is_biased(studies):
    out, report = studies("ragged")
    runs = out / "runs"
    assert relative_weight_difference(runs / "global_mean", runs / "reference") < 1e-5
    assert relative_weight_difference(runs / "mean_of_means", runs / "reference") > 1e-3
    # loss=mean over the step's tokens (not each micro-batch's own): accumulation is exact
    assert relative_weight_difference(runs / "accumulation", runs / "reference") < 1e-5
    assert "mean \\|g - G\\|/\\|G\\|" in report  # a '|' in a table cell is escaped
    assert "accumulation bug" in report


def test_lr_batch_optimum_is_the_same_step_in_c1_units(studies):
    out, report = studies("lr_batch")
    rows = [r for r in _csv(out)]
    assert (out / "lr_vs_batch.png").stat().st_size > 10_000
    # at N=1 every convention has c = 1: identical runs
    n1 = {}
    for r in rows:
        if r["global_batch"] == "1":
            n1.setdefault(r["lr"], set()).add(r["final_train_loss"])
    assert n1 and all(len(v) == 1 for v in n1.values())
    assert "optimum lr x c" in report and "lr_opt(N) = lr_max/(1 + B/N)" in report


def test_noise_scale_report_has_the_fit_inputs(studies):
    out, report = studies("noise_scale")
    assert (out / "noise_scale.png").exists()
    assert "steps to target" in report
    assert "B_simple over the second half of the trace run" in report


def test_report_regenerates_from_the_directory(studies):
    out, first = studies("equivalence")
    (out / "report.md").unlink()
    path = write_report(out)
    assert path.read_text() == first


def test_analysis_fits_recover_known_curves():
    from ddp_reduce.analysis.studies.lr_batch import fit_knee, interpolated_optimum
    from ddp_reduce.analysis.studies.noise_scale import fit_critical_batch

    # a parabola in log-log sampled on a decade grid: the vertex is found between grid points
    pts = [(lr, math.exp((math.log(lr) - math.log(0.3)) ** 2)) for lr in (0.01, 0.1, 1.0, 10.0)]
    assert interpolated_optimum(pts) == pytest.approx(0.3, rel=1e-9)
    assert interpolated_optimum([(0.1, 1.0), (1.0, 2.0)]) == 0.1  # at the edge: the grid point
    lr_max, b = fit_knee([(n, 0.8 / (1 + 50 / n)) for n in (1, 4, 16, 64, 256, 1024)])
    assert lr_max == pytest.approx(0.8, rel=0.01) and b == pytest.approx(50, rel=0.05)
    s_min, b_crit = fit_critical_batch([(n, 20 * (1 + 100 / n)) for n in (8, 32, 128, 512)])
    assert s_min == pytest.approx(20) and b_crit == pytest.approx(100)
