"""The comparison of an audit's layouts: the probe's per-rank records put together into one
gradient per layout and step, factors and direction errors against the first layout, the fitted
exponents of W and A, the absolute c against a reference loss, and the verdict in words.

numpy only: the records arrive as plain dicts of numpy arrays (see ``runner.load_records``)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ddp_reduce.auditing.result import AuditResult, LayoutResult

ROUND = 0.05  # an exponent this close to an integer is said as that integer


@dataclass
class Capture:
    """One layout's optimizer step, every rank's records put together."""

    exact: np.ndarray | None  # the whole gradient, parameters in the optimizer's order
    proj: np.ndarray  # its seeded random projection
    norm: float
    items: Counter = field(default_factory=Counter)
    clip: dict = field(default_factory=dict)
    structure: tuple = ()
    ref: tuple[np.ndarray | None, np.ndarray] | None = None
    ref_error: str | None = None
    rank_spread: float = 0.0  # replicated gradients that differ between ranks
    dropout: list[str] = field(default_factory=list)


def _assemble(records: list[dict], key: str = "params") -> tuple:
    """(exact or None, projection, squared norm, structure, spread) of the gradient the ranks'
    ``key`` records describe: shards summed over ranks, replicas taken from rank 0."""
    ranks = sorted(records, key=lambda r: r["rank"])
    n_params = len(ranks[0][key])
    exact_parts, structure, spread = [], [], 0.0
    proj = np.zeros_like(next(p["proj"] for p in ranks[0][key] if p is not None))
    sqnorm = 0.0
    for i in range(n_params):
        first = ranks[0][key][i]
        if first is None:
            structure.append(None)
            continue
        structure.append(tuple(first["shape"]))
        parts = [r[key][i] for r in ranks] if first["shard"] else [first]
        proj += sum(p["proj"] for p in parts)
        sqnorm += sum(p["sqnorm"] for p in parts)
        if not first["shard"]:
            base = max(np.linalg.norm(first["proj"]), 1e-300)
            for r in ranks[1:]:
                spread = max(spread, np.linalg.norm(r[key][i]["proj"] - first["proj"]) / base)
        if first["exact"] is not None:
            whole = np.zeros(math.prod(first["shape"]))
            for p in parts:
                whole[p["offset"] : p["offset"] + p["exact"].size] += p["exact"]
            exact_parts.append(whole)
    exact = (
        np.concatenate(exact_parts)
        if len(exact_parts) == len([s for s in structure if s is not None]) and exact_parts
        else None
    )
    return exact, proj, sqnorm, tuple(structure), spread


def assemble(records: list[dict]) -> Capture:
    """One step of one layout from its ranks' records."""
    exact, proj, sqnorm, structure, spread = _assemble(records)
    items: Counter = Counter()
    clipped = [r["clip"] for r in records if r["clip"]]
    for r in records:
        items.update(r["items"])
    cap = Capture(exact, proj, math.sqrt(sqnorm), items, clipped[0] if clipped else {},
                  structure, rank_spread=spread, dropout=records[0].get("dropout", []))  # fmt: skip
    ref = records[0].get("reference")
    if ref is not None:
        if ref.get("error"):
            cap.ref_error = ref["error"]
        else:
            r_exact, r_proj, _, _, _ = _assemble(
                [{"rank": r["rank"], **r["reference"]} for r in records]
            )
            cap.ref = (r_exact, r_proj)
    return cap


def _vectors(caps: list[Capture], exact: bool) -> list[np.ndarray]:
    return [c.exact if exact else c.proj for c in caps]


def factor_and_direction(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """The factor f minimising |g - f·ref| and the distance between the unit directions."""
    ref_sq = float(ref @ ref)
    if ref_sq == 0 or not np.isfinite(ref_sq):
        return math.nan, math.nan
    f = float(g @ ref) / ref_sq
    g_norm = float(np.linalg.norm(g))
    if g_norm == 0:
        return 0.0, math.nan
    return f, float(np.linalg.norm(g / g_norm - ref / math.sqrt(ref_sq)))


def absolute_c(g: np.ndarray, big_g: np.ndarray) -> tuple[float, float]:
    """c = <g, G>/|G|² and the residual |g - cG|/|cG|."""
    c, _ = factor_and_direction(g, big_g)
    cg = c * big_g
    return c, float(np.linalg.norm(g - cg) / max(np.linalg.norm(cg), 1e-300))


def fit_exponents(points: list[tuple[int, int, float]]) -> dict[str, float | None]:
    """log f = const + α·log W + β·log A by least squares over (W, A, factor) points; an
    exponent the layouts cannot tell apart is None."""
    pts = [(w, a, f) for w, a, f in points if f is not None and f > 0 and math.isfinite(f)]
    fit: dict[str, float | None] = {"world_size_exponent": None, "accum_exponent": None}
    if len(pts) < 2:
        return fit
    logw = np.log([p[0] for p in pts])
    loga = np.log([p[1] for p in pts])
    y = np.log([p[2] for p in pts])
    cols = {"world_size_exponent": logw, "accum_exponent": loga}
    usable = {k: v for k, v in cols.items() if np.ptp(v) > 0}
    if not usable:
        return fit
    x = np.column_stack([np.ones(len(pts)), *usable.values()])
    if np.linalg.matrix_rank(x) < x.shape[1]:  # W and A varied together: not separable
        return fit
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    for k, c in zip(usable, coef[1:], strict=True):
        fit[k] = round(float(c), 4)
    return fit


WORDS = {
    ("world_size_exponent", 1): "sums across ranks: ∝ W",
    ("world_size_exponent", -1): "a mean over ranks on top of a global count: ∝ 1/W",
    ("accum_exponent", 1): "sums across micro-steps without dividing by A: ∝ A",
    ("accum_exponent", -1): "divides by A twice: ∝ 1/A",
}


def describe_fit(fit: dict[str, float | None]) -> str:
    parts = []
    for key, symbol in (("world_size_exponent", "W"), ("accum_exponent", "A")):
        e = fit[key]
        if e is None or abs(e) < ROUND:
            continue
        whole = round(e)
        said = WORDS.get((key, whole)) if abs(e - whole) < ROUND else None
        parts.append(said or f"∝ {symbol}^{e:.2f}")
    if fit["world_size_exponent"] is None and fit["accum_exponent"] is None:
        return "the layouts do not vary W and A independently: the factor cannot be fitted"
    return "; ".join(parts) or "no dependence on W or A that the fit can name"


def same_items(a: Counter, b: Counter) -> bool:
    """Whether two layouts fed the same items: the same fingerprints, or the same up to a last
    position cut from some rows (a shifted input, ``tokens[:, :-1]``, cuts the last token of
    each batch's longest sequence only, and the longest differs between layouts)."""
    if a == b:
        return True
    if sum(a.values()) != sum(b.values()):
        return False
    # the items only one side has, each "full:cut"; matched one to one, a's full with b's cut
    # or a's cut with b's full (quadratic in the unmatched items only)
    right = [key.partition(":")[::2] for key in (b - a).elements()]
    for key in (a - b).elements():
        full, cut = key.partition(":")[::2]
        match = next((j for j, (rf, rc) in enumerate(right) if full == rc or cut == rf), None)
        if match is None:
            return False
        del right[match]
    return not right


def _incomparable_reason(rows: list[LayoutResult], caps: list[Capture], n: int, step: int) -> str:
    """Why the layouts did not see the same items at ``step``, with the likely cause."""
    counts = [sum(c.items.values()) for c in caps]
    wrong = [f"{r.name} fed {k}" for r, k in zip(rows, counts, strict=True) if k != n]
    if wrong:
        return (f"step {step}: items fed to the model per step differ from the global batch "
                f"N={n} ({', '.join(wrong)}): the script ignores the placeholders ({{b}}, {{A}}, "
                "{W}) or drops or pads a tail")  # fmt: skip
    by_w: dict[int, list[Counter]] = {}
    for r, c in zip(rows, caps, strict=True):
        by_w.setdefault(r.world_size, []).append(c.items)
    within_w = all(all(same_items(x, group[0]) for x in group) for group in by_w.values())
    differ = [
        r.name for r, c in zip(rows, caps, strict=True) if not same_items(c.items, caps[0].items)
    ]
    cause = (
        "a sampler that depends on W (the same items at each W, other items at another W)"
        if within_w and len(by_w) > 1
        else "an unseeded shuffle or a sampler that depends on the layout"
    )
    return (f"step {step}: layouts {', '.join(differ)} fed the model other items than "
            f"{rows[0].name}: {cause}")  # fmt: skip


def _step(rows, caps, step, n, tol, exact) -> tuple[str, str]:
    """Fill the rows' entries of one step; the step's verdict and its sentence."""
    same = [same_items(c.items, caps[0].items) and sum(c.items.values()) == n for c in caps]
    vectors = _vectors(caps, exact)
    for row, cap, vec, s in zip(rows, caps, vectors, same, strict=True):
        f, d = factor_and_direction(vec, vectors[0])
        row.factor.append(f)
        row.direction_error.append(d)
        row.grad_norm.append(cap.norm)
        row.clipped.append(bool(cap.clip.get("clipped")))
        row.same_batch.append(s)
    if not all(same):
        return "incomparable", _incomparable_reason(rows, caps, n, step)
    if any(not math.isfinite(r.factor[-1]) for r in rows):
        return "incomparable", f"step {step}: a gradient is zero or not finite"
    worst = max(range(len(rows)), key=lambda i: rows[i].direction_error[-1])
    spread = max(c.rank_spread for c in caps)
    if rows[worst].direction_error[-1] > tol:
        return "differs", (
            f"step {step}: the direction changes by {rows[worst].direction_error[-1]:.3g} between "
            f"{rows[0].name} and {rows[worst].name} (tol {tol:g}): a mean of per-rank or "
            "per-micro-batch means over unequal counts weights items unequally"
        )
    if spread > tol:
        return "differs", f"step {step}: ranks held different gradients (spread {spread:.3g})"
    if all(abs(r.factor[-1] - 1) <= tol for r in rows):
        return "invariant", ""
    return "scaled", ""


def _reference(rows, caps_by_layout, steps, n, tol, exact) -> list[str]:
    """Absolute c per layout and step against the per-item mean gradient G; the sentences."""
    cs, residuals, errors = [], [], set()
    for row, caps in zip(rows, caps_by_layout, strict=True):
        row.c, row.residual = [], []
        for cap in caps:
            if cap is None or cap.ref is None:
                row.c.append(None)
                row.residual.append(None)
                if cap is not None and cap.ref_error:
                    errors.add(cap.ref_error)
                continue
            big_g = cap.ref[0] if exact else cap.ref[1]
            c, res = absolute_c(cap.exact if exact else cap.proj, big_g)
            row.c.append(c)
            row.residual.append(res)
            cs.append(c)
            residuals.append((res, row.name))
    if not cs:
        return [f"the reference gradient could not be computed: {'; '.join(sorted(errors))}"]
    if all(abs(c - 1) <= tol for c in cs):
        said = "c = 1 at every layout and step: the optimizer receives the per-item mean gradient"
    elif all(abs(c / n - 1) <= tol for c in cs):
        said = f"c = N = {n} at every layout and step: the optimizer receives the sum"
    else:
        span = (f"c = {cs[0]:.4g} at every layout and step" if max(cs) - min(cs) <= tol
                else f"c = {min(cs):.4g} to {max(cs):.4g} over layouts and steps")  # fmt: skip
        said = f"{span}: neither the per-item mean (c = 1) nor the sum (c = N = {n})"
    out = [said]
    worst, where = max(residuals)
    if worst > tol:
        out.append(f"the gradient is not a multiple of the per-item mean gradient (residual "
                   f"{worst:.3g} at {where}): items are weighted unequally")  # fmt: skip
    return out


def _notes(rows, caps) -> list[str]:
    notes = []
    clipped = [(r.name, c.clip) for r, c in zip(rows, caps, strict=True) if c.clip.get("clipped")]
    if clipped:
        name, clip = clipped[0]
        notes.append(
            f"clipping bit at {', '.join(n for n, _ in clipped)} (pre-clip norm "
            f"{clip['preclip_norm']:.4g} > max_norm {clip['max_norm']:g}): the factors and c are "
            "of the gradient before clipping; after it, the update's norm is max_norm whatever "
            "the factor, which hides one"
        )
    dropout = sorted({d for c in caps for d in c.dropout})
    if dropout:
        notes.append(f"random layers in training mode make layouts differ by chance: "
                     f"{', '.join(dropout[:5])}")  # fmt: skip
    return notes


ORDER = ("invariant", "scaled", "differs", "incomparable")


def compare(
    rows: list[LayoutResult],
    captures: list[list[Capture | None]],
    global_batch: int,
    steps: int,
    tol: float,
    exact: bool | None = None,
) -> AuditResult:
    """The verdict over the layouts that ran (rows with ``error`` set are shown, not compared);
    ``exact`` None compares exact gradients where every layout kept them."""
    ok = [i for i, r in enumerate(rows) if r.error is None]
    for r in rows:
        r.factor, r.direction_error, r.grad_norm, r.clipped, r.same_batch = [], [], [], [], []
        if r.error is not None:  # a failed layout: one None per step in each column
            for col in (r.factor, r.direction_error, r.grad_norm, r.clipped, r.same_batch):
                col.extend([None] * steps)
    if len(ok) < 2:
        failed = "; ".join(f"{r.name}: {r.error}" for r in rows if r.error)
        said = f"fewer than two layouts ran ({failed or 'one layout given'})"
        return AuditResult("incomparable", global_batch, steps, rows, fit_exponents([]), said)
    good = [rows[i] for i in ok]
    caps = [captures[i] for i in ok]
    if exact is None:
        exact = all(c.exact is not None for cs in caps for c in cs)
    verdicts, sentences = [], []
    for s in range(steps):
        step_caps = [cs[s] for cs in caps]
        if len({c.structure for c in step_caps}) > 1:
            verdicts.append("incomparable")
            sentences.append(f"step {s + 1}: the optimizer's parameters differ between layouts")
            continue
        v, said = _step(good, step_caps, s + 1, global_batch, tol, exact)
        verdicts.append(v)
        sentences += [said] if said else []
    verdict = max(verdicts, key=ORDER.index)
    fit = fit_exponents([(r.world_size, r.accum_steps, f) for r in good for f in r.factor])
    if verdict == "scaled":
        lo, hi = min(f for r in good for f in r.factor), max(f for r in good for f in r.factor)
        sentences.insert(0, f"directions agree, factors range {lo:.4g} to {hi:.4g}: "
                            f"{describe_fit(fit)}")  # fmt: skip
    elif verdict == "invariant":
        sentences.insert(0, "the optimizer receives the same gradient at every layout")
    if any(c.ref is not None or c.ref_error for cs in caps for c in cs):
        sentences += _reference(good, caps, steps, global_batch, tol, exact)
    sentences += _notes(good, [cs[0] for cs in caps])
    sentences += [f"layout {r.name} failed: {r.error}" for r in rows if r.error]
    return AuditResult(verdict, global_batch, steps, rows, fit, "; ".join(sentences) + ".")
