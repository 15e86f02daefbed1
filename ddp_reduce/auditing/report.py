"""An audit as people and tools read it: the printed table, the JSON, the folder with a figure."""

from __future__ import annotations

from pathlib import Path

from ddp_reduce.auditing.result import AuditResult

HEADER = ("layout", "W", "A", "b", "step", "factor", "direction error", "grad norm", "clipped",
          "same items")  # fmt: skip


def _num(x, fmt: str = ".6g") -> str:
    return "-" if x is None else format(x, fmt)


def rows(result: AuditResult) -> list[tuple[str, ...]]:
    with_c = any(r.c is not None for r in result.layouts)
    out = [HEADER + (("c", "residual") if with_c else ())]
    for r in result.layouts:
        for s in range(result.steps):
            line = (r.name, str(r.world_size), str(r.accum_steps), str(r.batch_size), str(s + 1),
                    _num(r.factor[s]), _num(r.direction_error[s], ".3g"),
                    _num(r.grad_norm[s], ".5g"),
                    "-" if r.clipped[s] is None else ("yes" if r.clipped[s] else "no"),
                    "-" if r.same_batch[s] is None else ("yes" if r.same_batch[s] else "NO"),
                    )  # fmt: skip
            if with_c:
                line += (_num(r.c[s] if r.c else None), _num(r.residual[s] if r.c else None, ".3g"))
            out.append(line)
            if r.error:
                break
    return out


def text(result: AuditResult) -> str:
    table = rows(result)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    fit = result.fit
    w, a = fit["world_size_exponent"], fit["accum_exponent"]
    exps = "" if w is None and a is None else f" (factor ∝ W^{_num(w, '.3g')} · A^{_num(a, '.3g')})"
    return "\n".join([*lines, "", f"verdict: {result.verdict}{exps}", result.diagnosis])


def figure(result: AuditResult, path: Path) -> None:
    """Factor and direction error per layout (one marker per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    names = [r.name for r in result.layouts]
    for s in range(result.steps):
        f = [r.factor[s] if r.factor[s] is not None else float("nan") for r in result.layouts]
        d = [r.direction_error[s] if r.direction_error[s] is not None else float("nan")
             for r in result.layouts]  # fmt: skip
        top.plot(names, f, "o", label=f"step {s + 1}")
        bottom.plot(names, d, "o")
    top.axhline(1.0, color="grey", lw=0.8)
    top.set_ylabel("factor vs first layout")
    bottom.set_ylabel("direction error")
    bottom.set_xlabel("layout W x A")
    top.set_title(f"audit: {result.verdict} (N = {result.global_batch})")
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: AuditResult, out: Path, json_path: Path | None) -> None:
    """The JSON (at ``json_path`` and/or in ``out``) and, in ``out``, the figure; each layout's
    log is already there (``layout-WxA/log.txt``)."""
    if json_path is not None:
        json_path.write_text(result.to_json() + "\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(result.to_json() + "\n")
        (out / "report.txt").write_text(text(result) + "\n")
        figure(result, out / "audit.png")
