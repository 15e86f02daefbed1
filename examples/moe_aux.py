"""A loss of two terms with their own units: token cross-entropy + a per-sequence MoE
load-balancing loss, each with its own factor from ``reducer.term_scales``.

    torchrun --nproc-per-node 2 examples/moe_aux.py --accum 2   # each term's c, and the errors
    python examples/moe_aux.py                                  # one process

The main term is a sum over tokens, the auxiliary one a sum over sequences (Switch-style load
balance of one sequence's tokens). ``term_scales(tokens=..., sequences=...)`` gives one factor
per unit from one all-reduce of the counts: with ``loss=sum, op=global_mean`` the optimizer
receives the gradient of  mean over the global batch's tokens of the cross-entropy  +  w · mean
over its sequences of the load-balancing loss, whatever W, A and the ranks' shares. The
weight w means the same thing at any W, A and b.

It runs one step and compares its gradient with the same weighted sum computed in one process
(float64), then shows what three usual ways of adding the auxiliary term do instead
(:data:`MISTAKES`): its mean over each rank's sequences, over each micro-batch's, or the
correct term multiplied by W. Ranks hold unequal numbers of sequences and tokens on purpose.
The lines that concern ddp_reduce are marked ``# <-``.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

import ddp_reduce

IGNORE = -100  # a padded target position


class TinyMoE(nn.Module):
    """Embedding, one mixture-of-experts layer (a softmax router over small MLP experts, every
    expert weighted by its router probability: no routing noise, nothing random), a head."""

    def __init__(self, vocab: int = 32, dim: int = 16, experts: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(experts)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tokens)
        probs = self.router(h).softmax(-1)  # (batch, time, experts)
        mixed = sum(probs[..., e : e + 1] * expert(h) for e, expert in enumerate(self.experts))
        return self.head(h + mixed), probs


def make_sequences(n: int = 64, max_len: int = 12, vocab: int = 32, seed: int = 0):
    """(inputs, targets) of ``n`` generated sequences of 3..max_len tokens, padded with
    IGNORE: a sequence predicts its next token, a rule the model can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, 1), generator=g)
    tokens = (start + steps * torch.arange(max_len + 1)) % vocab
    lengths = torch.randint(3, max_len + 1, (n,), generator=g)
    targets = tokens[:, 1:].clone()
    targets[torch.arange(max_len) >= lengths[:, None]] = IGNORE
    return tokens[:, :-1], targets


def counts(targets: torch.Tensor) -> dict[str, int]:
    """Each term's units in a batch, known before the forward: tokens and sequences."""
    return {"tokens": int((targets != IGNORE).sum()), "sequences": len(targets)}


def term_sums(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Each term summed over its own units: the cross-entropy over tokens, the load balance
    (experts · Σ_e f_e·P_e over the sequence's tokens, f_e the share routed to e by argmax,
    P_e the mean router probability) over sequences."""
    return sums_of(model(inputs), targets)


def sums_of(output: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor):
    """:func:`term_sums` of the model's output."""
    logits, probs = output
    valid = targets != IGNORE
    ce = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    experts = probs.shape[-1]
    mask = valid.unsqueeze(-1).to(probs.dtype)
    n_tok = mask.sum(1).clamp(min=1)  # (batch, 1)
    routed = F.one_hot(probs.argmax(-1), experts).to(probs.dtype)
    f = (routed * mask).sum(1) / n_tok  # (batch, experts)
    p = (probs * mask).sum(1) / n_tok
    balance = experts * (f * p).sum()
    return {"tokens": ce, "sequences": balance}


class TokensAndBalance:
    """The two terms as a ddp-reduce loss of several terms (``+loss._target_``): the units
    counted before the forward, each term summed over its own, the weights its arguments.

        PYTHONPATH=examples ddp-reduce +data._target_=moe_aux.splits \\
            +model._target_=moe_aux.TinyMoE +loss._target_=moe_aux.TokensAndBalance \\
            +loss.aux_weight=0.01 reduce.loss=sum reduce.op=global_mean
    """

    def __init__(self, aux_weight: float = 0.01):
        self.weights = {"tokens": 1.0, "sequences": aux_weight}

    def counts(self, targets: torch.Tensor) -> dict[str, int]:
        return counts(targets)

    def __call__(self, output, targets: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
        sums, n = sums_of(output, targets), counts(targets)
        return {unit: (sums[unit], n[unit]) for unit in n}


def splits(n_train: int = 256, n_eval: int = 64):
    """(train, eval) datasets of generated sequences, for ``+data._target_``."""
    return TensorDataset(*make_sequences(n_train, seed=0)), TensorDataset(
        *make_sequences(n_eval, seed=1)
    )


# Three usual ways of adding the auxiliary term, as the factor each puts on a rank's summed
# term of one micro-batch (given the correct factor, the step's global count of sequences and
# this rank's counts): the rank's own mean, the micro-batch's own mean, the term times W.
MISTAKES = {
    "rank_mean": lambda f, n_all, world, a, n_rank, n_micro: f * n_all / (world * n_rank),
    "micro_mean": lambda f, n_all, world, a, n_rank, n_micro: f * n_all / (world * a * n_micro),
    "times_w": lambda f, n_all, world, a, n_rank, n_micro: f * world,
}


def shares(global_batch: torch.Tensor, rank: int, world: int, accum: int) -> list[torch.Tensor]:
    """This rank's micro-batches of the step: contiguous, unequal where they do not divide."""
    return list(torch.tensor_split(torch.tensor_split(global_batch, world)[rank], accum))


def step(model, reducer, data, micro, weights, mistake=None):
    """One step's forward and backward; returns what the reduction reported."""
    inputs, targets = data
    units = {u: sum(counts(targets[m])[u] for m in micro) for u in weights}
    factors = reducer.term_scales(**units)  # <- one factor per unit, one all-reduce
    n_seq_all = torch.tensor(units["sequences"])
    if mistake:  # the mistakes are written in terms of the global count, to show their bias
        dist.all_reduce(n_seq_all)
    for i, m in enumerate(micro):
        with reducer.micro_batch(last=i == len(micro) - 1):  # <-
            sums = term_sums(model, inputs[m], targets[m])
            total = 0.0
            for unit, w in weights.items():
                f = factors[unit]  # <- each term summed over its units, times its factor
                if mistake and unit == "sequences":
                    world, a = dist.get_world_size(), len(micro)
                    f = MISTAKES[mistake](f, int(n_seq_all), world, a, units[unit], len(m))
                total = total + w * f * sums[unit]
            total.backward()
    return reducer.last_step


def reference_gradients(model: nn.Module, data, batch: torch.Tensor, weights) -> dict:
    """The gradient of each weighted term w_u · (term u summed over the global batch) / (its
    units), in one process, in float64."""
    ref = TinyMoE().double()
    ref.load_state_dict(model.state_dict())
    inputs, targets = data
    n = counts(targets[batch])
    out = {}
    for unit, w in weights.items():
        term = w * term_sums(ref, inputs[batch], targets[batch])[unit] / n[unit]
        grads = torch.autograd.grad(term, list(ref.parameters()), materialize_grads=True)
        out[unit] = torch.cat([g.flatten() for g in grads])
    return out


def check(accum: int, weights: dict[str, float], per_step: int = 13) -> dict:
    """Step 1 with the factors of ``term_scales`` and with each mistake: the gradient's error
    relative to the one-process reference of the weighted sum, the same error relative to
    the auxiliary term's own share of it (the mistake's bias on that term: W - 1 for
    ``times_w``), and each term's c as the reduction reported it; the same on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data = make_sequences()
    batch = torch.arange(per_step)
    micro = shares(batch, rank, world, accum)
    out = {}
    for mistake in (None, *MISTAKES):
        torch.manual_seed(0)
        net = TinyMoE()
        refs = reference_gradients(net, data, batch, weights)
        ref = sum(refs.values())
        model = DDP(net)
        reducer = ddp_reduce.attach(model, loss="sum", op="global_mean")  # <-
        report = step(model, reducer, data, micro, weights, mistake)
        grad = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
        out[mistake or "term_scales"] = {
            "rel_error": ((grad - ref).norm() / ref.norm()).item(),
            "aux_error": ((grad - ref).norm() / refs["sequences"].norm()).item(),
            "c": {u: t.c for u, t in report.terms.items()},
            "global_units": {u: t.global_units for u, t in report.terms.items()},
        }
        del model
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--aux-weight", type=float, default=0.01)
    a = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:  # one process, no launcher
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    result = check(a.accum, {"tokens": 1.0, "sequences": a.aux_weight})
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"W={world} A={a.accum}: 13 sequences a step, split unequally over the ranks")
        cs = ", ".join(f"{u} c={c:g}" for u, c in result["term_scales"]["c"].items())
        print(f"  term_scales: {cs}")
        print("  |g - one process| relative to the whole gradient, and to the aux term's share:")
        for name, r in result.items():
            print(f"  {name:12s} {r['rel_error']:9.2e} {r['aux_error']:9.2e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # PyTorch (2.13 here) can abort a rank at interpreter exit after a clean teardown (see
    # examples/ddp_script.py): end the process at once, streams flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
