"""A Hugging Face ``Trainer`` script as its users write it: a small randomly initialised GPT-2
(built from a config, nothing downloaded) on ragged byte sequences of Python's own source, with
gradient accumulation. It knows nothing of ddp_reduce.

    torchrun --nproc-per-node 2 examples/audit/hf_trainer.py --per-device-batch 2 --grad-accum 2
    ddp-reduce audit --global-batch 8 --reference causal-lm -- examples/audit/hf_trainer.py \\
        --per-device-batch {b} --grad-accum {A}
"""

import argparse
import inspect
import json
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

IGNORE = -100


def byte_sequences(n: int = 64) -> list[dict]:
    """Ragged sequences: the first lines of ``json``'s source as bytes, 2 to 40 of them each."""
    lines = [ln.strip().encode() for ln in inspect.getsource(json.decoder).splitlines()]
    lines = [ln[:40] for ln in lines if len(ln) >= 2]
    return [{"input_ids": list(ln)} for ln in lines[:n]]


def collate(mask_first_label: bool):
    def fn(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, IGNORE)
        if mask_first_label:  # the shifted loss never scores a sequence's first token
            labels[:, 0] = IGNORE
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-device-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--average-tokens-across-devices", choices=["true", "false"], default="true")
    p.add_argument(
        "--mask-first-label",
        action="store_true",
        help="label the first token -100, so the token count is the scored count",
    )
    a = p.parse_args()  # fmt: skip

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=a.per_device_batch,
            gradient_accumulation_steps=a.grad_accum,
            max_steps=a.steps,
            learning_rate=1e-3,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
            average_tokens_across_devices=a.average_tokens_across_devices == "true",
        )
        trainer = Trainer(model=model, args=args, train_dataset=byte_sequences(),
                          data_collator=collate(a.mask_first_label))  # fmt: skip
        trainer.train()


if __name__ == "__main__":
    main()
