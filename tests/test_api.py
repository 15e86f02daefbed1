"""The public API (``ddp_reduce.attach``) in a real gloo group: c·G for every pair, ragged
counts, accumulation, and reductions that stay exact whatever the gradients' dtype."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_reduce
from ddp_reduce.config import DistConfig
from ddp_reduce.distributed import distributed
from tests.helpers import PAIRS as PAIRS_AND_C
from tests.helpers import W, assert_close, spawn

PAIRS = [(loss, op) for loss, op, _ in PAIRS_AND_C]


def _data(n: int, dtype=torch.float64, scale: float = 1.0):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, 6, generator=g) * scale).to(dtype), torch.randn(n, generator=g).to(dtype)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


def _item_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def _reference(counts: list[int], accum: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """G over all items in one process (float64), and each rank's local mean gradient."""
    x, y = _data(sum(counts))
    model = _model(torch.float64)
    _item_losses(model, x, y).mean().backward()
    g = _flat_grad(model)
    local, start = [], 0
    for n in counts:
        model.zero_grad()
        _item_losses(model, x[start : start + n], y[start : start + n]).mean().backward()
        local.append(_flat_grad(model))
        start += n
    return g, local


def _api_job(init: str, cases: list[tuple], counts: list[int], accum: int) -> list[dict]:
    """Every rank: for each (loss, op, give_counts), one step through the public API."""
    out = []
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        x, y = _data(sum(counts), torch.float32)
        start = sum(counts[: ctx.rank])
        mine = slice(start, start + counts[ctx.rank])
        for loss, op, give_counts in cases:
            model = DDP(_model())
            reducer = ddp_reduce.attach(model, loss=loss, op=op)
            local = counts[ctx.rank]
            scale = reducer.loss_scale(local, counts=counts if give_counts else None)
            parts = torch.tensor_split(torch.arange(mine.start, mine.stop), accum)
            for a, idx in enumerate(parts):
                with reducer.micro_batch(last=a == accum - 1):
                    (_item_losses(model, x[idx], y[idx]).sum() * scale).backward()
            report = reducer.last_step
            out.append(
                {
                    "grad": _flat_grad(model.module),
                    "c": report.c,
                    "exact": report.exact,
                    "global_items": report.global_items,
                    "route": report.route.name,
                }
            )
            del model
    return out


def _cases():
    return [(loss, op, give) for loss, op in PAIRS for give in (True, False)]


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    return spawn(_api_job, W, tmp_path_factory.mktemp("api"), _cases(), [8, 8], 2)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    return spawn(_api_job, W, tmp_path_factory.mktemp("api"), _cases(), [5, 11], 1)


EXPECTED_C = {  # equal counts of 8: W = 2, b·A = 8, N = 16
    ("mean", "mean"): 1,
    ("mean", "sum"): W,
    ("sum", "mean"): 8,
    ("sum", "sum"): 16,
    ("sum", "global_mean"): 1,
}


@pytest.mark.parametrize(
    "i", range(len(_cases())), ids=[f"{lo}-{op}-{g}" for lo, op, g in _cases()]
)
def test_public_api_gives_c_times_G(equal, i):
    loss, op, _ = _cases()[i]
    g, _ = _reference([8, 8])
    for rank in equal:
        r = rank[i]
        assert r["c"] == EXPECTED_C[(loss, op)] and r["exact"] and r["global_items"] == 16
        assert_close(r["grad"], r["c"] * g)


@pytest.mark.parametrize(
    "i", range(len(_cases())), ids=[f"{lo}-{op}-{g}" for lo, op, g in _cases()]
)
def test_public_api_with_ragged_counts(ragged, i):
    loss, op, _ = _cases()[i]
    g, local = _reference([5, 11])
    for rank in ragged:
        r = rank[i]
        assert r["global_items"] == 16
        if loss == "sum":  # exact whatever the counts: c = N_t/divisor
            assert r["exact"] and r["c"] == {"sum": 16, "mean": 8, "global_mean": 1}[op]
            assert_close(r["grad"], r["c"] * g)
        else:  # a mean of means: no single c, and the report says so
            assert not r["exact"]
            assert_close(r["grad"], sum(local) / (W if op == "mean" else 1))


def test_the_route_is_ddp_own_where_the_arithmetic_is_and_a_hook_elsewhere(equal):
    routes = {case[:2] + (case[2],): r["route"] for case, r in zip(_cases(), equal[0], strict=True)}
    assert routes[("mean", "mean", True)] == "ddp_builtin"
    assert routes[("sum", "sum", True)] == "ddp_builtin"  # W folded into the loss scale
    assert routes[("sum", "global_mean", True)] == "ddp_builtin"  # W/N_t folded: counts known
    assert routes[("sum", "global_mean", False)] == "hook"  # the count arrives during the step


def _dtype_job(init: str, dtype_name: str, counts: list[int], scale: float) -> dict:
    """sum/global_mean and the noise norms with low-precision parameters (and gradients)."""
    dtype = getattr(torch, dtype_name)
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        x, y = _data(sum(counts), torch.float32, scale)
        start = sum(counts[: ctx.rank])
        xs, ys = x[start : start + counts[ctx.rank]].to(dtype), y[start : start + counts[ctx.rank]]
        model = DDP(_model(dtype))
        reducer = ddp_reduce.attach(model, loss="sum", op="global_mean", noise=True)
        s = reducer.loss_scale(counts[ctx.rank])  # the count is learned in float64
        with reducer.micro_batch(last=True):
            (_item_losses(model, xs, ys.to(dtype)).float().sum() * s).backward()
        report = reducer.last_step
        local = _flat_grad(model.module)
        ranks_sq = report.ranks_sq_mean * ctx.world_size
        dist.barrier()
        return {
            "grad": local,
            "global_items": report.global_items,
            "c": report.c,
            "local_sq": float(report.local_sq),
            "ranks_sq": float(ranks_sq),
        }


def _low_precision_reference(dtype, counts, scale):
    """Each rank's gradient in the low precision, combined in float64 as an exact reduction."""
    x, y = _data(sum(counts), torch.float32, scale)
    grads, start = [], 0
    for n in counts:
        model = _model(dtype)
        xs, ys = x[start : start + n].to(dtype), y[start : start + n].to(dtype)
        _item_losses(model, xs, ys).float().sum().backward()
        grads.append(_flat_grad(model))
        start += n
    total = sum(counts)
    local_sq = [float((g / n).pow(2).sum()) for g, n in zip(grads, counts, strict=True)]
    return sum(grads) / total, local_sq


@pytest.mark.parametrize(
    "dtype,counts,scale",
    [("bfloat16", [300, 301], 1.0), ("float16", [35000, 35001], 0.05)],
    ids=["bf16-601-items", "fp16-70001-items"],
)
def test_counts_and_norms_stay_exact_in_low_precision(tmp_path, dtype, counts, scale):
    results = spawn(_dtype_job, W, tmp_path, dtype, counts, scale)
    expected, local_sq = _low_precision_reference(getattr(torch, dtype), counts, scale)
    for r in results:
        assert r["global_items"] == sum(counts) and r["c"] == 1  # 601 is 601, 70001 is 70001
        assert r["grad"].abs().max() > 0, "the gradient must not vanish"
        # the received gradient is stored in the model's dtype: its rounding is the tolerance
        assert_close(r["grad"], expected, 1e-2)
        assert r["ranks_sq"] == pytest.approx(sum(local_sq), rel=1e-2)
    # the squared norms exceed what fp16 holds (65504) and still come back finite
    if dtype == "float16":
        assert max(local_sq) * (sum(counts) / 2) ** 2 > 65504


def _refusal_job(init: str, kwargs: list[dict]) -> list[str | None]:
    """Every rank: attach with each set of keywords; the error it raised, None if none."""
    out = []
    with distributed(DistConfig(threads_per_rank=1), init):
        for kw in kwargs:
            try:
                ddp_reduce.attach(DDP(_model()), **kw)
                out.append(None)
            except ValueError as exc:
                out.append(str(exc))
    return out


def test_ddps_own_path_refuses_what_it_cannot_do(tmp_path):
    # DDP's C++ mean casts nothing and divides before its all-reduce: asked for another dtype
    # or another placement of the division, attach says so rather than ignoring it
    cases = [
        {"impl": "builtin", "dtype": "bf16"},
        {"impl": "builtin", "predivide": "sqrt"},
        {"impl": "builtin", "predivide": 4.0},
        {"impl": "builtin", "op": "sum"},
        {"impl": "builtin"},
        {"impl": "hook", "dtype": "bf16", "predivide": "sqrt"},
    ]
    (errors,) = spawn(_refusal_job, 1, tmp_path, cases)
    assert errors[0] is not None and "dtype=bf16" in errors[0] and "fp32" in errors[0]
    assert errors[1] is not None and "predivide=sqrt" in errors[1] and "full" in errors[1]
    assert errors[2] is not None and "predivide=4.0" in errors[2]
    assert errors[3] is not None and "reduce.op=mean" in errors[3]
    assert errors[4:] == [None, None]


def _micro_mean_job(init: str, splits: list[list[int]]) -> list[tuple[float, bool]]:
    """Every rank: one micro_mean step per micro-batch split, the counts not given (they are
    all-reduced during the step); what the reduction reported: (c, exact)."""
    out = []
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        for micro in splits:
            x, y = _data(W * sum(micro), torch.float32)
            model = DDP(_model())
            reducer = ddp_reduce.attach(model, loss="micro_mean", op="mean")
            scales = reducer.loss_scales(micro)
            start = ctx.rank * sum(micro)
            for a, (n, scale) in enumerate(zip(micro, scales, strict=True)):
                rows = slice(start + sum(micro[:a]), start + sum(micro[:a]) + n)
                with reducer.micro_batch(last=a == len(micro) - 1):
                    (_item_losses(model, x[rows], y[rows]).sum() * scale).backward()
            out.append((reducer.last_step.c, reducer.last_step.exact))
    return out


def test_micro_mean_learns_whether_every_micro_batch_was_equal(tmp_path):
    # the ranks' totals are equal in both; the micro-batches only in the first
    ranks = spawn(_micro_mean_job, W, tmp_path, [[4, 4], [3, 3, 2]])
    for r in ranks:
        assert r == [(1.0, True), (1.0, False)], r


# -- what the API refuses because it would be silently wrong ---------------------------------


def _raised(fn) -> str | None:
    """The error ``fn()`` raised (its type and message), None if it returned."""
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _step(model, reducer, x, y, parts, scale=None) -> None:
    """One step's micro-batches (``parts``: index tensors) through DDP, summed losses."""
    for a, idx in enumerate(parts):
        with reducer.micro_batch(last=a == len(parts) - 1):
            loss = _item_losses(model, x[idx], y[idx]).sum()
            (loss * scale if scale is not None else loss).backward()


def _guard_job(init: str, counts: list[int]) -> dict:
    """Every rank: each misuse of the API on a fresh model; what it raised."""
    out = {}
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        x, y = _data(sum(counts), torch.float32)
        local = counts[ctx.rank]
        mine = torch.arange(sum(counts[: ctx.rank]), sum(counts[: ctx.rank + 1]))

        def fresh(loss="sum", op="global_mean"):
            return (m := DDP(_model())), ddp_reduce.attach(m, loss=loss, op=op)

        for name, arg in [("negative", -3), ("fraction", 2.5), ("nan", float("nan"))]:
            out[name] = _raised(lambda a=arg: fresh()[1].loss_scale(a))
        out["global_below_local"] = _raised(lambda: fresh()[1].loss_scale(local, global_items=3))
        out["not_own_count"] = _raised(lambda: fresh()[1].loss_scale(local, counts=[12, 12]))
        out["zero_total"] = _raised(lambda: fresh()[1].loss_scale(0, counts=[0, 0]))
        # no collective ran above: every refusal was local and before the forward
        model, reducer = fresh()
        out["second_attach"] = _raised(lambda: ddp_reduce.attach(model))
        # a plain forward and backward (no reducer.micro_batch), as a user's own loop runs it
        plain = lambda: _item_losses(model, x[mine], y[mine]).sum().backward()  # noqa: E731
        out["no_plan_step_1"] = _raised(plain)
        model, reducer = fresh()
        _step(model, reducer, x, y, [mine], reducer.loss_scale(local))
        out["no_plan_step_2"] = _raised(plain)
        # loss_scale() per micro-batch, as a one-batch-at-a-time loop would call it
        first, second = torch.tensor_split(mine, 2)
        model, reducer = fresh()
        reducer.loss_scale(len(first))
        with model.no_sync():
            _item_losses(model, x[first], y[first]).sum().backward()
        out["per_micro_batch"] = _raised(lambda: reducer.loss_scale(len(second)))
        # the ranks disagree on counts= (each right about its own): found by the count
        # all-reduce of the first step, on every rank
        model, reducer = fresh()
        theirs = list(counts)
        theirs[1 - ctx.rank] += 1 + ctx.rank
        scale = reducer.loss_scale(local, counts=theirs)
        _step(model, reducer, x, y, [mine], scale)
        out["disagree"] = _raised(lambda: reducer.last_step)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    return spawn(_guard_job, W, tmp_path_factory.mktemp("guard"), [5, 11])


@pytest.mark.parametrize(
    "case,words",
    [
        ("negative", ["local_items=-3", "whole number >= 0"]),
        ("fraction", ["local_items=2.5", "whole number >= 0"]),
        ("nan", ["local_items=nan", "whole number >= 0"]),
        ("global_below_local", ["global_items=3 < local_items="]),
        ("not_own_count", ["counts[", "=12 but local_items="]),
        ("zero_total", ["no items on any rank"]),
        ("second_attach", ["already attached", "attach() once"]),
        ("no_plan_step_1", ["RuntimeError", "loss_scale(local_items)", "DDP would average"]),
        ("no_plan_step_2", ["RuntimeError", "last step's plan"]),
        ("per_micro_batch", ["RuntimeError", "again before", "add_items(n)"]),
        ("disagree", ["ValueError", "disagree", "rank"]),
    ],
)
def test_the_api_refuses_what_would_be_silently_wrong(guarded, case, words):
    for rank in guarded:
        assert rank[case] is not None, f"{case} was accepted"
        for word in words:
            assert word in rank[case], (word, rank[case])


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"rank": 3, "world_size": 2}, ["rank=3", "0 to world_size - 1 = 1"]),
        ({"rank": -1, "world_size": 2}, ["rank=-1", ">= 0"]),
        ({"n_items": 10, "global_batch_size": 16}, ["global_batch_size=16 > n_items=10", "keep"]),
        ({"last_batch": "pad"}, ["last_batch='pad'", "drop, keep"]),
    ],
)
def test_the_sampler_refuses_a_rank_outside_the_world_and_a_batch_beyond_the_data(kwargs, words):
    args = {"n_items": 100, "global_batch_size": 8, "rank": 0, "world_size": 2, "steps": 3}
    with pytest.raises(ValueError) as err:
        ddp_reduce.rank_batch_sampler(**{**args, **kwargs})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_batch_beyond_the_data_is_one_ragged_batch_when_kept():
    sampler = ddp_reduce.rank_batch_sampler(
        10, 16, rank=1, world_size=2, steps=2, last_batch="keep"
    )
    assert [len(b) for b in sampler] == [5, 5]  # every item once an epoch, none duplicated


# -- counting per micro-batch, and the c the optimizer received, measured ---------------------

SPLIT = [[2, 3], [7, 4]]  # each rank's micro-batch counts: ragged ranks, ragged micro-batches


def _sum_loss(forward, batch):
    x, y = batch
    return _item_losses(forward, x, y).sum(), len(y)


def _counted_step(model, reducer, x, y, parts, log=False, factor=1.0) -> None:
    """One step counted per micro-batch: add_items before each forward, a plain summed loss
    (``factor``: a framework's own division of it)."""
    for a, idx in enumerate(parts):
        reducer.add_items(len(idx), log=log)
        with reducer.micro_batch(last=a == len(parts) - 1):
            (_item_losses(model, x[idx], y[idx]).sum() * factor).backward()


def _counting_job(init: str, split: list[list[int]]) -> dict:
    import warnings

    out = {}
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        counts = [sum(s) for s in split]
        x, y = _data(sum(counts), torch.float32)
        start = sum(counts[: ctx.rank])
        bounds = torch.tensor(split[ctx.rank]).cumsum(0).tolist()[:-1]
        parts = list(torch.tensor_split(torch.arange(start, start + counts[ctx.rank]), bounds))
        batches = [(x[idx], y[idx]) for idx in parts]
        for op in ("sum", "mean", "global_mean"):
            model = DDP(_model())
            reducer = ddp_reduce.attach(model, loss="sum", op=op)
            for _ in range(2):  # a second step: the counts start again from zero
                model.zero_grad()
                _counted_step(model, reducer, x, y, parts)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = reducer.measure(_sum_loss, batches)
            out[op] = {
                "grad": _flat_grad(model.module),
                "c": report.c,
                "exact": report.exact,
                "global_items": report.global_items,
                "measured_c": report.measured_c,
                "residual": report.residual,
                "warnings": [str(w.message) for w in caught],
            }
        # a framework that divides the loss by its 2 accumulation steps: measured, it warns;
        # undone (reducer.undo), the stated c is received again
        for undo in (1, 2):
            model = DDP(_model())
            reducer = ddp_reduce.attach(model, loss="sum", op="global_mean")
            reducer.undo = undo
            _counted_step(model, reducer, x, y, parts, factor=0.5)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = reducer.measure(_sum_loss, batches)
            out[f"halved-{undo}"] = (report.measured_c, [str(w.message) for w in caught])
        # a compiled DDP model, attached as torch.compile returns it
        compiled = torch.compile(DDP(_model()), backend="aot_eager")
        reducer = ddp_reduce.attach(compiled, loss="sum", op="global_mean")
        scale = reducer.loss_scale(counts[ctx.rank])
        for a, idx in enumerate(parts):
            with reducer.micro_batch(last=a == len(parts) - 1):
                (_item_losses(compiled, x[idx], y[idx]).sum() * scale).backward()
        report = reducer.measure(_sum_loss, batches)
        out["compiled"] = {
            "grad": _flat_grad(compiled._orig_mod.module),
            "c": report.c,
            "measured_c": report.measured_c,
        }
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return spawn(_counting_job, W, tmp_path_factory.mktemp("counted"), SPLIT)


@pytest.mark.parametrize("op,c", [("sum", 16), ("mean", 8), ("global_mean", 1)])
def test_counting_per_micro_batch_gives_c_times_G(counted, op, c):
    g, _ = _reference([sum(s) for s in SPLIT])
    for rank in counted:
        r = rank[op]
        assert (r["c"], r["exact"], r["global_items"]) == (c, True, 16)
        assert_close(r["grad"], c * g)
        # measured through torch.func, against the stated c: the same, and no warning
        assert r["measured_c"] == pytest.approx(c, rel=1e-5) and r["residual"] < 1e-5
        assert r["warnings"] == []


def test_a_framework_dividing_the_loss_is_measured_and_undone(counted):
    for rank in counted:
        measured, warned = rank["halved-1"]
        assert measured == pytest.approx(0.5, rel=1e-5)
        assert len(warned) == 1 and "1/2" in warned[0] and "accumulate_grad_batches" in warned[0]
        measured, warned = rank["halved-2"]
        assert measured == pytest.approx(1.0, rel=1e-5) and warned == []


def test_torch_compile_over_ddp_keeps_c(counted):
    g, _ = _reference([sum(s) for s in SPLIT])
    for rank in counted:
        r = rank["compiled"]
        assert r["c"] == 1 and r["measured_c"] == pytest.approx(1, rel=1e-5)
        assert_close(r["grad"], g)


LOGGED = (3, 6)  # the steps planned with log=True, of six


def _noise_steps_job(init: str) -> dict:
    """Six steps at the same weights, each on its own items, through two reducers: one gives
    every step to the noise estimate, the other the logged steps only."""
    out: dict = {"every": [], "logged": []}
    with distributed(DistConfig(threads_per_rank=1), init) as ctx:
        x, y = _data(6 * 2 * 8, torch.float32)
        models = {"every": DDP(_model()), "logged": DDP(_model())}
        reducers = {
            name: ddp_reduce.attach(m, noise=True, noise_steps=name, noise_beta=0.5)
            for name, m in models.items()
        }
        for step in range(1, 7):
            rows = slice((2 * (step - 1) + ctx.rank) * 8, (2 * (step - 1) + ctx.rank + 1) * 8)
            for name, model in models.items():
                model.zero_grad()
                s = reducers[name].loss_scale(8, log=step in LOGGED)
                with reducers[name].micro_batch(last=True):
                    (_item_losses(model, x[rows], y[rows]).sum() * s).backward()
                report = reducers[name].last_step
                out[name].append(
                    {
                        "route": report.route.name,
                        "local_sq": None if report.local_sq is None else float(report.local_sq),
                        "small_sq": None
                        if report.ranks_sq_mean is None
                        else float(report.ranks_sq_mean),
                        "big_sq": float(report.grad_norm) ** 2,
                        "fed": report.update_noise(),
                    }
                )
        for name, reducer in reducers.items():
            out[f"{name}_b_simple"] = reducer.noise_estimate().b_simple
    return out


def test_the_noise_estimate_on_logged_steps_reads_nothing_on_the_others(tmp_path):
    from ddp_reduce.layer.noise import NoiseScaleEstimator

    every = NoiseScaleEstimator(0.5)
    logged = NoiseScaleEstimator(0.5)
    for r in spawn(_noise_steps_job, W, tmp_path):
        for step, (e, lg) in enumerate(zip(r["every"], r["logged"], strict=True), start=1):
            # both on the hook: the logged steps need the ranks' own gradients
            assert e["route"] == lg["route"] == "hook"
            assert e["fed"] and e["local_sq"] is not None
            assert lg["fed"] == (step in LOGGED)
            assert (lg["local_sq"] is None) == (step not in LOGGED), step
            if step in LOGGED:  # the same gradient, the same norms
                assert lg["small_sq"] == pytest.approx(e["small_sq"], rel=1e-12)
                assert lg["big_sq"] == pytest.approx(e["big_sq"], rel=1e-12)
        # the estimate, computed another way: the every-step reducer's norms fed to estimators
        for step, e in enumerate(r["every"], start=1):
            every.update(8, 16, e["small_sq"], e["big_sq"])
            if step in LOGGED:
                logged.update(8, 16, e["small_sq"], e["big_sq"])
        assert r["every_b_simple"] == pytest.approx(every.estimate().b_simple, rel=1e-9)
        assert r["logged_b_simple"] == pytest.approx(logged.estimate().b_simple, rel=1e-9)
        assert logged.estimate().b_simple != pytest.approx(every.estimate().b_simple, rel=1e-3)
        every, logged = NoiseScaleEstimator(0.5), NoiseScaleEstimator(0.5)
