"""The online gradient noise scale against exact values computed another way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddp_reduce.analysis.noise_truth import exact_noise, linear_noise
from ddp_reduce.config import load_config
from ddp_reduce.data import load_dataset
from ddp_reduce.layer.noise import NoiseScaleEstimator
from ddp_reduce.models import build_model
from ddp_reduce.run.launch import rank_main
from tests.helpers import config, config_dict, spawn, train_runs


def _population(n=100, dim=10, seed=0):
    """A small population (so sampling without replacement matters) with B_simple ≈ 25."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, dim)) * 2.0 + 0.4
    mean = g.mean(0)
    grad_sq = float(mean @ mean)
    trace = float(((g - mean) ** 2).sum(1).mean())
    return g, grad_sq, trace


@pytest.mark.parametrize("correct", [True, False])
def test_estimator_recovers_a_known_population(correct):
    """Two 'ranks' of B_s items each, drawn without replacement, as the sampler draws them."""
    g, grad_sq, trace = _population()
    n, bs = len(g), 10
    est = NoiseScaleEstimator(beta=0.999, population=n if correct else None)
    rng = np.random.default_rng(1)
    for _ in range(20000):
        idx = rng.permutation(n)[: 2 * bs]
        small = [g[idx[:bs]].mean(0), g[idx[bs:]].mean(0)]
        big = g[idx].mean(0)
        small_sq = float(np.mean([s @ s for s in small]))
        out = est.update(bs, 2 * bs, small_sq, float(big @ big))
    assert out.trace_sigma == pytest.approx(trace, rel=0.05)
    if correct:
        assert out.grad_sq == pytest.approx(grad_sq, rel=0.05)
        assert out.b_simple == pytest.approx(trace / grad_sq, rel=0.08)
    else:
        # without the finite-population correction |G|² is low by about tr(Σ)/(n - 1)
        assert out.grad_sq == pytest.approx(grad_sq - trace / (n - 1), rel=0.05)
        assert out.grad_sq < 0.9 * grad_sq


def test_linear_closed_form_matches_per_example_gradients():
    cfg = load_config(config_dict("data=linear", "model=linear"))
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data)
    closed = linear_noise(
        data.train.x.numpy(),
        data.train.y.numpy(),
        model.weight.detach().numpy()[0],
        float(model.bias.detach()),
    )
    exact = exact_noise(model, data.task, data.train)
    assert closed.grad_sq == pytest.approx(exact.grad_sq, rel=1e-5)
    assert closed.trace_sigma == pytest.approx(exact.trace_sigma, rel=1e-5)


CHECK = (
    "optim.momentum=0",
    "train.eval_every=0",
    "train.keep_checkpoints=10",
    "noise.steps=every",  # the estimator itself, on every step: its default is logged steps
)
RUNS = {
    # name: (overrides, checkpoints every, tolerance from the issue)
    "linear": (
        (
            "data=linear",
            "model=linear",
            "data.batch_size=32",
            "optim.lr=1e-4",
            "noise.beta=0.99",
            "train.steps=600",
        ),
        300,
        0.10,
    ),
    "digits": (
        ("data.batch_size=64", "optim.lr=0.001", "noise.beta=0.995", "train.steps=600"),
        300,
        0.15,
    ),
}


@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    jobs, cfgs = [], {}
    for name, (overrides, every, _) in RUNS.items():
        cfgs[name] = config_dict(
            *CHECK, *overrides, f"train.checkpoint_every={every}", f"train.log_every={every}"
        )
        jobs.append((cfgs[name], str(root / name)))
    spawn(train_runs, 2, root, jobs)
    return root, cfgs


@pytest.mark.parametrize("name", list(RUNS))
def test_online_estimate_matches_the_exact_noise_scale(noise_runs, name):
    root, cfgs = noise_runs
    run, tol = root / name, RUNS[name][2]
    cfg = load_config(cfgs[name])
    data = load_dataset(cfg.data)
    logged = {
        x["step"]: x
        for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "noise/b_simple" in x
    }
    checkpoints = sorted((run / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        state = torch.load(path)
        model = build_model(cfg.model, data)
        model.load_state_dict(state["model"])
        if name == "linear":  # the closed form
            truth = linear_noise(
                data.train.x.numpy(),
                data.train.y.numpy(),
                model.weight.detach().numpy()[0],
                float(model.bias.detach()),
            )
        else:  # per-example gradients over the whole training set
            truth = exact_noise(model, data.task, data.train)
        est = logged[state["step"]]["noise/b_simple"]
        assert est == pytest.approx(truth.b_simple, rel=tol), (state["step"], est, truth)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["noise_scale"]["small_batch_from"] == "ranks"


def test_one_batch_size_reports_why_there_is_no_estimate(tmp_path):
    summary = rank_main(config("train.steps=5", "dist.nproc=1"), str(tmp_path / "a"))
    assert summary.noise_scale is None
    assert "W >= 2 or train.accum_steps >= 2" in summary.noise_unavailable
    summary = rank_main(
        config("train.steps=5", "train.accum_steps=2", "data.batch_size=16"),
        str(tmp_path / "b"),
    )
    assert summary.noise_scale["small_batch_from"] == "micro"
    assert summary.noise_scale["b_simple"] > 0
