"""``ddp-reduce convert``: a published setting, rewritten for another reduction convention.

    ddp-reduce convert --from sum/sum --world-size 8 --batch-size 32 \\
        --optim sgd --lr 0.001 --momentum 0.9 --weight-decay 5e-4 --to mean/mean

The source runs with factor c_s, the target with c_t (docs/design.md §1); k = c_t / c_s. With
the same global batch N, each knob converts exactly or not at all:

    SGD lr              η / k         exact (momentum and Nesterov are unchanged)
    SGD weight_decay    λ · k         exact only if changed: it is added after the reduction
    L2 in the loss      unchanged     exact: it is scaled with the loss
    clip_norm           τ · k         exact only if changed: clipping sees c·|G|
    Adam, AdamW lr      unchanged     Adam divides by the gradient's own scale
    Adam eps            ε · k         exact if changed; kept, it acts as ε/k (approximate)
    Adam weight_decay   λ · k         coupled: exact only if changed
    AdamW weight_decay  unchanged     decoupled: untouched by c

A different global batch changes the noise of every step: no knob makes that exact. ``--rule``
applies a scaling rule (:mod:`ddp_reduce.scaling`) on top, and every knob's verdict becomes
approximate: such rules hold below the critical batch size.

This path imports neither torch nor Hydra: it is a calculator, and starts like one.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace

from ddp_reduce.analysis.tables import table
from ddp_reduce.reduction import (
    LossReduction,
    ReduceImpl,
    ReduceOp,
    check_combination,
    nominal_scale,
)
from ddp_reduce.scaling import LrScaling, ScalingError, scale

EXACT, APPROX = "exact", "approximate"
RULES = tuple(r.name for r in LrScaling)
OPTIMIZERS = ("sgd", "adam", "adamw")


class ConvertError(ValueError):
    """A setting that cannot be converted; the message names the option and what is allowed."""


def _check(ok: bool, option: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConvertError(f"{option}={value}: {allowed}")


def convention(text: str) -> tuple[str, str]:
    """``LOSS/OP`` as (loss, op), refused unless it is a convention ddp_reduce can run."""
    try:
        loss, op = text.split("/")
    except ValueError:
        raise ConvertError(
            f"{text!r}: expected LOSS/OP, e.g. mean/mean or sum/global_mean"
        ) from None
    if loss not in LossReduction.__members__ or op not in ReduceOp.__members__:
        raise ConvertError(f"{text}: loss is sum|mean, op is sum|mean|global_mean")
    why = check_combination(LossReduction[loss], ReduceOp[op], ReduceImpl.hook)
    if why:
        raise ConvertError(why)
    return loss, op


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

    def __post_init__(self) -> None:
        convention(f"{self.loss}/{self.op}")
        for name in ("world_size", "batch_size", "accum_steps"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and value > 0,
                f"--{name.replace('_', '-')}",
                value,
                "a positive integer",
            )
        _check(self.optim in OPTIMIZERS, "--optim", self.optim, f"one of {list(OPTIMIZERS)}")
        _check(_finite(self.lr) and self.lr > 0, "--lr", self.lr, "a finite number > 0")
        _check(
            _finite(self.momentum) and 0 <= self.momentum < 1,
            "--momentum",
            self.momentum,
            "0 <= momentum < 1",
        )
        for name in ("weight_decay", "l2"):
            value = getattr(self, name)
            _check(
                _finite(value) and value >= 0,
                f"--{name.replace('_', '-')}",
                value,
                "a finite number >= 0",
            )
        if self.clip_norm is not None:
            _check(
                _finite(self.clip_norm) and self.clip_norm > 0,
                "--clip-norm",
                self.clip_norm,
                "a finite number > 0",
            )
        _check(_finite(self.eps) and self.eps > 0, "--eps", self.eps, "a finite number > 0")
        _check(
            len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas),
            "--betas",
            ",".join(str(b) for b in self.betas),
            "two numbers in [0, 1), e.g. 0.9,0.999",
        )
        _check(
            not self.nesterov or (self.optim == "sgd" and self.momentum > 0),
            "--nesterov",
            self.nesterov,
            "only with --optim sgd and --momentum > 0",
        )

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


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class Knob:
    name: str
    source: object
    target: object
    verdict: str  # exact | approximate
    why: str


@dataclass(frozen=True)
class Conversion:
    source: Setting
    target: Setting
    knobs: list[Knob] = field(default_factory=list)

    @property
    def k(self) -> float:
        """c_t / c_s: the convention factor."""
        return self.target.c / self.source.c

    def render(self) -> str:
        def head(name: str, s: Setting) -> str:
            return (
                f"{name}: loss={s.loss} op={s.op} W={s.world_size} b={s.batch_size} "
                f"A={s.accum_steps} N={s.global_batch}  ->  c = {s.c:g}"
            )

        rows = [[kn.name, kn.source, kn.target, kn.verdict, kn.why] for kn in self.knobs]
        lines = [
            head("source", self.source),
            head("target", self.target),
            "",
            table(["knob", "source", "target", "verdict", "why"], rows, digits=6),
            "",
            "run the target with:",
            "  ddp-reduce " + " ".join(self.target.overrides()),
        ]
        return "\n".join(lines)


def convert(
    source: Setting,
    to: str,
    *,
    world_size: int | None = None,
    batch_size: int | None = None,
    accum_steps: int | None = None,
    rule: str = "none",
) -> Conversion:
    """``source`` rewritten for the convention ``to`` (``LOSS/OP``) and, with a scaling
    ``rule``, another global batch; a verdict per knob."""
    loss, op = convention(to)
    _check(rule in RULES, "--rule", rule, f"one of {list(RULES)}")
    _check(
        rule != "adam_sqrt" or source.optim != "sgd",
        "--rule",
        rule,
        "linear or sqrt with --optim sgd (adam_sqrt is for adam and adamw)",
    )
    dst = replace(
        source,
        loss=loss,
        op=op,
        world_size=world_size or source.world_size,
        batch_size=batch_size or source.batch_size,
        accum_steps=accum_steps or source.accum_steps,
    )
    k = dst.c / source.c  # convention factor
    kappa = dst.global_batch / source.global_batch  # batch factor
    same_batch = dst.global_batch == source.global_batch
    if not same_batch and rule == "none":
        raise ConvertError(
            f"the global batch changes ({source.global_batch} -> {dst.global_batch}): name a "
            "scaling rule with --rule linear|sqrt|adam_sqrt (none of them is exact)"
        )
    verdict = EXACT if same_batch else APPROX
    note = "" if same_batch else f"; batch x{kappa:g} by the {rule} rule (holds below B_crit)"
    sgd = source.optim == "sgd"
    # SGD's lr in c = 1 units, then the batch rule; Adam's eps carries c instead of its lr.
    try:
        scaled = scale(
            LrScaling[rule],
            kappa,
            source.lr / k if sgd else source.lr,
            source.betas,
            source.eps if sgd else source.eps * k,
        )
    except ScalingError as exc:
        raise ConvertError(f"--rule={rule}: {exc}") from None
    knobs: list[Knob] = []
    if sgd:
        knobs.append(
            Knob("lr", source.lr, scaled.lr, verdict, f"lr / k, k = c_t/c_s = {k:g}{note}")
        )
        knobs.append(Knob("momentum", source.momentum, source.momentum, verdict, "unchanged"))
        wd = source.weight_decay * k
        why = "x k: added after the reduction, it would act as weight_decay/k if kept"
        dst = replace(dst, lr=scaled.lr, weight_decay=wd)
    else:
        knobs.append(
            Knob(
                "lr",
                source.lr,
                scaled.lr,
                verdict,
                "unchanged: Adam divides by the gradient's scale" + note,
            )
        )
        knobs.append(
            Knob(
                "eps",
                source.eps,
                scaled.eps,
                verdict,
                f"x k: kept at {source.eps:g} it would act as eps/k = {source.eps / k:g} "
                "(approximate)",
            )
        )
        if rule == "adam_sqrt":
            knobs.append(
                Knob(
                    "betas",
                    source.betas,
                    scaled.betas,
                    APPROX,
                    "1 - kappa(1 - beta) (Malladi et al.)",
                )
            )
        if source.optim == "adam":
            wd = source.weight_decay * k
            why = "x k: coupled (added to the gradient), it would act as weight_decay/k if kept"
        else:
            wd = source.weight_decay
            why = "unchanged: decoupled decay is untouched by c"
        dst = replace(dst, lr=scaled.lr, eps=scaled.eps, betas=scaled.betas, weight_decay=wd)
    knobs.append(
        Knob(
            "weight_decay", source.weight_decay, wd, verdict, why if source.weight_decay else "none"
        )
    )
    knobs.append(
        Knob("l2 (in the loss)", source.l2, source.l2, verdict, "unchanged: scaled with the loss")
    )
    clip = None if source.clip_norm is None else source.clip_norm * k
    knobs.append(
        Knob(
            "clip_norm",
            source.clip_norm,
            clip,
            verdict,
            "x k: clipping sees c*|G|; kept, it would clip at another norm" if clip else "none",
        )
    )
    if k == 1:  # same convention: nothing is multiplied
        knobs = [
            replace(kn, why="unchanged: the same c" + note) if kn.why.startswith("x k") else kn
            for kn in knobs
        ]
    return Conversion(source, replace(dst, clip_norm=clip), knobs)


def _betas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: two numbers, e.g. 0.9,0.999") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddp-reduce convert",
        description="Rewrite a setting for another reduction convention (and batch).",
    )
    p.add_argument("--from", dest="src", required=True, help="LOSS/OP of the source, e.g. sum/sum")
    p.add_argument("--to", dest="dst", required=True, help="LOSS/OP of the target")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="b: items per rank per micro-step")
    p.add_argument("--accum", type=int, default=1, help="A: micro-steps per optimizer step")
    p.add_argument("--to-world-size", type=int)
    p.add_argument("--to-batch-size", type=int)
    p.add_argument("--to-accum", type=int)
    p.add_argument("--rule", choices=RULES, default="none", help="scaling rule when N changes")
    p.add_argument("--optim", choices=OPTIMIZERS, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--betas", type=_betas, default=(0.9, 0.999))
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    for name in ("to_world_size", "to_batch_size", "to_accum"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')}={value}: a positive integer")
    try:
        loss, op = convention(a.src)
        src = Setting(
            loss=loss,
            op=op,
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
        result = convert(
            src,
            a.dst,
            world_size=a.to_world_size,
            batch_size=a.to_batch_size,
            accum_steps=a.to_accum,
            rule=a.rule,
        )
    except ConvertError as exc:
        p.error(str(exc))
    print(result.render())
    return 0
