"""B_noise from Hessian-vector products against closed forms, the trade-off fit on synthetic
S(N), and the shared bootstrap interval."""

import math
import random

import numpy as np
import pytest
import torch

from ddp_reduce.analysis.critical_batch import fit_tradeoff
from ddp_reduce.analysis.hessian_noise import hessian_noise, model_hessian_noise
from ddp_reduce.analysis.intervals import bootstrap, median_interval

TOL = 1e-6


def _quadratic(a_matrix: np.ndarray, centres: np.ndarray, w: np.ndarray, **kw):
    """loss_i(w) = ½ (w − a_i)ᵀ A (w − a_i): g_i = A(w − a_i), H = A."""
    a_t = torch.tensor(a_matrix, dtype=torch.float64)

    def item_loss(p, a_i):
        d = p["w"] - a_i
        return 0.5 * d @ a_t @ d

    params = {"w": torch.tensor(w, dtype=torch.float64)}
    return hessian_noise(item_loss, params, (torch.tensor(centres, dtype=torch.float64),), **kw)


def _closed(a_matrix, centres, w):
    """tr(HΣ), GᵀHG, tr(Σ), |G|² of the quadratic: Σ = A C A, G = A(w − ā)."""
    cov = np.cov(centres.T, bias=True).reshape(len(w), len(w))
    d = w - centres.mean(0)
    a2, a3 = a_matrix @ a_matrix, a_matrix @ a_matrix @ a_matrix
    return np.trace(a3 @ cov), d @ a3 @ d, np.trace(a2 @ cov), d @ a2 @ d


def test_b_noise_equals_b_simple_when_the_hessian_is_a_multiple_of_identity():
    rng = np.random.default_rng(0)
    centres, w = rng.normal(size=(40, 5)), rng.normal(size=5) + 2.0
    got = _quadratic(3.0 * np.eye(5), centres, w)
    t_hs, ghg, t_s, g2 = _closed(3.0 * np.eye(5), centres, w)
    assert got.b_noise == pytest.approx(got.b_simple, rel=TOL)
    assert got.b_simple == pytest.approx(t_s / g2, rel=TOL)
    assert got.trace_h_sigma == pytest.approx(t_hs, rel=TOL)
    assert got.g_h_g == pytest.approx(ghg, rel=TOL)


def test_b_noise_differs_from_b_simple_by_the_known_curvature_ratio():
    # noise only along e1 (curvature 8), the mean gradient only along e2 (curvature 0.5):
    # B_noise / B_simple = 8 / 0.5 = 16
    rng = np.random.default_rng(1)
    centres = np.zeros((30, 2))
    centres[:, 0] = rng.normal(size=30)
    centres[:, 0] -= centres[:, 0].mean()
    w = np.array([0.0, 1.5])
    got = _quadratic(np.diag([8.0, 0.5]), centres, w)
    assert got.b_noise / got.b_simple == pytest.approx(16.0, rel=TOL)
    t_hs, ghg, t_s, g2 = _closed(np.diag([8.0, 0.5]), centres, w)
    assert got.b_noise == pytest.approx(t_hs / ghg, rel=TOL)


def test_a_general_quadratic_matches_its_closed_form():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(6, 6))
    a_matrix = m @ m.T + 0.5 * np.eye(6)
    centres, w = rng.normal(size=(50, 6)), rng.normal(size=6)
    got = _quadratic(a_matrix, centres, w, chunk=7)
    t_hs, ghg, t_s, g2 = _closed(a_matrix, centres, w)
    for value, ref in ((got.trace_h_sigma, t_hs), (got.g_h_g, ghg)):
        assert value == pytest.approx(ref, rel=TOL)
    assert (got.trace_sigma, got.grad_sq) == pytest.approx((t_s, g2), rel=TOL)
    assert got.se_trace_h_sigma == 0.0 and got.sampled == 50


def test_a_sample_of_items_estimates_the_trace_within_its_standard_error():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(4, 4))
    a_matrix = m @ m.T + np.eye(4)
    centres, w = rng.normal(size=(400, 4)), rng.normal(size=4)
    exact = _quadratic(a_matrix, centres, w)
    part = _quadratic(a_matrix, centres, w, sample=100, seed=5)
    assert part.sampled == 100 and part.se_trace_h_sigma > 0
    assert abs(part.trace_h_sigma - exact.trace_h_sigma) < 4 * part.se_trace_h_sigma
    assert part.g_h_g == pytest.approx(exact.g_h_g, rel=TOL)  # one product: always exact


def test_the_project_linear_model_matches_least_squares_closed_form():
    from ddp_reduce.config import load_config
    from ddp_reduce.data import load_dataset
    from ddp_reduce.models import build_model
    from tests.helpers import config_dict

    cfg = load_config(config_dict("data=linear", "model=linear"))
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data).double()
    split = data.train
    split.x, split.y = split.x.double(), split.y.double()
    got = model_hessian_noise(model, data.task, split)
    x = split.x.numpy()
    f = np.hstack([x, np.ones((len(x), 1))])
    r = x @ model.weight.detach().numpy()[0] + float(model.bias.detach()) - split.y.numpy()
    h = f.T @ f / len(x)  # loss_i = ½ r_i², g_i = r_i f_i
    g = f.T @ r / len(x)
    second = np.mean(r**2 * np.einsum("ij,jk,ik->i", f, h, f))
    assert got.g_h_g == pytest.approx(g @ h @ g, rel=TOL)
    assert got.trace_h_sigma == pytest.approx(second - g @ h @ g, rel=TOL)


def test_tradeoff_fit_recovers_b_crit_from_noisy_steps():
    rng = random.Random(0)
    s_min, b_crit = 180.0, 96.0
    ns = [8, 16, 32, 64, 128, 256, 512, 1024]
    for trial in range(5):
        noisy = [(n, s_min * (1 + b_crit / n) * math.exp(rng.gauss(0, 0.03))) for n in ns]
        fit = fit_tradeoff(noisy)
        assert fit is not None and not fit.at_bound
        assert fit.b_crit == pytest.approx(b_crit, rel=0.05), trial
        assert fit.s_min == pytest.approx(s_min, rel=0.05)
    exact = fit_tradeoff([(n, s_min * (1 + b_crit / n)) for n in ns])
    assert exact.b_crit == pytest.approx(b_crit, rel=1e-5)
    # the hyperbola: (S/S_min − 1)(E/E_min − 1) = 1 at every N
    for n in ns:
        s, e = exact.steps(n), exact.examples(n)
        assert (s / exact.s_min - 1) * (e / exact.e_min - 1) == pytest.approx(1.0, rel=1e-9)


def test_tradeoff_fit_flags_a_critical_batch_beyond_the_points():
    # perfect scaling at every N tried: B_crit is beyond them, at the end of the range searched
    fit = fit_tradeoff([(n, 1e6 / n) for n in (8, 16, 32)])
    assert fit.at_bound
    assert fit_tradeoff([(8, 100.0)]) is None


def test_median_interval_and_bootstrap():
    # an outlier moves the median of a resample only when half the resample is the outlier
    i = median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1000.0])
    assert i.median == 5.5 and i.low <= 5.5 <= i.high and i.high < 100.0
    assert median_interval([5.0, 5.0, 5.0]).text() == "5 [5, 5]"
    b = bootstrap(lambda xs: sum(xs) / len(xs), [1.0, 2.0, 3.0])
    assert b.low >= 1.0 and b.high <= 3.0 and b.median == 2.0
    assert bootstrap(lambda xs: None, [1.0]) is None
