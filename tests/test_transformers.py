"""SAMTrainer: a tiny GPT-2 built from a config (no download) trained by the Hugging Face Trainer
with SAM equals a hand-written FusedSAM loop on the same batches: accumulation 1 and 2, gradient
clipping, the Trainer's AdamW and linear schedule; two forwards per micro-batch; a plain Trainer
given a FusedSAM gets an error that names SAMTrainer. Skipped without transformers."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sam_fused import GSAM, MSAM, FusedSAM, LookSAM  # noqa: E402
from sam_fused.integrations.transformers import SAMTrainer  # noqa: E402

SEQ, VOCAB = 12, 50


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Recording(SAMTrainer):
    """Records each micro-batch of the first pass (the Trainer's order) and counts forwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.forwards = [], 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.forwards += 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch,
                          self.accelerator.gradient_state.sync_gradients))
        return super().training_step(model, inputs, num_items_in_batch)


def args_for(tmp_path, accumulation):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=3, learning_rate=0.05, weight_decay=0.01, max_grad_norm=0.05, optim="adamw_torch",
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_drop_last=True)


def by_hand(model, trainer_args, seen, variant, rho):
    """The same optimizer steps written out: first pass over the step's micro-batches, first_step,
    second pass, clip, second_step, scheduler."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    cls, kw = {"sam": (FusedSAM, {}), "gsam": (GSAM, {}), "looksam": (LookSAM, dict(k=2)),
               "interval": (FusedSAM, dict(interval=2))}[variant]
    opt = cls(groups, torch.optim.AdamW, rho=rho, lr=0.05, betas=(0.9, 0.999), eps=1e-8, **kw)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, 3)
    model.train()
    window, step_index = [], 0
    for batch, n_items, last in seen:
        window.append((batch, n_items))
        if not last:
            continue
        sam = opt.is_sam_step(step_index)
        for _ in range(2 if sam else 1):
            for b, n in window:
                model(**b, num_items_in_batch=n).loss.backward()
            if sam and opt._perturbed is None:
                opt.first_step(zero_grad=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if sam:
            opt.second_step()
        else:
            opt.step()  # the schedule's plain step (every step counts, by hand too)
        step_index += 1
        sched.step()
        opt.zero_grad()
        window = []
    return model


@pytest.mark.parametrize("variant", ["sam", "gsam"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_trainer_equals_a_hand_written_loop(tmp_path, accumulation, variant):
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    trainer = Recording(model=model, args=args_for(tmp_path, accumulation), train_dataset=Tokens(),
                        sam_rho=0.5, sam_variant=variant)
    trainer.train()
    assert isinstance(trainer._sam(), FusedSAM)
    steps = sum(1 for *_, last in trainer.seen if last)
    assert steps == 3 and len(trainer.seen) == 3 * accumulation
    assert trainer.forwards == 2 * len(trainer.seen)  # two forwards per micro-batch, never three
    expected = by_hand(start, trainer.args, trainer.seen, variant, 0.5)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    moved = sum(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), tiny_gpt2().parameters()))
    assert moved > 1e-3  # it trained


@pytest.mark.parametrize("variant", ["looksam", "interval"])
def test_scheduled_variants_take_plain_steps_through_the_trainer(tmp_path, variant):
    """LookSAM (k = 2) and SAM every 2nd step: SAM steps 0 and 2 take two forwards per micro-batch,
    step 1 one; the weights equal the hand-written loop (LookSAM's step in between uses g_v)."""
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    kwargs = dict(sam_variant="looksam", sam_kwargs=dict(k=2)) if variant == "looksam" else dict(
        sam_variant="sam", sam_kwargs=dict(interval=2))
    trainer = Recording(model=model, args=args_for(tmp_path, 2), train_dataset=Tokens(), sam_rho=0.5, **kwargs)
    trainer.train()
    assert trainer.forwards == 2 * 2 + 2 + 2 * 2  # micro-batches: 2 per step; steps 0 and 2 are SAM steps
    assert trainer._sam().param_groups[0]["sam_step"] == 3
    expected = by_hand(start, trainer.args, trainer.seen, variant, 0.5)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_msam_through_the_trainer_trains_evaluates_and_saves_the_true_weights(tmp_path):
    """sam_variant="msam": the Trainer's own one-pass steps equal a plain Trainer driving the same
    MSAM; evaluate() and save_model() see w (inside unperturbed()), and leave the perturbed weights
    the training continues from bit-identical."""
    ends = []
    for plain in (False, True):
        model = tiny_gpt2()
        args = args_for(tmp_path / str(plain), 1)
        if plain:
            decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
            groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
                      {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
            opt = MSAM(groups, torch.optim.AdamW, rho=0.3, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
        else:
            trainer = SAMTrainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(8),
                                 sam_rho=0.3, sam_variant="msam")
        trainer.train()
        ends.append([p.detach().clone() for p in model.parameters()])
        if plain:
            continue
        opt = trainer._sam()
        assert isinstance(opt, MSAM)
        with opt.unperturbed():
            w = [p.detach().clone() for p in model.parameters()]
            want = transformers.Trainer.evaluate(trainer)["eval_loss"]  # the Trainer's own evaluation, at w
        at_perturbed = transformers.Trainer.evaluate(trainer)["eval_loss"]
        got = trainer.evaluate()["eval_loss"]
        assert got == want != at_perturbed
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ends[0]))
        trainer.save_model(str(tmp_path / "saved"))
        saved = type(model).from_pretrained(str(tmp_path / "saved"))
        for (name, p), q in zip(saved.named_parameters(), w):
            assert torch.equal(p, q), name
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ends[0]))
    for a, b in zip(*ends):
        assert torch.equal(a, b)


def test_rho_zero_on_the_torch_backend_is_the_plain_trainer(tmp_path):
    """The module docstring's claim: with rho 0 the torch backend gives the plain Trainer's weights
    bit for bit (the fused backends differ at rounding level: their update is their own)."""
    ends = []
    for cls, kw in ((SAMTrainer, dict(sam_rho=0.0, sam_kwargs=dict(backend="torch"))), (transformers.Trainer, {})):
        model = tiny_gpt2()
        cls(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(), **kw).train()
        ends.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*ends))


def test_sam_changes_the_trainers_result(tmp_path):
    """rho matters: SAMTrainer with rho 0.5 ends elsewhere than with rho 0 (which is the base optimizer)."""
    ends = []
    for rho in (0.0, 0.5):
        model = tiny_gpt2()
        SAMTrainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(), sam_rho=rho).train()
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert float((ends[0] - ends[1]).abs().max()) > 1e-4


def test_a_plain_trainer_given_fusedsam_names_samtrainer(tmp_path):
    model = tiny_gpt2()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    trainer = transformers.Trainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(),
                                   optimizers=(opt, None))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_sam_trainer_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="sam_variant"):
        SAMTrainer(model=tiny_gpt2(), args=args_for(tmp_path, 1), train_dataset=Tokens(), sam_variant="esam")
    with pytest.raises(TypeError, match="FusedSAM"):
        model = tiny_gpt2()
        SAMTrainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(),
                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_the_trainer_example_learns():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import hf_trainer_sam
    finally:
        sys.path.pop(0)
    assert hf_trainer_sam.main(["--steps", "30", "--variant", "gsam"]) < 0.5 * 4.159  # well below guessing


def test_ddp_through_accelerate_equals_one_process(tmp_path):
    """SAMTrainer under torchrun, two ranks with micro-batches of 4 (DDP through accelerate, gloo),
    equals one process with micro-batches of 8 on the same sequences in order (SGD, accumulation 2,
    clipping, 4 steps): the perturbation uses the gradient averaged over the ranks, as SAM on the
    global batch does (measured 4e-9 apart; GSAM in place of SAM moves the weights by 4e-3)."""
    from pathlib import Path

    import trainer_ddp_worker as worker
    from launch import torchrun
    from tolerances import FP32

    root = Path(__file__).resolve().parents[1]
    torchrun(Path(__file__).with_name("trainer_ddp_worker.py"), tmp_path / "ddp.pt", 4, "sam",
             pythonpath=[root, root / "tests"], timeout=180)
    worker.main(str(tmp_path / "one.pt"), 8, "sam")
    atol, rtol = FP32["distributed_vs_single"]
    for a, b in zip(torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
