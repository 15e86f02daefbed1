"""The studies' machinery without training: searches, fits, progress, command line, reports."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import yaml

from ddp_reduce.analysis.studies import minimize_log


def _bowl(opt: float, width: float = 1.0):
    calls = []

    def f(x: float) -> float:
        calls.append(x)
        return 1 + ((math.log(x) - math.log(opt)) / width) ** 2

    return f, calls


def test_golden_section_refines_between_grid_points():
    f, calls = _bowl(0.3)
    grid = [0.01, 0.1, 1.0, 10.0]
    out = minimize_log(f, grid, rounds=12)
    lo, hi = out.bracket
    assert lo <= 0.3 <= hi and hi / lo < 1.05
    assert out.best == pytest.approx(0.3, rel=0.02)
    assert out.edge is None and out.rounds == 12
    assert len(calls) == len(grid) + 12  # one probe per round, none repeated


def test_an_edge_is_extended_then_flagged():
    f, calls = _bowl(50.0)
    out = minimize_log(f, [0.1, 1.0], extend=1)
    assert out.extended == 1 and out.edge == "high" and out.best == 10.0
    assert out.bracket == (1.0, None)
    out = minimize_log(f, [0.1, 1.0], extend=3, rounds=4)
    assert out.extended == 3 and out.edge is None  # 10, 100 (the best), 1000
    assert out.bracket[0] < 50.0 < out.bracket[1]


def test_a_blown_up_probe_is_worse_than_any_finite_one():
    def f(x):  # better and better, until it blows up above 1
        return math.inf if x > 1 else 1 / x

    out = minimize_log(f, [0.01, 0.1, 1.0, 10.0], rounds=8)
    assert out.edge is None and out.best == 1.0
    assert out.bracket[0] < 1.0 < out.bracket[1] < 10.0


def test_tuple_scores_and_replay_give_the_same_search():
    rng = random.Random(0)
    table = {}

    def f(x):
        table[x] = (rng.random() < 0.3, rng.random())
        return table[x]

    first = minimize_log(f, [0.01, 0.1, 1.0], extend=2, rounds=5)
    again = minimize_log(lambda x: table[x], [0.01, 0.1, 1.0], extend=2, rounds=5)
    assert again == first


def test_knee_fit_recovers_the_curve_and_its_uncertainty():
    from ddp_reduce.analysis.studies.lr_batch import fit_knee

    ns = (1, 4, 16, 64, 256, 1024)
    exact = fit_knee([(n, 0.8 / (1 + 50 / n)) for n in ns])
    assert exact.lr_max == pytest.approx(0.8, rel=0.01) and exact.b == pytest.approx(50, rel=0.01)
    assert exact.se_log_b == pytest.approx(0, abs=0.01) and not exact.at_bound
    rng = random.Random(1)
    noisy = fit_knee([(n, 0.8 / (1 + 50 / n) * math.exp(rng.gauss(0, 0.1))) for n in ns])
    low, high = noisy.b_range()
    assert 0 < noisy.se_log_b < 1 and low < noisy.b < high
    assert low < 50 * 1.5 and high > 50 / 1.5
    two = fit_knee([(1, 0.1), (100, 0.5)])
    assert two.b_range() is None  # an exact fit through two points
    flat = fit_knee([(n, 0.5) for n in ns])
    assert flat.at_bound  # no knee in the data


def test_critical_batch_fit():
    from ddp_reduce.analysis.critical_batch import fit_tradeoff

    fit = fit_tradeoff([(n, 20 * (1 + 100 / n)) for n in (8, 32, 128, 512)])
    assert fit.s_min == pytest.approx(20, rel=1e-5) and fit.b_crit == pytest.approx(100, rel=1e-5)


def test_progress_prints_one_line_per_run_with_an_eta():
    from ddp_reduce.analysis.study import Progress

    stream = io.StringIO()
    p = Progress("demo", planned=2, stream=stream)
    p.update("a", {"status": "completed", "final_train_loss": 0.5}, 1.0)
    p.update("b", {"status": "failed", "error": "boom\ntraceback"}, 0.1)
    p.update("c", {"status": "diverged"}, 0.1)  # more than planned: the total grows
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("  [1/2] a: completed, loss 0.5 (1.0 s)") and "ETA" in lines[0]
    assert "[2/2] b: failed: boom" in lines[1] and "traceback" not in lines[1]
    assert "[3/3] c: diverged" in lines[2] and lines[2].endswith("ETA 0 s")


def test_overrides_before_and_after_options():
    from ddp_reduce.analysis.study import parse_args

    a = parse_args(["lr_batch", "a.b=1", "--quick", "c=2", "--out", "x", "+d=3"])
    assert a.name == "lr_batch" and a.quick and str(a.out) == "x"
    assert a.overrides == ["a.b=1", "c=2", "+d=3"]


def test_study_keys_cover_the_yaml_and_the_module():
    from ddp_reduce.analysis import study
    from ddp_reduce.analysis.studies import lr_batch

    keys = study.study_keys(study.load_spec("lr_batch", quick=True), lr_batch)
    assert {"optim.lr", "data.batch_size", "model", "noise.beta", "train.progress"} <= keys
    assert "dist.device" not in keys and "data.data_seed" not in keys
    assert study.override_key("+model.hidden=[8]") == "model.hidden"
    assert study.override_key("optim=adam") == "optim"


def test_a_sweep_report_names_runs_by_what_was_swept(tmp_path):
    from ddp_reduce.analysis.report import write_report

    points = [("sum", "0.01"), ("sum", "0.1"), ("mean", "0.01"), ("mean", "0.1")]
    for i, (op, lr) in enumerate(points):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(["dist.nproc=2", f"reduce.op={op}", f"optim.lr={lr}"])
        )
        summary = {"status": "completed", "reduce_loss": "mean", "reduce_op": op}
        # the b*A-items figure and what the steps measured (a range where counts varied)
        c = {"grad_scale": 16.0, "grad_scale_range": [227.0, 269.0] if i == 0 else [16.0, 16.0]}
        (run / "summary.json").write_text(json.dumps({**summary, **c, "final_train_loss": 0.5}))
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
        )
    text = write_report(tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert header.startswith("| run | reduce.op | optim.lr | status |")
    assert "dist.nproc" not in header  # the same in every run: not swept
    assert "| reduce.op=mean optim.lr=0.1 | mean | 0.1 | completed |" in text
    assert "| 227 to 269 |" in text and text.count("| 16 |") == 3  # the c column
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("name,optim.lr,reduce.op,")
    assert rows[1].startswith("reduce.op=sum optim.lr=0.01,0.01,sum,")


def test_bench_warns_on_a_loaded_machine():
    from ddp_reduce.analysis.bench import load_warning

    assert load_warning(cores=4, load=1.0) is None
    warning = load_warning(cores=2, load=3.0)
    assert warning and "1.50 per core" in warning and "2 cores" in warning


class _StepsToTarget:
    """A stand-in for training in lr_batch's searches: a probe at lr x c reaches the target after
    a number of steps that is a bowl in log lr x c around an optimum that grows with N, or never
    (too small or too large an lr). It honours train.steps as a run does: a run stopped before
    the target reports its loss at that step. It records the steps each probe ran."""

    def __init__(self, common, rng):
        self.common, self.rng, self.records, self.bowls = common, rng, [], {}

    def needed(self, seed, n, lr_c1):
        opt, floor = self.bowls.setdefault(
            (seed, n), (0.1 * (1 + n / 16) * self.rng.uniform(0.7, 1.4), self.rng.randint(20, 60))
        )
        d = abs(math.log(lr_c1 / opt))
        return None if d > 2.5 else 5 * round((floor * math.exp(1.2 * d)) / 5)

    def run(self, name, overrides, **labels):
        steps = int(next(o for o in overrides if o.startswith("train.steps="))[12:])
        need = self.needed(labels["seed"], labels["global_batch"], labels["lr_c1"])
        ran = steps if need is None or need > steps else need
        loss = 2.0 / (1 + ran * min(labels["lr_c1"], 1.0))
        summary = {"status": "completed", "final_train_loss": loss, "initial_train_loss": 2.3}
        summary["steps_to_target"] = ran if ran == need else None
        summary["steps_done"] = ran
        self.records.append({"name": name, "labels": labels, "summary": summary})
        return summary


def test_lr_batch_stops_a_probe_at_the_best_steps_and_finds_the_full_budgets_optimum():
    from ddp_reduce.analysis.studies import lr_batch
    from ddp_reduce.analysis.study import load_spec

    spec = load_spec("lr_batch", quick=False)
    spec.seeds, spec.global_batch = [0, 1], [4, 64, 1024]
    sim = _StepsToTarget([], random.Random(3))
    lr_batch.run(spec, sim)
    groups = lr_batch._groups(spec, sim.records)
    capped = [r for r in sim.records if r["labels"]["steps"] < spec.max_steps]
    assert capped  # the cap was used
    for r in sim.records:  # never a probe beyond the best so far (nor beyond the budget)
        assert r["summary"]["steps_done"] <= r["labels"]["steps"] <= spec.max_steps
    for (seed, mode, n), g in groups.items():

        def full(lr_c1, seed=seed, n=n):  # the same search with every probe given the budget
            need = sim.needed(seed, n, lr_c1)
            if need is None or need > spec.max_steps:
                return (1, 0, 2.0 / (1 + spec.max_steps * min(lr_c1, 1.0)))
            return (0, need, 2.0 / (1 + need * min(lr_c1, 1.0)))

        ref = lr_batch.minimize_log(
            full, lr_batch._grid(spec), extend=spec.extend, rounds=spec.refine_rounds
        )
        assert g.search is not None and g.optimum is not None, (seed, mode, n)
        assert (g.search.best, g.search.bracket) == (ref.best, ref.bracket), (seed, mode, n)
        assert set(g.runs) == set(ref.scores)  # the same probes, whatever their order
    # every convention probed in the same order with the same caps: the same runs
    for seed in spec.seeds:
        for n in spec.global_batch:
            runs = [
                [(x, r["labels"]["steps"]) for x, r in groups[(seed, m, n)].runs.items()]
                for m in spec.modes
            ]
            assert all(r == runs[0] for r in runs), (seed, n)
