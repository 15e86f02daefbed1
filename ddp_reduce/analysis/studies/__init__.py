"""The studies: each module runs its sweep (``run``) and analyses it (``analyze``).

Shared here: reading a run's weights, the blow-up criterion, and a one-dimensional search over a
log-spaced parameter (a learning rate) that the studies run and their reports replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddp_reduce.run.rundir import MODEL

GOLDEN = (3 - math.sqrt(5)) / 2  # 0.382: where golden-section search puts its next probe


def weights(run_dir: Path) -> torch.Tensor | None:
    path = Path(run_dir) / MODEL
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def relative_weight_difference(a: Path, b: Path) -> float | None:
    """max |w_a - w_b| / max |w_b| over all parameters and buffers."""
    wa, wb = weights(a), weights(b)
    if wa is None or wb is None or wa.shape != wb.shape:
        return None
    return float((wa - wb).abs().max() / wb.abs().max())


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def blew_up(summary: dict[str, Any]) -> bool:
    """Diverged: stopped on a NaN/inf, failed, or ended above its starting loss."""
    if summary.get("status") != "completed":
        return True
    final, initial = summary.get("final_train_loss"), summary.get("initial_train_loss")
    if not finite(final):
        return True
    return finite(initial) and final > initial


BLOW_UP_COLUMN = "blew up (NaN/inf, failed, or final > initial loss)"


def overrides_for(mode: str) -> list[str]:
    loss, op = mode.split("/")
    return [f"reduce.loss={loss}", f"reduce.op={op}"]


@dataclass
class LogSearch:
    """The outcome of :func:`minimize_log`.

    ``scores`` holds every probe (x -> score, in the order probed); ``best`` the probe of lowest
    score; ``bracket`` the final interval around it, None on a side where ``best`` is the last
    point tried (``edge`` then says "low" or "high"); ``extended`` the points added beyond the grid.
    """

    scores: dict[float, Any] = field(default_factory=dict)
    best: float | None = None
    bracket: tuple[float | None, float | None] = (None, None)
    edge: str | None = None
    extended: int = 0
    rounds: int = 0


def minimize_log(
    score: Callable[[float], Any],
    grid: list[float],
    extend: int = 0,
    rounds: int = 0,
    start: float | None = None,
) -> LogSearch:
    """Minimize ``score`` over x > 0 on a log scale: the grid first; while its best point is on
    an edge of the points tried, one more point beyond that edge at the grid's spacing (at most
    ``extend`` times); then ``rounds`` steps of golden-section search inside the best point's
    two neighbours, each step one new probe.

    ``start`` (a guess at the best x) orders the grid's probes, nearest to it first on a log
    scale; without it they go from the smallest. The order changes no decision of the search (it
    compares scores only), but :func:`steps_search`, which stops a probe once it cannot beat the
    best so far, wants a good probe early.

    Scores need only compare (floats, or tuples); use ``math.inf`` for a probe that blew up, so
    that it counts as worse than any finite one. Ties go to the smaller x. The search is
    deterministic given the scores, so a report replays it from the recorded probes.
    """
    if not grid:
        raise ValueError("an empty grid")
    out = LogSearch()

    def probe(x: float) -> Any:
        if x not in out.scores:
            out.scores[x] = score(x)
        return out.scores[x]

    xs = sorted(grid)
    order = xs if start is None else sorted(xs, key=lambda x: abs(math.log(x / start)))
    for x in order:
        probe(x)
    spacing = (xs[-1] / xs[0]) ** (1 / (len(xs) - 1)) if len(xs) > 1 else 10.0
    while True:
        pts = sorted(out.scores)
        i = min(range(len(pts)), key=lambda k: out.scores[pts[k]])  # first of equal scores
        if 0 < i < len(pts) - 1:
            break
        if out.extended >= extend:
            out.best = pts[i]
            out.edge = "low" if i == 0 else "high"
            lower = pts[i - 1] if i > 0 else None
            upper = pts[i + 1] if i < len(pts) - 1 else None
            out.bracket = (lower, upper)
            return out
        probe(pts[0] / spacing if i == 0 else pts[-1] * spacing)
        out.extended += 1
    la, lm, lb = (math.log(x) for x in pts[i - 1 : i + 2])
    fm = out.scores[pts[i]]
    best_x = pts[i]
    for _ in range(rounds):
        right = lb - lm > lm - la  # probe the larger side
        lx = lm + GOLDEN * (lb - lm) if right else lm - GOLDEN * (lm - la)
        x = math.exp(lx)
        fx = probe(x)
        out.rounds += 1
        if fx < fm:
            la, lb = (lm, lb) if right else (la, lm)
            lm, fm, best_x = lx, fx, x
        elif right:
            lb = lx
        else:
            la = lx
    out.best = best_x
    out.bracket = (math.exp(la), math.exp(lb))
    return out


def steps_search(
    probe: Callable[[float, int], tuple], grid: list[float], spec: Any, start: float | None
) -> tuple[LogSearch, float]:
    """:func:`minimize_log` of a budget "fewest steps to a target": ``probe(x, steps)`` trains
    for at most ``steps`` and returns its score, ``(0, steps taken, loss)`` where it reached the
    target, a larger tuple where it did not (``(1, 0, final loss)``, ``(2, ...)`` blown up).
    The study's ``spec`` gives ``max_steps``, ``extend`` and ``refine_rounds``; ``start``
    orders the grid (see :func:`minimize_log`; None: the grid's middle on a log scale). Returns
    the search and where the next one should start: its best x, or the same start where the
    best is on an edge.

    Each probe is given at most the steps of the best probe so far that reached the target: past
    them it cannot be the best, and the search only ever compares a probe with the best so far
    (the argmin of the grid, golden-section's new point against the middle one), so the optimum
    and bracket are those the full budget gives. What changes is only the probes that lose:
    they stop sooner, and their loss is the one at that step.
    """
    if start is None:
        start = math.sqrt(min(grid) * max(grid))
    cap = [spec["max_steps"]]

    def score(x: float) -> tuple:
        out = probe(x, cap[0])
        if out[0] == 0:
            cap[0] = min(cap[0], out[1])
        return out

    rounds = spec.get("refine_rounds", 0)
    search = minimize_log(score, grid, extend=spec["extend"], rounds=rounds, start=start)
    return search, (search.best if search.best is not None and not search.edge else start)


def grad_scale_of(overrides: list[str]) -> float:
    """c of the run these overrides compose (equal counts: the nominal factor of its summary)."""
    from ddp_reduce.config import batch_geometry, load_config
    from ddp_reduce.data import load_data
    from ddp_reduce.layer.reduction import nominal_scale
    from ddp_reduce.run.compose import compose_config

    cfg = load_config(compose_config(list(overrides))[0])
    geom = batch_geometry(cfg, cfg.dist.nproc, len(load_data(cfg.data).train))
    return nominal_scale(
        cfg.reduce.loss, cfg.reduce.op, geom.world_size, geom.local_batch_size, geom.accum_steps
    )
