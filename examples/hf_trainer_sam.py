"""SAM in Hugging Face's Trainer: a small GPT-2 language model on synthetic token sequences.

Run: ``python examples/hf_trainer_sam.py`` (needs ``pip install transformers``; CPU is enough,
about half a minute). The model is built from a config (nothing is downloaded); the sequences
repeat a few short motifs, so the loss falls well below that of uniform guessing (ln 64 = 4.16).

``SAMTrainer`` takes the Trainer's own optimizer (``args.optim``), its weight-decay groups and its
learning-rate schedule and makes each optimizer step a SAM step: the micro-batches of the step at
``w``, then again at ``w + e``, then the update (see ``sam_fused.integrations.transformers``).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from sam_fused.integrations.transformers import SAMTrainer

VOCAB, SEQ = 64, 24


class Motifs(torch.utils.data.Dataset):
    """Sequences made of 4-token motifs drawn from 8: predictable after the first token of each."""

    def __init__(self, n: int, seed: int = 0) -> None:
        motifs = torch.randint(0, VOCAB, (8, 4), generator=torch.Generator().manual_seed(0))  # one language
        picks = torch.randint(0, 8, (n, SEQ // 4), generator=torch.Generator().manual_seed(seed + 1))
        self.x = motifs[picks].reshape(n, SEQ)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--variant", choices=["sam", "asam", "gsam"], default="sam")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--accumulation", type=int, default=2)
    args = ap.parse_args(argv)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps, learning_rate=3e-3, weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch",
            lr_scheduler_type="cosine", warmup_steps=5, logging_steps=max(1, args.steps // 6), save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), seed=0)
        trainer = SAMTrainer(model=model, args=targs, train_dataset=Motifs(512), sam_rho=args.rho,
                             sam_variant=args.variant)
        result = trainer.train()
        evaluation = trainer.evaluate(Motifs(64, seed=1))
    print(f"{args.variant}, rho {args.rho}: train loss {result.training_loss:.3f}, "
          f"eval loss {evaluation['eval_loss']:.3f} (uniform guessing: 4.159)")
    return evaluation["eval_loss"]


if __name__ == "__main__":
    main()
