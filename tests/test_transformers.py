"""SAMTrainer: a tiny GPT-2 built from a config (no download) trained by the Hugging Face Trainer
with SAM equals a hand-written FusedSAM loop on the same batches: accumulation 1 and 2, gradient
clipping, the Trainer's AdamW and linear schedule; two forwards per micro-batch; a plain Trainer
given a FusedSAM gets an error that names SAMTrainer. Functional-SAM through the Trainer equals a
hand-written FunctionalSAM loop; SAM phases (fractions of training) give the plain Trainer's steps
outside the window, and a checkpoint resumes inside it. Skipped without transformers."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sam_fused import GSAM, MSAM, FunctionalSAM, FusedSAM, LookSAM  # noqa: E402
from sam_fused.integrations.transformers import SAMTrainer  # noqa: E402
from sam_fused.nn import phase_window  # noqa: E402
from tolerances import FP32  # noqa: E402

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


def args_for(tmp_path, accumulation, max_steps=3, **kwargs):
    kwargs = {"save_strategy": "no", **kwargs}
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, learning_rate=0.05, weight_decay=0.01, max_grad_norm=0.05, optim="adamw_torch",
        lr_scheduler_type="linear", logging_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_drop_last=True, **kwargs)


def by_hand(model, trainer_args, seen, variant, rho):
    """The same optimizer steps written out: first pass over the step's micro-batches, first_step,
    second pass, clip, second_step, scheduler."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    cls, kw = {"sam": (FusedSAM, {}), "gsam": (GSAM, {}), "looksam": (LookSAM, dict(k=2)),
               "interval": (FusedSAM, dict(interval=2)), "functional": (FunctionalSAM, {}),
               "phase": (FusedSAM, dict(phase=(0, 2)))}[variant]
    opt = cls(groups, torch.optim.AdamW, rho=rho, lr=0.05, betas=(0.9, 0.999), eps=1e-8, **kw)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, 3)
    model.train()
    window, step_index = [], 0
    for batch, n_items, last in seen:
        window.append((batch, n_items))
        if not last:
            continue
        sam = opt.is_sam_step(step_index)
        if variant == "functional":  # the first pass saves dL/dlogits; the second backpropagates the logits
            for b, n in window:
                out = model(**b, num_items_in_batch=n)
                opt.accumulate(out.loss, out.logits)
            opt.first_step()
            for b, n in window:
                opt.second_backward(model(**b, num_items_in_batch=n).logits)
        for _ in range(0 if variant == "functional" else 2 if sam else 1):
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


@pytest.mark.parametrize("variant", ["looksam", "interval", "phase"])
def test_scheduled_variants_take_plain_steps_through_the_trainer(tmp_path, variant):
    """LookSAM (k = 2) and SAM every 2nd step: SAM steps 0 and 2 take two forwards per micro-batch,
    step 1 one; SAM in the first half of training (sam_phase_stop=0.5 of 3 steps: steps 0 and 1):
    step 2 one. The weights equal the hand-written loop (LookSAM's step in between uses g_v)."""
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    kwargs = {"looksam": dict(sam_variant="looksam", sam_kwargs=dict(k=2)),
              "interval": dict(sam_variant="sam", sam_kwargs=dict(interval=2)),
              "phase": dict(sam_variant="sam", sam_phase_stop=0.5)}[variant]
    trainer = Recording(model=model, args=args_for(tmp_path, 2), train_dataset=Tokens(), sam_rho=0.5, **kwargs)
    trainer.train()
    sam_steps = 2  # micro-batches: 2 per step; two SAM steps (0 and 2, or 0 and 1) and one plain step
    assert trainer.forwards == sam_steps * 2 * 2 + 2
    assert trainer._sam().param_groups[0]["sam_step"] == 3
    if variant == "phase":
        assert trainer._sam().phase == (0, 2)
    expected = by_hand(start, trainer.args, trainer.seen, variant, 0.5)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_functional_sam_through_the_trainer_equals_a_hand_written_loop(tmp_path, accumulation):
    """sam_variant="functional": the Trainer's forward gives the loss and the logits; the first
    pass saves dL/dlogits (accumulate), the second backpropagates the logits at w + e with them,
    the Trainer clips that update gradient and steps: the weights equal FunctionalSAM by hand on the
    same micro-batches (accumulation 1 and 2, AdamW, linear schedule, clipping), two forwards per
    micro-batch, and differ from SAM's."""
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    trainer = Recording(model=model, args=args_for(tmp_path, accumulation), train_dataset=Tokens(), sam_rho=0.5,
                        sam_variant="functional")
    trainer.train()
    assert isinstance(trainer._sam(), FunctionalSAM)
    assert trainer.forwards == 2 * len(trainer.seen) == 2 * 3 * accumulation
    expected = by_hand(start, trainer.args, trainer.seen, "functional", 0.5)
    atol, rtol = FP32["fast_vs_reference"]
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=name)
    sam = by_hand(copy.deepcopy(start), trainer.args, trainer.seen, "sam", 0.5)
    apart = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), sam.parameters()))
    assert apart > 100 * atol  # the update gradient is not SAM's


class Steps(transformers.TrainerCallback):
    """The weights after each optimizer step."""

    def __init__(self, model):
        self.model, self.weights = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append([p.detach().clone() for p in self.model.parameters()])


@pytest.mark.parametrize("variant", ["sam", "functional"])
def test_phase_fractions_give_the_plain_trainers_steps_outside_the_window(tmp_path, variant):
    """sam_phase_start=0.5 of 4 steps: steps 0 and 1 are the plain Trainer's, bit for bit on the
    torch backend (one forward per micro-batch), steps 2 and 3 are SAM steps (two) and leave it."""
    runs = []
    for sam in (True, False):
        model = tiny_gpt2()
        steps = Steps(model)
        kw = dict(sam_rho=0.5, sam_variant=variant, sam_kwargs=dict(backend="torch"), sam_phase_start=0.5) if sam else {}
        cls = Recording if sam else transformers.Trainer
        trainer = cls(model=model, args=args_for(tmp_path / str(sam), 2, max_steps=4), train_dataset=Tokens(),
                      callbacks=[steps], **kw)
        trainer.train()
        runs.append(steps.weights)
        if sam:
            assert trainer._sam().phase == (2, None) and trainer.forwards == 2 * 2 + 2 * 2 * 2
    assert len(runs[0]) == len(runs[1]) == 4
    for step in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(runs[0][step], runs[1][step])), step
    for step in (2, 3):
        assert max(float((a - b).abs().max()) for a, b in zip(runs[0][step], runs[1][step])) > 1e-4


def test_a_checkpoint_resumes_functional_sam_inside_its_phase(tmp_path):
    """Functional-SAM in the second half of 4 steps, a checkpoint after step 2 (the last plain
    one): the resumed run makes steps 2 and 3 as SAM steps (two forwards per micro-batch) and ends
    at the uninterrupted run's weights, bit for bit."""
    ends = []
    for resume in (False, True):
        model = tiny_gpt2()
        out = tmp_path / "run"
        trainer = Recording(model=model, args=args_for(out, 1, max_steps=4, save_strategy="steps", save_steps=2),
                            train_dataset=Tokens(), sam_rho=0.5, sam_variant="functional", sam_phase_start=0.5)
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        assert trainer._sam().param_groups[0]["sam_step"] == 4
        assert trainer.forwards == (2 * 2 if resume else 2 + 2 * 2)
        ends.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*ends))


def test_phase_window_maps_fractions_to_steps():
    assert phase_window(0.75, 1.0, 100) == (75, None)
    assert phase_window(0.1, 0.2, 30) == (3, 6)  # 0.1 * 30 rounds to 3.0000000000000004: step 3 is in
    assert phase_window(0.0, 0.5, 3) == (0, 2) and phase_window(0.5, 1.0, 3) == (2, None)
    with pytest.raises(ValueError, match="holds no step"):
        phase_window(0.9, 0.95, 3)  # steps 3 to 3
    with pytest.raises(ValueError, match="holds no step"):
        phase_window(0.9, 1.0, 5)  # ceil(4.5) = 5: no step left


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sam_phase_start=0.5, sam_phase_stop=0.5), ValueError, "0 <= start < stop <= 1"),
    (dict(sam_phase_start=-0.1), ValueError, "0 <= start < stop <= 1"),
    (dict(sam_phase_stop=1.5), ValueError, "0 <= start < stop <= 1"),
    (dict(sam_phase_start=True), ValueError, "start must be a fraction"),
    (dict(sam_phase_start="0.5"), ValueError, "start must be a fraction"),
    (dict(sam_phase_stop=float("nan")), ValueError, "stop must be a fraction"),
    (dict(sam_phase_start=0.5, sam_variant="msam"), ValueError, "MSAM has no phases"),
    (dict(sam_phase_start=0.5, sam_kwargs=dict(phase=(0, 2))), ValueError, "once"),
])
def test_sam_trainer_refuses_phases_that_cannot_work(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMTrainer(model=tiny_gpt2(), args=args_for(tmp_path, 1), train_dataset=Tokens(), **kwargs)


def test_sam_trainer_refuses_a_phase_for_a_given_optimizer_and_an_empty_window(tmp_path):
    model = tiny_gpt2()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    with pytest.raises(ValueError, match="optimizers="):
        SAMTrainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(), optimizers=(opt, None),
                   sam_phase_start=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMTrainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(), sam_phase_start=0.9,
                         sam_phase_stop=0.95)
    with pytest.raises(ValueError, match="holds no step"):  # steps 3 to 3 of 3
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class NoLogits(torch.nn.Module):
    """A model whose outputs hold the loss only."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt2()

    def forward(self, input_ids, labels=None, **kwargs):
        return {"loss": self.inner(input_ids=input_ids, labels=labels).loss}


def test_functional_sam_refuses_outputs_without_logits(tmp_path):
    model = NoLogits()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMTrainer(model=model, args=args_for(tmp_path, 1), train_dataset=Tokens(), sam_variant="functional")
    with pytest.raises(TypeError, match="outputs.logits"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


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


# Functional-SAM under DDP takes another 7 s (two processes, 2 cores): `make test-full`.
@pytest.mark.quick_subset(None, [dict(variant="sam")])
@pytest.mark.parametrize("variant", ["sam", "functional"])
def test_ddp_through_accelerate_equals_one_process(tmp_path, variant):
    """SAMTrainer under torchrun, two ranks with micro-batches of 4 (DDP through accelerate, gloo),
    equals one process with micro-batches of 8 on the same sequences in order (SGD, accumulation 2,
    clipping, 4 steps): the perturbation uses the gradient averaged over the ranks, as SAM on the
    global batch does (measured 4e-9 apart; GSAM in place of SAM moves the weights by 4e-3). So does
    Functional-SAM, whose logits are taken inside DDP's wrapper, upstream of the loss (4e-9 apart;
    SAM in its place moves the weights by 7e-4)."""
    from pathlib import Path

    import trainer_ddp_worker as worker
    from launch import torchrun

    root = Path(__file__).resolve().parents[1]
    torchrun(Path(__file__).with_name("trainer_ddp_worker.py"), tmp_path / "ddp.pt", 4, variant,
             pythonpath=[root, root / "tests"], timeout=180)
    worker.main(str(tmp_path / "one.pt"), 8, variant)
    atol, rtol = FP32["distributed_vs_single"]
    for a, b in zip(torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
