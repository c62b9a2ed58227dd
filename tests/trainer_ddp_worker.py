"""SAMTrainer under torchrun (DDP through accelerate, gloo on the CPU) or in one process: a tiny GPT-2
on fixed token sequences taken in order (a sequential sampler), so that the two ranks' micro-batches
of 4 together are the single process's micro-batches of 8. Rank 0 (or the single process) saves the
trained weights to the path given. Variants: SAMTrainer's ("sam", ...), "plain" (the plain
``transformers.Trainer``, no SAM) and, on DeepSpeed, "hand" (no Trainer: DeepSpeedSAM driven by
hand over an engine built as the Trainer builds it). Used by tests/test_transformers.py and
tests/test_deepspeed.py."""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import transformers

from sam_fused.integrations.transformers import SAMTrainer

SEQ, VOCAB = 12, 50
STEPS, RHO, MAX_GRAD_NORM = 4, 0.5, 1.0


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


class PlainInOrder(transformers.Trainer):
    _get_train_sampler = InOrder._get_train_sampler


class EngineNorms(transformers.TrainerCallback):
    """The DeepSpeed engine's global gradient norm before clipping, after each optimizer step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.norms = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.norms.append(float(self.trainer.accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()))


def deepspeed_config(stage: int) -> dict:
    """DeepSpeed through the Trainer: ZeRO ``stage``, the Trainer's values ("auto"), its clipping."""
    import deepspeed.ops

    # an inference-only shared-memory op DeepSpeed would JIT-build (~60 s) on its first init
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def make_model():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def hand_driven(out: str, per_device: int, stage: int, max_grad_norm: float) -> None:
    """What SAMTrainer does on DeepSpeed, written by hand without the Trainer: the same model, base
    optimizer (SGD, lr 0.05, weight decay 0.01 but on biases and LayerNorms, as the Trainer groups
    them), linear schedule, DeepSpeed config (micro-batches of ``per_device``, accumulation 2,
    clipping at ``max_grad_norm``), micro-batches (rank r's k-th is the sequential loader's batch
    2k + r, as accelerate shards it) and loss (the Trainer's: the token losses summed over the
    number of labels in the step's global batch, ``num_items_in_batch``, which counts all SEQ
    labels of a sequence although SEQ - 1 are predicted, times the world size, since the engine
    averages over the ranks; no accumulation scaling). Each step: engine.backward per micro-batch,
    sam.first_step(), the same micro-batches again, sam.second_step(). Saves the weights and the
    engine's pre-clip gradient norm of every step."""
    import deepspeed

    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    cfg = deepspeed_config(stage)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = make_model()
    no_decay = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if id(p) not in no_decay], "weight_decay": 0.01},
              {"params": [p for _, p in named if id(p) in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (STEPS - s) / STEPS))
    cfg.update(train_micro_batch_size_per_gpu=per_device, gradient_accumulation_steps=2,
               train_batch_size=per_device * 2 * world, gradient_clipping=max_grad_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    sam = DeepSpeedSAM(engine, rho=RHO)
    x, norms = Tokens().x, []
    labels = torch.tensor(per_device * SEQ * 2 * world)  # the step's num_items_in_batch

    def backward(ids):
        loss = engine(input_ids=ids, labels=ids, num_items_in_batch=labels).loss * world
        engine.backward(loss, scale_wrt_gas=False)

    for step in range(STEPS):
        micro = [x[k * per_device:(k + 1) * per_device] for k in (2 * (2 * step) + rank, 2 * (2 * step + 1) + rank)]
        for ids in micro:
            backward(ids)
        sam.first_step()
        for ids in micro:
            backward(ids)
        sam.second_step()
        norms.append(float(engine.get_global_grad_norm()))
    if rank == 0:
        torch.save([p.detach().clone() for p in model.parameters()], out)
        torch.save(norms, f"{out}.norms")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def refused_on_deepspeed(args) -> dict:
    """SAMTrainer's refusals on a DeepSpeed config: variant -> the NotImplementedError's message.
    Each refused Trainer has made its Accelerator, whose DeepSpeed state accelerate keeps for the
    process and refuses to make again: it is cleared after each (as transformers' own tests do)."""
    from accelerate.state import AcceleratorState, GradientState

    found = {}
    for variant in ("msam", "functional", "gsam"):
        try:
            InOrder(model=make_model(), args=args, train_dataset=Tokens(), sam_rho=RHO, sam_variant=variant)
        except NotImplementedError as exc:
            found[variant] = str(exc)
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return found


def main(out: str, per_device: int, variant: str, deepspeed_stage: int | None = None, save_steps: int = 0,
         output_dir: str | None = None, resume: bool = False, max_grad_norm: float = MAX_GRAD_NORM) -> None:
    """``save_steps``: checkpoints into ``output_dir``; ``resume``: from its checkpoint-2."""
    if variant == "hand":
        return hand_driven(out, per_device, deepspeed_stage, max_grad_norm)
    model = make_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = output_dir or tmp
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=per_device, gradient_accumulation_steps=2, max_steps=STEPS,
            learning_rate=0.05, weight_decay=0.01, max_grad_norm=max_grad_norm, optim="sgd",
            lr_scheduler_type="linear",
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
            report_to=[], use_cpu=True, seed=0, dataloader_drop_last=True,
            deepspeed=None if deepspeed_stage is None else deepspeed_config(deepspeed_stage),
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
            disable_tqdm=True, logging_strategy="no")
        if variant == "plain":
            if deepspeed_stage is not None:
                refused = refused_on_deepspeed(args)
                if int(os.environ.get("RANK", "0")) == 0:
                    torch.save(refused, f"{out}.refused")
            trainer = PlainInOrder(model=model, args=args, train_dataset=Tokens())
        else:
            trainer = InOrder(model=model, args=args, train_dataset=Tokens(), sam_rho=RHO, sam_variant=variant)
        norms = EngineNorms(trainer) if deepspeed_stage is not None else None
        if norms is not None:
            trainer.add_callback(norms)
        trainer.train(resume_from_checkpoint=os.path.join(tmp, "checkpoint-2") if resume else None)
        if trainer.args.process_index == 0:
            torch.save([p.detach().clone() for p in model.parameters()], out)
            if norms is not None:
                torch.save(norms.norms, f"{out}.norms")
            print(f"world {trainer.args.world_size}: saved")
        if torch.distributed.is_initialized():  # join gloo's threads now, not at interpreter exit
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # OUT PER_DEVICE VARIANT [deepspeed_stage=N] [save_steps=N] [output_dir=PATH] [resume=1] [max_grad_norm=X]
    out, per_device, variant, *options = sys.argv[1:]
    types = {"deepspeed_stage": int, "save_steps": int, "output_dir": str, "resume": lambda v: v == "1",
             "max_grad_norm": float}
    kwargs = {k: types[k](v) for k, v in (o.split("=", 1) for o in options)}
    main(out, int(per_device), variant, **kwargs)
