"""``ddp-reduce convert``: a published setting, rewritten for another reduction convention.

    ddp-reduce convert --from sum/sum --world-size 8 --batch-size 32 \\
        --optim sgd --lr 0.001 --momentum 0.9 --weight-decay 5e-4 --to mean/mean

The source runs with factor c_s, the target with c_t (DESIGN §1); k = c_t / c_s. With the same
global batch N, each knob converts exactly or not at all:

    SGD lr              η / k         exact (momentum and Nesterov are unchanged)
    SGD weight_decay    λ · k         exact only if changed: it is added after the reduction
    L2 in the loss      unchanged     exact: it is scaled with the loss
    clip_norm           τ · k         exact only if changed: clipping sees c·|G|
    Adam, AdamW lr      unchanged     Adam divides by the gradient's own scale
    Adam eps            ε · k         exact if changed; kept, it acts as ε/k (approximate)
    Adam weight_decay   λ · k         coupled: exact only if changed
    AdamW weight_decay  unchanged     decoupled: untouched by c

A different global batch changes the noise of every step: no knob makes that exact. ``--rule``
applies a scaling rule (linear, sqrt, adam_sqrt) on top, and every knob's verdict becomes
approximate: such rules hold below the critical batch size.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from ddp_reduce.reduction import (
    LossReduction,
    ReduceImpl,
    ReduceOp,
    check_combination,
    nominal_scale,
)

EXACT, APPROX = "exact", "approximate"
RULES = ("none", "linear", "sqrt", "adam_sqrt")


@dataclass(frozen=True)
class Setting:
    loss: str
    op: str
    world_size: int
    batch_size: int  # b, items per rank per micro-step
    accum_steps: int
    optim: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    l2: float = 0.0
    clip_norm: float | None = None
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps

    @property
    def c(self) -> float:
        return nominal_scale(
            LossReduction[self.loss],
            ReduceOp[self.op],
            self.world_size,
            self.batch_size,
            self.accum_steps,
        )

    def overrides(self) -> list[str]:
        """Hydra overrides that run this setting with ddp-reduce (or torchrun)."""
        out = [
            f"reduce.loss={self.loss}",
            f"reduce.op={self.op}",
            f"dist.nproc={self.world_size}",
            f"data.batch_size={self.batch_size}",
            f"train.accum_steps={self.accum_steps}",
            f"optim={self.optim}",
            f"optim.lr={self.lr:.10g}",
            f"optim.weight_decay={self.weight_decay:.10g}",
            f"optim.l2={self.l2:.10g}",
            f"optim.clip_norm={'null' if self.clip_norm is None else f'{self.clip_norm:.10g}'}",
        ]
        if self.optim == "sgd":
            out += [
                f"optim.momentum={self.momentum:.10g}",
                f"optim.nesterov={str(self.nesterov).lower()}",
            ]
        else:
            out += [
                f"optim.eps={self.eps:.10g}",
                f"optim.betas=[{self.betas[0]:.10g},{self.betas[1]:.10g}]",
            ]
        return out


@dataclass(frozen=True)
class Knob:
    name: str
    source: object
    target: object
    verdict: str
    why: str


def convert(
    src: Setting,
    loss: str,
    op: str,
    world_size: int | None = None,
    batch_size: int | None = None,
    accum_steps: int | None = None,
    rule: str = "none",
) -> tuple[Setting, list[Knob]]:
    """The target setting and a verdict per knob."""
    for name, value in (("loss", loss), ("op", op)):
        allowed = [m.name for m in (LossReduction if name == "loss" else ReduceOp)]
        if value not in allowed:
            raise ValueError(f"--to {name}={value} is not one of {allowed}")
    why_not = check_combination(LossReduction[loss], ReduceOp[op], ReduceImpl.hook)
    if why_not:
        raise ValueError(why_not)
    if rule not in RULES:
        raise ValueError(f"--rule={rule} is not one of {list(RULES)}")
    if rule == "adam_sqrt" and src.optim == "sgd":
        raise ValueError("--rule adam_sqrt is for adam and adamw; use linear or sqrt with sgd")
    dst = replace(
        src,
        loss=loss,
        op=op,
        world_size=world_size or src.world_size,
        batch_size=batch_size or src.batch_size,
        accum_steps=accum_steps or src.accum_steps,
    )
    k = dst.c / src.c  # convention factor
    kappa = dst.global_batch / src.global_batch  # batch factor
    same_batch = dst.global_batch == src.global_batch
    if not same_batch and rule == "none":
        raise ValueError(
            f"the global batch changes ({src.global_batch} -> {dst.global_batch}): name a "
            f"scaling rule with --rule linear|sqrt|adam_sqrt (none of them is exact)"
        )
    verdict = EXACT if same_batch else APPROX
    batch_note = "" if same_batch else f"; batch x{kappa:g} by the {rule} rule (holds below B_crit)"
    # the learning rate in c = 1 units, then the batch rule, then the target's units
    lr_rule = {
        "none": 1.0,
        "linear": kappa,
        "sqrt": math.sqrt(kappa),
        "adam_sqrt": math.sqrt(kappa),
    }
    knobs: list[Knob] = []
    if src.optim == "sgd":
        lr = src.lr / k * lr_rule[rule]
        knobs.append(Knob("lr", src.lr, lr, verdict, f"lr / k, k = c_t/c_s = {k:g}{batch_note}"))
        knobs.append(Knob("momentum", src.momentum, src.momentum, verdict, "unchanged"))
        wd = src.weight_decay * k
        knobs.append(
            Knob(
                "weight_decay",
                src.weight_decay,
                wd,
                verdict,
                "x k: added after the reduction, it would act as weight_decay/k if kept"
                if src.weight_decay
                else "none",
            )
        )
        dst = replace(dst, lr=lr, weight_decay=wd)
    else:
        eps = src.eps * k
        betas = src.betas
        lr = src.lr * lr_rule[rule]
        if rule == "adam_sqrt":
            betas = tuple(1 - kappa * (1 - b) for b in src.betas)
            eps = eps / math.sqrt(kappa)
        knobs.append(
            Knob(
                "lr",
                src.lr,
                lr,
                verdict,
                "unchanged: Adam divides by the gradient's scale" + batch_note,
            )
        )
        knobs.append(
            Knob(
                "eps",
                src.eps,
                eps,
                verdict,
                f"x k: kept at {src.eps:g} it would act as eps/k = {src.eps / k:g} (approximate)",
            )
        )
        if rule == "adam_sqrt":
            knobs.append(
                Knob("betas", src.betas, betas, APPROX, "1 - kappa(1 - beta) (Malladi et al.)")
            )
        if src.optim == "adam":
            wd = src.weight_decay * k
            why = "x k: coupled (added to the gradient), it would act as weight_decay/k if kept"
        else:
            wd = src.weight_decay
            why = "unchanged: decoupled decay is untouched by c"
        knobs.append(
            Knob("weight_decay", src.weight_decay, wd, verdict, why if src.weight_decay else "none")
        )
        dst = replace(dst, lr=lr, eps=eps, betas=betas, weight_decay=wd)
    knobs.append(
        Knob("l2 (in the loss)", src.l2, src.l2, verdict, "unchanged: scaled with the loss")
    )
    clip = None if src.clip_norm is None else src.clip_norm * k
    knobs.append(
        Knob(
            "clip_norm",
            src.clip_norm,
            clip,
            verdict,
            "x k: clipping sees c*|G|; kept, it would clip at another norm" if clip else "none",
        )
    )
    if k == 1:  # same convention: nothing is multiplied
        knobs = [
            replace(kn, why="unchanged: the same c" + batch_note)
            if kn.why.startswith("x k")
            else kn
            for kn in knobs
        ]
    return replace(dst, clip_norm=clip), knobs


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def render(src: Setting, dst: Setting, knobs: list[Knob]) -> str:
    def head(name: str, s: Setting) -> str:
        return (
            f"{name}: loss={s.loss} op={s.op} W={s.world_size} b={s.batch_size} "
            f"A={s.accum_steps} N={s.global_batch}  ->  c = {s.c:g}"
        )

    lines = [
        head("source", src),
        head("target", dst),
        "",
        "| knob | source | target | verdict | why |",
        "|---|---|---|---|---|",
    ]
    for kn in knobs:
        why = kn.why.replace("|", "\\|")  # a Markdown table cell
        lines.append(
            f"| {kn.name} | {_fmt(kn.source)} | {_fmt(kn.target)} | {kn.verdict} | {why} |"
        )
    lines += ["", "run the target with:", "  ddp-reduce " + " ".join(dst.overrides())]
    return "\n".join(lines)


def _convention(text: str) -> tuple[str, str]:
    try:
        loss, op = text.split("/")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected LOSS/OP, e.g. mean/mean or sum/global_mean"
        ) from None
    return loss, op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ddp-reduce convert",
        description="Rewrite a setting for another reduction convention (and batch).",
    )
    p.add_argument(
        "--from",
        dest="src",
        type=_convention,
        required=True,
        help="LOSS/OP of the source, e.g. sum/sum",
    )
    p.add_argument(
        "--to", dest="dst", type=_convention, required=True, help="LOSS/OP of the target"
    )
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="b: items per rank per micro-step")
    p.add_argument("--accum", type=int, default=1, help="A: micro-steps per optimizer step")
    p.add_argument("--to-world-size", type=int)
    p.add_argument("--to-batch-size", type=int)
    p.add_argument("--to-accum", type=int)
    p.add_argument("--rule", choices=RULES, default="none", help="scaling rule when N changes")
    p.add_argument("--optim", choices=("sgd", "adam", "adamw"), required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument(
        "--betas", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.9, 0.999)
    )
    a = p.parse_args(argv)
    for name in ("world_size", "batch_size", "accum", "to_world_size", "to_batch_size", "to_accum"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')}={value}: must be a positive integer")
    if a.lr <= 0:
        p.error(f"--lr={a.lr}: must be positive")
    src = Setting(
        loss=a.src[0],
        op=a.src[1],
        world_size=a.world_size,
        batch_size=a.batch_size,
        accum_steps=a.accum,
        optim=a.optim,
        lr=a.lr,
        momentum=a.momentum,
        nesterov=a.nesterov,
        weight_decay=a.weight_decay,
        l2=a.l2,
        clip_norm=a.clip_norm,
        eps=a.eps,
        betas=a.betas,
    )
    try:
        if src.loss not in LossReduction.__members__ or src.op not in ReduceOp.__members__:
            raise ValueError(
                f"--from {src.loss}/{src.op}: loss is sum|mean, op is sum|mean|global_mean"
            )
        why = check_combination(LossReduction[src.loss], ReduceOp[src.op], ReduceImpl.hook)
        if why:
            raise ValueError(why)
        dst, knobs = convert(src, *a.dst, a.to_world_size, a.to_batch_size, a.to_accum, a.rule)
    except ValueError as exc:
        p.error(str(exc))
    print(render(src, dst, knobs))
    return 0
