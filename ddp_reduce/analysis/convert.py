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

``--from`` and ``--to`` take ``LOSS/OP`` or the name of a framework's convention
(:data:`PRESETS`: ``ddp-reduce convert --list-presets``, cited in docs/conventions.md):
``--from pytorch-ddp`` is ``--from mean/mean``.

This path imports neither torch nor Hydra: it is a calculator, and starts like one.
"""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass, field, replace

from ddp_reduce.analysis.tables import table
from ddp_reduce.layer.reduction import (
    LossReduction,
    ReduceImpl,
    ReduceOp,
    check_combination,
    nominal_scale,
    plan_step,
)
from ddp_reduce.scaling import LrScaling, ScalingError, scale

EXACT, APPROX = "exact", "approximate"
RULES = tuple(r.name for r in LrScaling)
OPTIMIZERS = ("sgd", "adam", "adamw")
LOCAL_RANKS_HINT = 8  # above this many ranks, convert also prints the torchrun form


class ConvertError(ValueError):
    """A setting that cannot be converted; the message names the option and what is allowed."""


# torch numbers ranks in 32-bit integers; batch sizes and accumulation steps are held to the
# same bound, so that N = W*b*A and the rates derived from it stay exact floats
COUNT_MAX = 2**31 - 1


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
        raise ConvertError(
            f"{text}: loss is {'|'.join(LossReduction.__members__)}, "
            f"op is {'|'.join(ReduceOp.__members__)}"
        )
    why = check_combination(LossReduction[loss], ReduceOp[op], ReduceImpl.hook)
    if why:
        raise ConvertError(why)
    return loss, op


@dataclass(frozen=True)
class Preset:
    """A framework's reduction, as the ddp_reduce convention (``loss``, ``op``) that runs it.

    ``c`` is written in W (ranks), b (items per rank per micro-step), A (micro-steps), N = W·b·A
    and, for per-token losses, T (non-padding tokens of the whole step, all ranks), T_r (rank r's)
    and T_ra (one micro-batch's). ``note`` says where the mapping depends on the user's own code
    or is not exact. Each entry is cited in docs/conventions.md.
    """

    name: str
    loss: str
    op: str
    what: str  # the framework and the setting, one line
    c: str
    source: str  # the primary public source (docs/conventions.md lists the others)
    note: str = ""

    @property
    def convention(self) -> str:
        return f"{self.loss}/{self.op}"

    @property
    def exact_with_ragged_counts(self) -> bool:
        return exact_with_ragged_counts(self.loss, self.op)


def exact_with_ragged_counts(loss: str, op: str) -> bool:
    """Whether the convention ``loss``/``op`` still gives the optimizer exactly c·G when ranks
    and micro-batches hold different item counts; asked of the reduction arithmetic itself,
    not restated here."""
    plan = plan_step(
        LossReduction[loss],
        ReduceOp[op],
        world_size=2,
        local_items=3,
        counts=[3, 5],
        micro_items=(1, 2),
        micro_equal=False,
    )
    return plan.exact


_HF_TRAINER = "https://github.com/huggingface/transformers/blob/main/src/transformers/trainer.py"
_HOROVOD = "https://github.com/horovod/horovod/blob/master/horovod/torch/optimizer.py"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "pytorch-ddp",
            "mean",
            "mean",
            "PyTorch DistributedDataParallel: loss averaged on each rank, gradients averaged "
            "over ranks",
            "1: (1/W)·Σ_r (mean over rank r's b·A items)",
            "https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html",
            "accumulating under no_sync with each micro-batch's mean divided by A is "
            "micro_mean/mean (the same c)",
        ),
        Preset(
            "horovod-average",
            "micro_mean",
            "mean",
            "Horovod hvd.DistributedOptimizer(op=hvd.Average), loss averaged per micro-batch",
            "1: each micro-batch's mean / A, summed over A, then / W",
            _HOROVOD,
            "backward_passes_per_step=A sums the A backward passes; the division by A is the "
            "user's (Horovod's ImageNet example divides each sub-batch's mean by it): without it "
            "c = A, which no ddp_reduce convention has. gradient_predivide_factor only splits "
            "the 1/W around the sum",
        ),
        Preset(
            "horovod-sum",
            "micro_mean",
            "sum",
            "Horovod hvd.DistributedOptimizer(op=hvd.Sum), loss averaged per micro-batch",
            "W: each micro-batch's mean / A, summed over A and over W ranks",
            _HOROVOD,
            "as horovod-average, without the 1/W: if the user does not divide by A, c = W·A, "
            "which no ddp_reduce convention has",
        ),
        Preset(
            "deepspeed",
            "micro_mean",
            "mean",
            "DeepSpeed engine defaults: loss / gradient_accumulation_steps, gradients averaged "
            "over data-parallel ranks",
            "1: each micro-batch's mean / A (DeepSpeed's own division), then / W",
            "https://github.com/microsoft/DeepSpeed/blob/master/deepspeed/runtime/engine.py",
            "assumes the model returns its micro-batch's mean loss (as Hugging Face models do); "
            "a summed loss gives c = N/(W·A) = b, which no ddp_reduce convention has "
            "(sum/mean is b·A). prescale_gradients and gradient_predivide_factor move the 1/W "
            "before or around the all-reduce; c is the same",
        ),
        Preset(
            "hf-trainer-pre-2024-fix",
            "micro_mean",
            "mean",
            "Hugging Face Trainer before the October 2024 gradient-accumulation fix "
            "(transformers < 4.46)",
            "1: each micro-batch / its own T_ra tokens / A, then / W",
            "https://huggingface.co/blog/gradient_accumulation",
            "also what later versions do for models whose forward does not take num_items_in_batch",
        ),
        Preset(
            "hf-trainer-2024-fix",
            "mean",
            "mean",
            "Hugging Face Trainer with num_items_in_batch, average_tokens_across_devices=False "
            "(the default until transformers 4.54)",
            "1: rank r's summed loss / T_r (its tokens over all A micro-batches), then / W",
            _HF_TRAINER,
            "exact across micro-batches, not across ranks: a mean of the ranks' per-token means",
        ),
        Preset(
            "hf-trainer-2024-fix-devices",
            "sum",
            "global_mean",
            "Hugging Face Trainer with num_items_in_batch, average_tokens_across_devices=True "
            "(the default since transformers 4.54)",
            "1: rank r's summed loss · W / T, T gathered from all ranks, then / W",
            _HF_TRAINER,
        ),
        Preset(
            "megatron-default",
            "micro_mean",
            "mean",
            "Megatron-LM (Megatron Core) with calculate_per_token_loss=False (the default)",
            "1: each micro-batch's summed loss / its T_ra tokens / A, then / W",
            "https://github.com/NVIDIA/Megatron-LM/blob/main/megatron/core/pipeline_parallel/"
            "schedules.py",
        ),
        Preset(
            "megatron-per-token",
            "sum",
            "global_mean",
            "Megatron-LM (Megatron Core) with calculate_per_token_loss=True "
            "(--calculate-per-token-loss)",
            "1: summed losses, gradients summed over W ranks, then / T (all-reduced)",
            "https://github.com/NVIDIA/Megatron-LM/blob/main/megatron/core/distributed/"
            "finalize_model_grads.py",
            "T is all-reduced over data- and context-parallel ranks and broadcast along the "
            "pipeline: the non-padding tokens of the global batch",
        ),
        Preset(
            "torchtitan",
            "sum",
            "global_mean",
            "torchtitan: local summed loss / global token count, FSDP's own 1/W disabled",
            "1: rank r's summed loss / T, T all-reduced over data-parallel ranks, summed over W",
            "https://github.com/pytorch/torchtitan/pull/2206",
            "since January 2026; before it, each micro-batch was averaged on its own "
            "(micro_mean/mean)",
        ),
        Preset(
            "summed-loss",
            "sum",
            "sum",
            "summed-loss tutorial code (Dive into Deep Learning, multi-GPU training from "
            "scratch): loss reduction='sum', gradients all-reduced with SUM",
            "N = W·b·A (N_t, the items the step holds, when ragged)",
            "https://d2l.ai/chapter_computational-performance/multiple-gpus.html",
            "the tutorial's own sgd divides the step by the batch size, so its lr is in c = 1 "
            "units; with torch.optim.SGD the summed gradient gives c = N",
        ),
    )
}


def resolve(text: str) -> tuple[str, str]:
    """A preset's name or ``LOSS/OP`` as (loss, op); anything else is refused, naming it."""
    if text in PRESETS:
        return PRESETS[text].loss, PRESETS[text].op
    if "/" not in text:
        raise ConvertError(
            f"{text!r}: expected LOSS/OP (e.g. mean/mean, sum/global_mean) or a preset, one of "
            f"{', '.join(PRESETS)} (ddp-reduce convert --list-presets)"
        )
    return convention(text)


def presets_table() -> str:
    """Every preset: its convention, c, whether it stays exact on ragged counts, its source;
    then the notes."""
    rows = [
        [p.name, p.what, p.convention, p.c, p.exact_with_ragged_counts, p.source]
        for p in PRESETS.values()
    ]
    header = ["preset", "framework, setting", "convention", "c", "exact, ragged counts", "source"]
    notes = [f"- {p.name}: {p.note}" for p in PRESETS.values() if p.note]
    legend = (
        "W ranks, b items per rank per micro-step, A micro-steps, N = W·b·A; T the step's "
        "non-padding tokens (all ranks), T_r rank r's, T_ra one micro-batch's."
    )
    return "\n".join([table(header, rows), "", legend, "", "notes:", *notes])


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
                isinstance(value, int) and 0 < value <= COUNT_MAX,
                f"--{name.replace('_', '-')}",
                value,
                f"a positive integer, at most {COUNT_MAX}",
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

    def commands(self) -> list[str]:
        """How to run this setting: ddp-reduce starts every rank on this machine; beyond a few
        ranks that is a cluster's job (torchrun decides the world size there: no dist.nproc)."""
        # quoted for any shell: zsh expands an unquoted [..] (optim.betas=[0.9,0.999]) as a glob
        overrides = [shlex.quote(o) for o in self.overrides()]
        lines = [f"  ddp-reduce {' '.join(overrides)}"]
        if self.world_size > LOCAL_RANKS_HINT:
            rest = " ".join(o for o in overrides if not o.startswith("dist.nproc="))
            per_node = next(k for k in (8, 4, 2, 1) if self.world_size % k == 0)
            nodes = self.world_size // per_node
            lines[0] += f"    # all {self.world_size} ranks on this one machine"
            lines.append(
                f"  torchrun --nnodes={nodes} --nproc-per-node={per_node} "
                f"--rdzv-backend=c10d --rdzv-endpoint=HOST:29400 -m ddp_reduce.train {rest}"
                f"    # on each of {nodes} nodes (W = {nodes} x {per_node})"
            )
        return lines

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

    def ragged_caveat(self) -> list[str]:
        """A note where the verdicts hold for equal counts only: the source gives exactly c·G
        with ragged counts (tokens, a short last batch) and the target does not."""
        src, dst = self.source, self.target
        if not exact_with_ragged_counts(src.loss, src.op) or exact_with_ragged_counts(
            dst.loss, dst.op
        ):
            return []
        return [
            f"note: the verdicts assume equal item counts. With ragged counts (per-token "
            f"losses, a short last batch) {dst.loss}/{dst.op} is a mean of means, not exactly "
            f"c*G, where {src.loss}/{src.op} is exact: no setting makes the two runs equal.",
            "",
        ]

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
            *self.ragged_caveat(),
            "run the target with:",
            *self.target.commands(),
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
    """``source`` rewritten for the convention ``to`` (``LOSS/OP`` or a preset's name, see
    :data:`PRESETS`) and, with a scaling ``rule``, another global batch; a verdict per knob."""
    loss, op = resolve(to)
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
    step = _Rewrite(source, k, verdict, note, rule)
    knobs, dst, decay_why = step.sgd(dst, scaled) if sgd else step.adam(dst, scaled)
    knobs += step.shared(dst.weight_decay, decay_why)
    if k == 1:  # same convention: nothing is multiplied
        knobs = [
            replace(kn, why="unchanged: the same c" + note) if kn.why.startswith("x k") else kn
            for kn in knobs
        ]
    return Conversion(source, replace(dst, clip_norm=step.clip), knobs)


@dataclass
class _Rewrite:
    """The knobs of one conversion: c changes by ``k``, each knob gets ``verdict``."""

    source: Setting
    k: float
    verdict: str
    note: str  # the batch rule's caveat, appended to the lr's line
    rule: str

    @property
    def clip(self) -> float | None:
        return None if self.source.clip_norm is None else self.source.clip_norm * self.k

    def sgd(self, dst: Setting, scaled) -> tuple[list[Knob], Setting, str]:
        """SGD's knobs, the rewritten setting, and why weight decay changes as it does."""
        src, k = self.source, self.k
        knobs = [
            Knob("lr", src.lr, scaled.lr, self.verdict, f"lr / k, k = c_t/c_s = {k:g}{self.note}"),
            Knob("momentum", src.momentum, src.momentum, self.verdict, "unchanged"),
        ]
        why = "x k: added after the reduction, it would act as weight_decay/k if kept"
        return knobs, replace(dst, lr=scaled.lr, weight_decay=src.weight_decay * k), why

    def adam(self, dst: Setting, scaled) -> tuple[list[Knob], Setting, str]:
        """Adam's (and AdamW's) knobs, the rewritten setting, and why weight decay changes."""
        src, k = self.source, self.k
        why_lr = "unchanged: Adam divides by the gradient's scale" + self.note
        why_eps = f"x k: kept at {src.eps:g} it would act as eps/k = {src.eps / k:g} (approximate)"
        knobs = [
            Knob("lr", src.lr, scaled.lr, self.verdict, why_lr),
            Knob("eps", src.eps, scaled.eps, self.verdict, why_eps),
        ]
        if self.rule == "adam_sqrt":
            why = "1 - kappa(1 - beta) (Malladi et al.)"
            knobs.append(Knob("betas", src.betas, scaled.betas, APPROX, why))
        if src.optim == "adam":
            wd = src.weight_decay * k
            decay_why = (
                "x k: coupled (added to the gradient), it would act as weight_decay/k if kept"
            )
        else:
            wd = src.weight_decay
            decay_why = "unchanged: decoupled decay is untouched by c"
        dst = replace(dst, lr=scaled.lr, eps=scaled.eps, betas=scaled.betas, weight_decay=wd)
        return knobs, dst, decay_why

    def shared(self, weight_decay: float, decay_why: str) -> list[Knob]:
        """Weight decay (why it changes: sgd's or adam's), the loss's L2 and clipping."""
        src, verdict = self.source, self.verdict
        clip_why = "x k: clipping sees c*|G|; kept, it would clip at another norm"
        return [
            Knob(
                "weight_decay",
                src.weight_decay,
                weight_decay,
                verdict,
                decay_why if src.weight_decay else "none",
            ),
            Knob("l2 (in the loss)", src.l2, src.l2, verdict, "unchanged: scaled with the loss"),
            Knob("clip_norm", src.clip_norm, self.clip, verdict, clip_why if self.clip else "none"),
        ]


# Required to convert, and only then: ``--list-presets`` needs none of them.
REQUIRED_TO_CONVERT = (
    ("--from", "src"),
    ("--to", "dst"),
    ("--world-size", "world_size"),
    ("--batch-size", "batch_size"),
    ("--optim", "optim"),
    ("--lr", "lr"),
)


def _betas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: two numbers, e.g. 0.9,0.999") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddp-reduce convert",
        description="Rewrite a setting for another reduction convention (and batch).",
        epilog="--from, --to, --world-size, --batch-size, --optim and --lr are required to "
        "convert; --list-presets needs none of them.",
    )
    p.add_argument(
        "--list-presets",
        action="store_true",
        help="print the frameworks' conventions usable as --from/--to, with c, and exit",
    )
    p.add_argument(
        "--from", dest="src", help="LOSS/OP of the source, e.g. sum/sum, or a preset's name"
    )
    p.add_argument("--to", dest="dst", help="LOSS/OP of the target, or a preset's name")
    p.add_argument("--world-size", type=int)
    p.add_argument("--batch-size", type=int, help="b: items per rank per micro-step")
    p.add_argument("--accum", type=int, default=1, help="A: micro-steps per optimizer step")
    p.add_argument("--to-world-size", type=int)
    p.add_argument("--to-batch-size", type=int)
    p.add_argument("--to-accum", type=int)
    p.add_argument("--rule", choices=RULES, default="none", help="scaling rule when N changes")
    p.add_argument("--optim", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float)
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
    if a.list_presets:
        print(presets_table())
        return 0
    missing = [flag for flag, dest in REQUIRED_TO_CONVERT if getattr(a, dest) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    for name in ("to_world_size", "to_batch_size", "to_accum"):
        value = getattr(a, name)
        if value is not None and not 0 < value <= COUNT_MAX:
            shown = value if value.bit_length() < 64 else f"a number of {len(str(value))} digits"
            p.error(f"--{name.replace('_', '-')}={shown}: a positive integer, at most {COUNT_MAX}")
    try:
        loss, op = resolve(a.src)
        resolve(a.dst)  # refused before any other check, naming the value
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
