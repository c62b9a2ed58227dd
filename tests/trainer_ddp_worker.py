"""SAMTrainer under torchrun (DDP through accelerate, gloo on the CPU) or in one process: a tiny GPT-2
on fixed token sequences taken in order (a sequential sampler), so that the two ranks' micro-batches
of 4 together are the single process's micro-batches of 8. Rank 0 (or the single process) saves the
trained weights to the path given. Used by tests/test_transformers.py."""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import transformers

from sam_fused.integrations.transformers import SAMTrainer

SEQ, VOCAB = 12, 50


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class InOrder(SAMTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def deepspeed_config(stage: int) -> dict:
    """DeepSpeed through the Trainer: ZeRO ``stage``, the Trainer's values ("auto"), its clipping."""
    import deepspeed.ops

    # an inference-only shared-memory op DeepSpeed would JIT-build (~60 s) on its first init
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def main(out: str, per_device: int, variant: str, deepspeed_stage: int | None = None, save_steps: int = 0,
         output_dir: str | None = None, resume: bool = False) -> None:
    """``save_steps``: checkpoints into ``output_dir``; ``resume``: from its checkpoint-2."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = output_dir or tmp
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=per_device, gradient_accumulation_steps=2, max_steps=4,
            learning_rate=0.05, weight_decay=0.01, max_grad_norm=1.0, optim="sgd", lr_scheduler_type="linear",
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
            report_to=[], use_cpu=True, seed=0, dataloader_drop_last=True,
            deepspeed=None if deepspeed_stage is None else deepspeed_config(deepspeed_stage),
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            disable_tqdm=True, logging_strategy="no")
        trainer = InOrder(model=model, args=args, train_dataset=Tokens(), sam_rho=0.5, sam_variant=variant)
        trainer.train(resume_from_checkpoint=os.path.join(tmp, "checkpoint-2") if resume else None)
        if trainer.args.process_index == 0:
            torch.save([p.detach().clone() for p in model.parameters()], out)
            print(f"world {trainer.args.world_size}: saved")
        if torch.distributed.is_initialized():  # join gloo's threads now, not at interpreter exit
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # OUT PER_DEVICE VARIANT [DEEPSPEED_STAGE [SAVE_STEPS OUTPUT_DIR RESUME]]
    argv = sys.argv[1:]
    main(argv[0], int(argv[1]), argv[2], *(int(a) for a in argv[3:5]), *argv[5:6], *(a == "1" for a in argv[6:7]))
