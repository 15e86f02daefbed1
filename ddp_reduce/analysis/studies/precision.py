"""Sum or mean in low precision: the reduced gradient's error, overflow and underflow for each
comm dtype and place of the division, as the world grows; then training runs in each.

The reduction measured is the layer's own (``reducer.py``): each rank's gradient cast to the comm
dtype, divided by ``before``, summed over ranks in that dtype, divided by ``after``, where
(before, after) = ``division_split(divisor, predivide)``. In real gloo groups up to a few ranks;
beyond, the same arithmetic in the order gloo's ring all-reduce applies it (:func:`ring_sum`),
checked against the real groups element by element.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddp_reduce.analysis.intervals import median_interval
from ddp_reduce.analysis.noise_truth import per_item_gradients
from ddp_reduce.analysis.tables import table
from ddp_reduce.config import DistConfig, load_config
from ddp_reduce.data import load_dataset
from ddp_reduce.layer.reducer import TORCH_DTYPES
from ddp_reduce.layer.reduction import CommDtype, division_split, parse_predivide
from ddp_reduce.models import build_model
from ddp_reduce.run.compose import compose_config
from ddp_reduce.run.pool import RankPool

SETS = ("train.steps", "reduce.dtype", "reduce.predivide", "reduce.loss", "reduce.op")
ARITHMETIC = "arithmetic.json"


def planned_runs(spec) -> int:
    t = spec["training"]
    return len(t["workloads"]) * (1 + len(t["dtypes"]) * len(t["predivide"]))


# -- the arithmetic -------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[CommDtype[name]]


RING_ALIGN = 2  # gloo's ring all-reduce cuts chunks at even element counts


def ring_chunks(n: int, world: int) -> torch.Tensor:
    """Which rank's chunk each element is in, as gloo's ring all-reduce splits a tensor: chunks
    of ceil(n/W) elements, rounded up to an even count. Measured against gloo, bit for bit, for
    fp32, bf16 and fp16 at W = 4 and 8 with three seeds' gradients of 4810 elements: rounding
    to 1 element puts 2 elements in the wrong order at W = 4, rounding to 4 puts 9 to 22 at
    W = 8, whatever the dtype."""
    size = math.ceil(math.ceil(n / world) / RING_ALIGN) * RING_ALIGN
    return torch.clamp(torch.arange(n) // size, max=world - 1)


def ring_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the first dimension (W ranks) in x's dtype, in the order gloo's ring applies it:
    the sum of the chunk rank k owns starts at rank k - 1 and adds ranks k - 2, k - 3, ... down
    to k, rounding after every addition."""
    world, n = x.shape
    owner = ring_chunks(n, world)
    cols = torch.arange(n)
    acc = x[(owner - 1) % world, cols].clone()
    for j in range(2, world + 1):
        acc = acc + x[(owner - j) % world, cols]
    return acc


def reduce_simulated(
    local: torch.Tensor, dtype: torch.dtype, divisor: float, predivide
) -> torch.Tensor:
    """The layer's reduction of the ranks' gradients ``local`` (W x P, float64), simulated."""
    before, after = division_split(divisor, predivide)
    x = local.to(dtype)
    if before != 1:
        x = x / before
    out = ring_sum(x)
    if after != 1:
        out = out / after
    return out.double()


def _real_job(
    ctx, local: torch.Tensor, cases: list[tuple[str, float, Any]]
) -> list[torch.Tensor] | None:
    """In a real group: each rank's row of ``local`` reduced as the hook does, for each case."""
    out = []
    for dtype_name, divisor, predivide in cases:
        before, after = division_split(divisor, predivide)
        x = local[ctx.rank].to(_dtype(dtype_name))
        if before != 1:
            x.div_(before)
        dist.all_reduce(x)
        if after != 1:
            x.div_(after)
        out.append(x.double())
    return out if ctx.rank == 0 else None


def _metrics(result: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    finite = bool(torch.isfinite(result).all())
    nonzero = reference != 0
    flushed = float(((result == 0) & nonzero).double().sum() / max(1, int(nonzero.sum())))
    rel = float((result - reference).norm() / reference.norm()) if finite else None
    return {"overflow": not finite, "rel_error": rel, "flushed": flushed}


def _local_gradients(per_item: torch.Tensor, world: int, per_rank: int, loss: str, seed: int):
    """Each rank's own gradient: the mean or the sum of its items' (drawn with a fixed seed)."""
    rng = np.random.default_rng([seed, world])
    idx = torch.from_numpy(rng.integers(0, per_item.shape[0], size=(world, per_rank)))
    local = per_item[idx].sum(1)
    return local / per_rank if loss == "mean" else local


def measure(spec, progress=None) -> dict[str, Any]:
    """Every (seed, W, scale, loss, op, dtype, predivide): simulated and, for small W, real.
    A seed draws the model's initial weights (its per-item gradients) and each rank's items."""
    cfg = load_config(compose_config(list(spec["gradients"]))[0])
    data = load_dataset(cfg.data)
    seeds = list(spec["seeds"])
    per_item = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(cfg.model, data)
        per_item[seed] = per_item_gradients(model, data.task, data.train)  # items x P, float64
    worlds = sorted(set(spec["sim_world_sizes"]) | set(spec["real_world_sizes"]))
    rows, agreement = [], []
    for world in worlds:
        real = world in spec["real_world_sizes"]
        pool = RankPool(DistConfig(threads_per_rank=1), world) if real else None
        try:
            for seed, loss in ((s, loss) for s in seeds for loss in spec["losses"]):
                base = _local_gradients(per_item[seed], world, spec["items_per_rank"], loss, seed)
                for scale in spec["scales"]:
                    local = base * scale
                    cases = [
                        (dtype, float(world) if op == "mean" else 1.0, parse_predivide(pre), op)
                        for op in spec["ops"]
                        for dtype in spec["dtypes"]
                        for pre in spec["predivide"]
                        if not (op == "sum" and pre != "none")  # divisor 1: its place is moot
                    ]
                    measured = (
                        pool.call(_real_job, local, [c[:3] for c in cases])[0] if real else None
                    )
                    for i, (dtype, divisor, pre, op) in enumerate(cases):
                        reference = local.sum(0) / divisor
                        sim = reduce_simulated(local, _dtype(dtype), divisor, pre)
                        row = {
                            "seed": seed,
                            "world": world,
                            "scale": scale,
                            "loss": loss,
                            "op": op,
                            "dtype": dtype,
                            "predivide": str(pre),
                            "local_amax": float(local.abs().max()),
                            **_metrics(sim, reference),
                        }
                        if measured is not None:
                            in_group = measured[i]
                            same = (in_group == sim) | (in_group.isnan() & sim.isnan())
                            agreement.append(
                                {
                                    "row": len(rows),
                                    "world": world,
                                    "dtype": dtype,
                                    "bitwise": float(same.double().mean()),
                                    "real": _metrics(in_group, reference),
                                }
                            )
                        rows.append(row)
        finally:
            if pool is not None:
                pool.close()
        if progress:
            progress(f"precision arithmetic: W={world} done")
    return {"rows": rows, "agreement": agreement, "parameters": per_item[seeds[0]].shape[1]}


# -- the sweep ------------------------------------------------------------------------------


def run(spec, runner) -> None:
    result = measure(spec, progress=lambda m: print(f"ddp-reduce: {m}", flush=True))
    (runner.out / ARITHMETIC).write_text(json.dumps(result))
    t = spec["training"]
    for workload, overrides in t["workloads"].items():
        base = [*t["common"], *overrides, f"train.steps={t['steps']}"]
        runner.run(
            f"{workload}-fp32",
            [*base, "reduce.dtype=fp32"],
            workload=workload,
            dtype="fp32",
            predivide="full",
        )
        for dtype in t["dtypes"]:
            for pre in t["predivide"]:
                runner.run(
                    f"{workload}-{dtype}-{pre}",
                    [*base, f"reduce.dtype={dtype}", f"reduce.predivide={pre}"],
                    workload=workload,
                    dtype=dtype,
                    predivide=pre,
                )


# -- the report -----------------------------------------------------------------------------


def _select(rows, **want):
    return [r for r in rows if all(r[k] == v for k, v in want.items())]


def _seeds(rows) -> list[int]:
    return sorted({r["seed"] for r in rows})


def overflow_edges(rows) -> list[list[Any]]:
    """Per (loss, op, predivide) in fp16 and per scale: the largest |local gradient| at the
    smallest W (median over the seeds), and per seed the smallest W whose reduction overflows
    ('-': none; one figure where every seed gives it)."""
    out = []
    keys = sorted({(r["loss"], r["op"], r["predivide"]) for r in rows if r["dtype"] == "fp16"})
    for loss, op, pre in keys:
        sel = _select(rows, dtype="fp16", loss=loss, op=op, predivide=pre)
        for scale in sorted({r["scale"] for r in sel}):
            firsts, amax = [], []
            for seed in _seeds(sel):
                mine = _select(sel, scale=scale, seed=seed)
                over = [r["world"] for r in mine if r["overflow"]]
                firsts.append(str(min(over)) if over else "-")
                amax.append(min(mine, key=lambda r: r["world"])["local_amax"])
            first = firsts[0] if len(set(firsts)) == 1 else " / ".join(firsts)
            out.append([f"{loss}/{op}", pre, scale, statistics.median(amax), first])
    return out


def _fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Slope of log(error) against log(W)."""
    pts = [(math.log(w), math.log(e)) for w, e in points if e and e > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


FAIL_ERROR = 0.01  # a reduction off by more than 1%, or with 1% of its entries flushed to 0


def _failed(r: dict[str, Any]) -> bool:
    return r["overflow"] or r["rel_error"] > FAIL_ERROR or r["flushed"] > FAIL_ERROR


def recommendations(rows) -> dict[str, str]:
    """Per dtype, where to divide (op=mean): the choice that failed least often (overflow, or
    more than 1% lost), then with the smallest median error, over every W and scale tried."""
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = _select(rows, dtype=dtype, op="mean")
        scored = []
        for pre in sorted({r["predivide"] for r in sel}):
            mine = _select(sel, predivide=pre)
            errors = [r["rel_error"] for r in mine if r["rel_error"] is not None]
            overflows = sum(r["overflow"] for r in mine)
            median = statistics.median(errors) if errors else math.inf
            scored.append((sum(map(_failed, mine)), median, overflows, pre, len(mine)))
        scored.sort()
        fails, median, overflows, pre, n = scored[0]
        tie = [
            p for f, m, _, p, _ in scored if f == fails and math.isclose(m, median, rel_tol=0.05)
        ]
        choice = f"predivide={pre}" if len(tie) == 1 else f"any of {', '.join(tie)} (they tie)"
        others = "; ".join(f"{p}: {f} failed, {o} overflowed" for f, _, o, p, _ in scored[1:])
        out[dtype] = (
            f"{choice}: {fails} of {n} cases failed (overflow, a relative error above "
            f"{FAIL_ERROR:.0%}, or more than {FAIL_ERROR:.0%} of the entries flushed to 0), "
            f"{overflows} of them by overflow, median error {median:.2g}"
            + (f" (against {others})" if others else "")
        )
    return out


def _agreement_lines(rows: list[dict], agreement: list[dict]) -> list[str]:
    """The ring simulation against the real groups."""
    text: list[str] = []
    if agreement:
        worst = min(a["bitwise"] for a in agreement)
        differ = sum(rows[a["row"]]["overflow"] != a["real"]["overflow"] for a in agreement)
        verdicts = "every case" if not differ else f"all but {differ} cases"
        text.append(
            f"**The ring simulation against the real groups**: {len(agreement)} reductions; the "
            f"fraction of elements equal bit for bit is at least {worst:.6f} (1.0 is every "
            f"element); the overflow verdicts agree in {verdicts}."
        )
        text.append("")
    return text


def _underflow_lines(rows: list[dict]) -> list[str]:
    """Where full pre-division underflows in fp16."""
    text: list[str] = []
    fl = sorted(
        (
            r
            for r in rows
            if r["dtype"] == "fp16" and r["op"] == "mean" and r["predivide"] == "full"
        ),
        key=lambda r: (r["scale"], r["world"]),
    )
    worst_fl = max(fl, key=lambda r: r["flushed"]) if fl else None
    if worst_fl:
        plain = _select_one(
            rows,
            dtype="fp16",
            op="mean",
            predivide="none",
            scale=worst_fl["scale"],
            world=worst_fl["world"],
            loss=worst_fl["loss"],
            seed=worst_fl["seed"],
        )
        text.append(
            f"**Full pre-division underflows** where the gradient divided by W falls below fp16's "
            f"smallest numbers: at scale {worst_fl['scale']:g}, W={worst_fl['world']} (seed "
            f"{worst_fl['seed']}, the worst over the seeds), "
            f"{100 * worst_fl['flushed']:.3g}% of the entries became 0 (relative error "
            f"{_fmt(worst_fl['rel_error'])}); with predivide=none at the same point: "
            f"{_fmt(plain)}."
        )
        text.append("")
    return text


def _largest_fine(rows: list[dict]) -> int | None:
    """The largest W without overflow and with under 1% of the entries flushed to 0."""
    ok = [r["world"] for r in rows if not r["overflow"] and r["flushed"] < FAIL_ERROR]
    return max(ok, default=None)


def _sqrt_lines(rows: list[dict]) -> list[str]:
    """What splitting the division buys."""
    text: list[str] = []
    sqrt_rows = []
    for scale in sorted({r["scale"] for r in rows}):
        line = [scale]
        for pre in ("none", "sqrt", "full"):
            sel = _select(rows, dtype="fp16", op="mean", loss="sum", predivide=pre, scale=scale)
            ok = [_largest_fine(_select(sel, seed=seed)) for seed in _seeds(sel)]
            fine = None if None in ok or not ok else min(ok)
            errs = [r["rel_error"] for r in sel if r["rel_error"] is not None]
            line.append(f"{fine or '-'} / {max(errs):.2g}" if errs else "-")
        sqrt_rows.append(line)
    text += [
        "**What splitting the division buys** (fp16, summed local gradients, op=mean): the "
        "largest W without overflow and with under 1% of entries flushed in every seed / the "
        "largest relative error over the W and seeds tried.",
        "",
        table(["scale", "none", "sqrt", "full"], sqrt_rows),
        "",
    ]
    return text


def _growth_lines(rows: list[dict]) -> list[str]:
    """The error's growth with W per dtype, and the recommendations."""
    text: list[str] = []
    growth = []
    for dtype in ("fp32", "bf16", "fp16"):
        sel = _select(rows, dtype=dtype, op="mean", loss="mean", predivide="full", scale=1.0)
        errors = [r["rel_error"] for r in sel if r["rel_error"] is not None]
        slopes = [
            _fit_slope([(r["world"], r["rel_error"]) for r in _select(sel, seed=seed)])
            for seed in _seeds(sel)
        ]
        slopes = [v for v in slopes if v is not None]
        if errors:
            slope = median_interval(slopes).text() if slopes else None
            growth.append([dtype, min(errors), max(errors), slope])
    text += [
        "**Error growth with W** (mean local gradients, op=mean, full pre-division, scale 1): "
        "the relative error's range over the seeds and W, and the slope of log(error) against "
        "log(W) fitted per seed, median over the seeds [95% interval].",
        "",
        table(["dtype", "smallest error", "largest error", "slope"], growth, digits=3),
        "",
        "**Recommendation, from the cases above:**",
        "",
    ]
    for dtype, verdict in recommendations(rows).items():
        text.append(f"- {dtype}: {verdict}.")
    text.append("")
    return text


def _training_lines(spec: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """Training in low precision against fp32."""
    text: list[str] = []
    by_work: dict[str, dict[tuple[str, str], dict]] = {}
    for r in runs:
        lab = r["labels"]
        by_work.setdefault(lab["workload"], {})[(lab["dtype"], lab["predivide"])] = r["summary"]
    train_rows = []
    for work, table_ in by_work.items():
        ref = table_.get(("fp32", "full"), {}).get("final_train_loss")
        for (dtype, pre), s in sorted(table_.items()):
            loss = s.get("final_train_loss")
            train_rows.append(
                [
                    work,
                    dtype,
                    pre,
                    s.get("status"),
                    loss,
                    (loss - ref) / ref
                    if isinstance(loss, float) and isinstance(ref, float)
                    else None,
                    s.get("reduce_comm_rel_error_max"),
                    s.get("reduce_overflow_at_step"),
                ]
            )
    text += [
        f"**Training** ({spec['training']['steps']} steps each): final training loss against "
        "the fp32 run; the largest relative error of the low-precision reduction on logged "
        "steps; the step where the reduction overflowed, if it did.",
        "",
        table(
            [
                "workload",
                "reduce.dtype",
                "predivide",
                "status",
                "final train loss",
                "vs fp32",
                "max reduce error",
                "overflow at",
            ],
            train_rows,
        ),
        "",
        "![error against W](precision_error.png)",
        "",
        "![fp16 overflow and underflow](precision_fp16.png)",
    ]
    return text


def analyze(
    study_dir: Path, spec: dict[str, Any], runs: list[dict[str, Any]], common: list[str] = ()
) -> str:

    data = json.loads((Path(study_dir) / ARITHMETIC).read_text())
    rows, agreement = data["rows"], data["agreement"]
    seeds = _seeds(rows)
    text = [
        f"Each rank holds the summed or mean gradient of {spec['items_per_rank']} digits items "
        f"(the MLP at its initial weights, {data['parameters']} parameters) times a scale; seeds "
        f"{seeds} (the initial weights and each rank's items); the "
        "reduction is the layer's: cast to the comm dtype, divide by `before`, sum over ranks "
        "in that dtype, divide by `after`. Error: |reduced - float64| / |float64|. Real gloo "
        f"groups for W in {list(spec['real_world_sizes'])}; every W in the same arithmetic in "
        "gloo's ring order.",
        "",
    ]
    text += _agreement_lines(rows, agreement)
    # overflow
    edges = overflow_edges(rows)
    text += [
        "**Where an fp16 reduction overflows** (fp16's largest number is 65504): the smallest W "
        "that overflowed at each gradient scale ('-': none up to the largest W tried), one "
        f"figure where the seeds agree, else each seed's ({', '.join(map(str, seeds))}); the "
        "largest |local gradient| at the smallest W, median over the seeds.",
        "",
        table(
            ["loss/op", "predivide", "scale", "max |local gradient|", "first W that overflows"],
            edges,
            digits=3,
        ),
        "",
    ]
    text += _underflow_lines(rows)
    text += _sqrt_lines(rows)
    text += _growth_lines(rows)
    text += _training_lines(spec, runs)
    _plots(Path(study_dir), _select(rows, seed=seeds[0]), seeds[0])
    return "\n".join(text)


def _fmt(x: Any) -> str:
    if isinstance(x, dict):
        return f"{100 * x['flushed']:.3g}% flushed, error {_fmt(x['rel_error'])}"
    return "overflow" if x is None else f"{x:.3g}"


def _select_one(rows, **want):
    sel = _select(rows, **want)
    return sel[0] if sel else None


def _plots(study_dir: Path, rows, seed: int) -> None:
    """The figures, of one seed's rows (the tables give every seed)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"none": ":", "sqrt": "--", "full": "-"}
    colors = {"fp32": "C0", "bf16": "C1", "fp16": "C2"}
    for dtype in colors:
        for pre, style in styles.items():
            pts = sorted(
                (r["world"], r["rel_error"])
                for r in _select(
                    rows, dtype=dtype, op="mean", loss="mean", predivide=pre, scale=1.0
                )
                if r["rel_error"] is not None
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    color=colors[dtype],
                    marker="o",
                    ms=3,
                    label=f"{dtype}, {pre}",
                )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="ranks W",
        ylabel="relative error vs float64",
        title=f"mean gradients, op=mean, scale 1 (seed {seed})",
    )
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(study_dir / "precision_error.png", dpi=110)
    plt.close(fig)

    worlds = sorted({r["world"] for r in rows})
    scales = sorted({r["scale"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, pre in zip(axes, ("none", "sqrt", "full"), strict=True):
        grid = np.full((len(scales), len(worlds)), np.nan)
        for r in _select(rows, dtype="fp16", op="mean", loss="sum", predivide=pre):
            value = 2.0 if r["overflow"] else (1.0 if r["flushed"] >= FAIL_ERROR else 0.0)
            grid[scales.index(r["scale"]), worlds.index(r["world"])] = value
        ax.imshow(grid, origin="lower", cmap="RdYlGn_r", vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(worlds)), [str(w) for w in worlds], fontsize=7)
        ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales], fontsize=7)
        ax.set(xlabel="ranks W", title=f"fp16, predivide={pre}")
    axes[0].set_ylabel("gradient scale")
    fig.suptitle(
        "summed local gradients, op=mean: green fine, yellow >= 1% flushed to 0, red overflow "
        f"(seed {seed})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(study_dir / "precision_fp16.png", dpi=110)
    plt.close(fig)
