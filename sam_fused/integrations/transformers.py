"""SAM in Hugging Face's ``Trainer``: ``SAMTrainer``, a ``transformers.Trainer`` whose optimizer step
is a SAM step.

    from sam_fused.integrations.transformers import SAMTrainer

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, sam_rho=0.05)
    trainer.train()

The optimizer is the Trainer's own choice (``args.optim``, its weight-decay groups, its learning
rate scheduler), wrapped in :class:`~sam_fused.FusedSAM` (``sam_variant="sam"``; interval or
randomized SAM with ``sam_kwargs={"interval": 5}`` or ``{"sam_probability": 0.5}``), ASAM
(``"asam"``), :class:`~sam_fused.GSAM` (``"gsam"``), :class:`~sam_fused.LookSAM`
(``"looksam"``), :class:`~sam_fused.MSAM` (``"msam"``: one forward/backward per step, the
Trainer's own; the model holds the perturbed weights between steps, so evaluation, prediction and
every save run inside ``MSAM.unperturbed()``, and a checkpoint holds ``w``) or
:class:`~sam_fused.FunctionalSAM` (``"functional"``, below). What a SAM step does, with
``k = gradient_accumulation_steps`` micro-batches:

1. the Trainer's forward and backward of each micro-batch at ``w`` (gradients accumulated as the
   Trainer accumulates them; the logged loss is this one);
2. after the last one, the perturbation along the accumulated gradient, then the forward and
   backward of the same ``k`` micro-batches at ``w + e``, accumulated the same way (so a step costs
   two forward/backward passes per micro-batch; the micro-batches of a step are kept until then);
3. the Trainer's own gradient clipping (``max_grad_norm``), which now clips the second gradient;
4. the Trainer's ``optimizer.step()``: the restore and the base update with the second gradient,
   then its scheduler step.

Functional-SAM (``"functional"``) runs the same two passes through the Trainer's own forward
and loss (``compute_loss``): in the first, each micro-batch's loss, as the Trainer scales it for the
accumulation (and the GradScaler for fp16), goes to ``FunctionalSAM.accumulate(loss, logits)``
in place of its backward, which saves ``dL/dlogits`` and accumulates the first gradient; in the
second, at ``w + e``, ``second_backward(logits)`` backpropagates each micro-batch's logits with
its saved ``dL/dlogits`` (the loss at ``w + e`` is computed and left unused). The model's outputs
must hold the logits the loss was computed from (``outputs.logits``). ``max_grad_norm`` then
clips the update gradient ``J(w + e)^T dL/dF(w)``, and ``optimizer.step()`` restores and updates.

SAM phases: ``sam_phase_start`` and ``sam_phase_stop`` (fractions of training, ``0 <= start <
stop <= 1``) make optimizer step ``s`` (counted from 0) a SAM step when ``start <= s / max_steps
< stop``, with ``max_steps`` as the Trainer computes it (``args.max_steps``, or the epochs times
the optimizer steps per epoch): FusedSAM's ``phase=(ceil(start * max_steps), ceil(stop *
max_steps))``, with no end when ``stop`` is 1 ("SAM for the last 25%" is ``sam_phase_start=0.75``).
The steps outside are the plain Trainer's (on the ``torch`` backend its weights bit for bit), and
the step count is in the checkpoint, so a resumed run keeps to the window. Every variant of
FusedSAM's family takes them (inside the window a schedule still applies: LookSAM's ``k``, an
interval). Refused with an error that says why: MSAM (it perturbs on every step at one pass's
cost), DeepSpeed, an optimizer passed in ``optimizers=`` (give it ``phase=`` yourself), a
``phase`` in ``sam_kwargs`` as well, and a window that holds no step.

A step the schedule makes plain (phases, interval and randomized SAM, LookSAM's steps in between)
is the Trainer's own: one pass, then ``optimizer.step()``, which is then the plain step (LookSAM's
uses its g_v). fp16 goes through the GradScaler flow (``first_step(grad_scaler=...)``; the scaler's step
skips a step with an inf in either pass; LookSAM takes no scaler); bf16 needs nothing more. Under
DDP (through accelerate) the replayed micro-batches but the last run under ``no_sync``, as the
Trainer runs the first ones.

With ``sam_rho=0`` the weights equal the plain Trainer's bit for bit on the ``torch`` backend (the
restore is an exact copy and the update is torch.optim's own step). On the fused backends
(``cpu``, ``triton``) the update runs in this package's kernels, whose arithmetic differs from
torch.optim's implementation by about an ulp per element per step (another operation order, FMA
contraction), so the two runs drift apart at rounding level (1e-5 after a few steps of the tests'
GPT-2) without either being wrong: the fused update is checked against the reference within the
tests' FP32 table.

Under DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO stages 0-2, fp32 or bf16; ``"sam"``
and ``"asam"`` on every step) the engine owns the update: accelerate runs ``engine.step()``
inside ``accelerator.backward()`` and its optimizer wrapper's ``step()`` takes no closure, so the
SAM step is driven from ``training_step`` through
:class:`~sam_fused.integrations.deepspeed.DeepSpeedSAM`. The base optimizer is the Trainer's (the
engine wraps it); each micro-batch's backward goes to the engine without its step; after the last
one, the perturbation (one scalar all-reduce, one all-gather per param group: two for the
Trainer's decay and no-decay groups), the micro-batches again at ``w + e``, then the restore and
``engine.step()``: DeepSpeed's clipping (``max_grad_norm`` through ``gradient_clipping: "auto"``)
of the second gradient, the update, the scheduler. Checkpoints go through DeepSpeed's own save and
load, as the Trainer does them. MSAM and Functional-SAM are refused there (Functional-SAM over
DeepSpeed is ``DeepSpeedFunctionalSAM`` in a loop of your own).
"""

from __future__ import annotations

import contextlib

from transformers import Trainer

from ..nn import check_phase_fractions, phase_window
from ..optim import GSAM, MSAM, FunctionalSAM, FusedSAM, LookSAM

VARIANTS = {"sam": (FusedSAM, {}), "asam": (FusedSAM, {"adaptive": True}), "gsam": (GSAM, {}),
            "looksam": (LookSAM, {}), "msam": (MSAM, {}), "functional": (FunctionalSAM, {})}
_SAM_TYPES = (FusedSAM, MSAM)


@contextlib.contextmanager
def _replaced(obj, name: str, value):
    """``obj.name`` is ``value`` inside the block (an instance attribute), as it was after."""
    missing = object()
    before = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with SAM (see the module docstring).

    Args:
        *args, **kwargs: as ``Trainer``; an ``optimizers=(opt, sched)`` given here must hold a
            FusedSAM-family optimizer (or None to let the Trainer choose the base optimizer).
        sam_rho: SAM's radius.
        sam_variant: ``"sam"``, ``"asam"``, ``"gsam"``, ``"looksam"``, ``"msam"`` or ``"functional"``.
        sam_kwargs: more arguments of the SAM class (``eta`` for ASAM, ``alpha`` for GSAM,
            ``k`` and ``alpha`` for LookSAM, ``interval`` or ``sam_probability`` for SAM, ``backend``).
        sam_phase_start, sam_phase_stop: SAM only on the optimizer steps ``s`` with
            ``start <= s / max_steps < stop`` (fractions, ``0 <= start < stop <= 1``; the default
            ``0, 1`` is every step), plain Trainer steps outside (module docstring).
    """

    def __init__(self, *args, sam_rho: float = 0.05, sam_variant: str = "sam", sam_kwargs: dict | None = None,
                 sam_phase_start: float = 0.0, sam_phase_stop: float = 1.0, **kwargs) -> None:
        if sam_variant not in VARIANTS:
            raise ValueError(f"sam_variant must be one of {sorted(VARIANTS)}, got {sam_variant!r}")
        start, stop = check_phase_fractions(sam_phase_start, sam_phase_stop)
        self.sam_phase = None if (start, stop) == (0.0, 1.0) else (start, stop)
        if self.sam_phase is not None and sam_variant == "msam":
            raise ValueError("sam_phase_start/stop: MSAM has no phases (it perturbs on every step, at the cost of one "
                             "pass); use sam_variant 'sam' (or another of FusedSAM's family) for SAM in part of training")
        if self.sam_phase is not None and "phase" in (sam_kwargs or {}):
            raise ValueError("give the SAM phase once: sam_phase_start/stop (fractions of training) or "
                             "sam_kwargs['phase'] (steps), not both")
        self.sam_rho, self.sam_variant, self.sam_kwargs = sam_rho, sam_variant, dict(sam_kwargs or {})
        self._sam_window: list[tuple] = []
        super().__init__(*args, **kwargs)
        self._ds_sam = None
        given = self.optimizer
        if self.is_deepspeed_enabled:
            if (self.sam_variant not in ("sam", "asam") or set(self.sam_kwargs) - {"eta", "backend"}
                    or self.sam_phase is not None):
                why = {"msam": "; MSAM does not run over a DeepSpeed engine (its perturbation would have to be written "
                               "inside engine.step(), between the update and the all-gather: "
                               "sam_fused.integrations.deepspeed's docstring)",
                       "functional": "; Functional-SAM over DeepSpeed is DeepSpeedFunctionalSAM "
                                     "(sam_fused.integrations.deepspeed), in a loop of your own"}.get(self.sam_variant, "")
                raise NotImplementedError(
                    f"SAMTrainer under DeepSpeed runs sam_variant 'sam' or 'asam' on every step (sam_kwargs eta, "
                    f"backend; no phase); got {self.sam_variant!r} with {sorted(self.sam_kwargs)}"
                    + ("" if self.sam_phase is None else f" and the phase {self.sam_phase}") + why)
            if given is not None:
                raise TypeError("SAMTrainer under DeepSpeed builds its SAM step over the engine: pass no optimizer "
                                "(the Trainer chooses the base optimizer, args.optim)")
        elif given is not None and not isinstance(given, _SAM_TYPES):
            raise TypeError(f"SAMTrainer's optimizer must be a FusedSAM-family optimizer or MSAM, got "
                            f"{type(given).__name__}; or pass none and let the Trainer choose the base optimizer "
                            "(args.optim)")
        elif given is not None and self.sam_phase is not None:
            raise ValueError("sam_phase_start/stop set the phase of the optimizer SAMTrainer builds; the one passed in "
                             "optimizers= is built already: give it phase=(start_step, stop_step) yourself")

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model=None):
        """The Trainer's base optimizer (``args.optim``, its decay / no-decay groups), wrapped in SAM
        (with the SAM phase of ``sam_phase_start/stop`` over ``state.max_steps``, which ``train()``
        has computed by then)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = [
            {"params": [p for n, p in opt_model.named_parameters() if n in decay and p.requires_grad],
             "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in opt_model.named_parameters() if n not in decay and p.requires_grad],
             "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        if not isinstance(cls, type) or any(k in kwargs for k in ("params", "model", "optimizer_dict")):
            raise NotImplementedError(f"SAMTrainer wraps torch.optim optimizers; args.optim={self.args.optim!r} "
                                      "builds its optimizer another way")
        if self.is_deepspeed_enabled:  # the engine wraps the base optimizer; SAM drives the engine
            self.optimizer = cls(groups, **kwargs)
            return self.optimizer
        sam_cls, variant_kwargs = VARIANTS[self.sam_variant]
        if self.sam_phase is not None:
            if not self.state.max_steps:
                raise RuntimeError("sam_phase_start/stop are fractions of the training steps, which train() computes: "
                                   "the optimizer is built inside train()")
            variant_kwargs = dict(variant_kwargs, phase=phase_window(*self.sam_phase, self.state.max_steps))
        self.optimizer = sam_cls(groups, cls, rho=self.sam_rho, **variant_kwargs, **self.sam_kwargs, **kwargs)
        return self.optimizer

    def _sam(self) -> FusedSAM | MSAM:
        opt = self.optimizer
        while not isinstance(opt, _SAM_TYPES) and hasattr(opt, "optimizer"):  # accelerate's wrapper
            opt = opt.optimizer
        if not isinstance(opt, _SAM_TYPES):
            raise TypeError(f"SAMTrainer needs a FusedSAM-family optimizer or MSAM, got {type(opt).__name__}")
        return opt

    def _true_weights(self):
        """MSAM: the block with the parameters at ``w`` (once: nested calls pass through); else nothing."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, _SAM_TYPES) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if isinstance(opt, MSAM) and opt._outside is None:
            return opt.unperturbed()
        return contextlib.nullcontext()

    def evaluate(self, *args, **kwargs):
        with self._true_weights():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._true_weights():
            return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self._true_weights():
            return super().save_model(*args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        with self._true_weights():
            return super()._save_checkpoint(*args, **kwargs)

    # ------------------------------------------------------------------ a step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step at ``w``; after the last micro-batch of an optimizer step, the
        perturbation and the same micro-batches again at ``w + e`` (module docstring)."""
        if self.is_deepspeed_enabled:
            return self._deepspeed_training_step(model, inputs, num_items_in_batch)
        opt = self._sam()
        functional = isinstance(opt, FunctionalSAM) and opt.sam_due()
        self._sam_window.append((inputs, num_items_in_batch, self.current_gradient_accumulation_steps))
        with self._functional_pass(model, opt, second=False) if functional else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.gradient_state.sync_gradients:
            return loss
        window, self._sam_window = self._sam_window, []
        if isinstance(opt, MSAM):
            return loss  # one pass per step: the Trainer's optimizer.step() is MSAM's step
        if not opt.is_sam_step(opt.param_groups[0].get("sam_step", 0)):
            return loss  # a plain step: the Trainer's optimizer.step() makes it with these gradients
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            opt.first_step(zero_grad=True, grad_scaler=scaler)
        else:
            opt.first_step(zero_grad=True)
        try:
            for i, (batch, n_items, steps) in enumerate(window):
                self.current_gradient_accumulation_steps = steps
                last = i == len(window) - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync, self._functional_pass(model, opt, second=True) if functional else contextlib.nullcontext():
                    super().training_step(model, batch, n_items)
        except BaseException:
            opt.restore()  # the weights go back to w exactly; the error propagates
            raise
        return loss

    # ------------------------------------------------------------------ Functional-SAM
    @contextlib.contextmanager
    def _functional_pass(self, model, opt: FunctionalSAM, second: bool):
        """One micro-batch of a Functional-SAM step through the Trainer's ``training_step``: a
        forward hook on the model (inside DDP's wrapper, whose outputs the loss does not depend on)
        keeps its logits, and ``accelerator.backward(loss)`` becomes ``opt.accumulate(loss,
        logits)`` (the first pass; the loss divided and scaled as accelerate's backward would, so
        the saved ``dL/dlogits`` are those a plain backward would use) or
        ``opt.second_backward(logits)`` (at ``w + e``)."""
        accelerator, seen = self.accelerator, {}

        def keep(module, args, outputs):
            seen["logits"] = outputs.get("logits") if isinstance(outputs, dict) else None
            if seen["logits"] is None:
                raise TypeError(f"sam_variant='functional' backpropagates the model's logits: its outputs must hold "
                                f"them as outputs.logits (a transformers ModelOutput), got {type(outputs).__name__}")

        def backward(loss, **kwargs):
            if second:
                opt.second_backward(seen.pop("logits"))
                return
            loss = loss / accelerator.gradient_accumulation_steps  # accelerate's own division (1 under the Trainer)
            scaler = getattr(accelerator, "scaler", None)
            opt.accumulate(loss if scaler is None else scaler.scale(loss), seen.pop("logits"))

        hook = accelerator.unwrap_model(model).register_forward_hook(keep)
        try:
            with _replaced(accelerator, "backward", backward):
                yield
        finally:
            hook.remove()

    # ------------------------------------------------------------------ DeepSpeed
    def _deepspeed_sam(self):
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        if self._ds_sam is None or self._ds_sam.engine is not engine:
            from .deepspeed import DeepSpeedSAM

            self._ds_sam = DeepSpeedSAM(engine, rho=self.sam_rho, adaptive=self.sam_variant == "asam",
                                        **self.sam_kwargs)
        return self._ds_sam

    def _deepspeed_training_step(self, model, inputs, num_items_in_batch):
        """The Trainer's step of one micro-batch, its backward handed to the engine without the
        engine's step; after the last one of an optimizer step, the SAM step (module docstring)."""
        sam = self._deepspeed_sam()
        self._sam_window.append((inputs, num_items_in_batch, self.current_gradient_accumulation_steps))
        wrapped = self.accelerator.deepspeed_engine_wrapped
        self.accelerator.deepspeed_engine_wrapped = _BackwardOnly(sam.engine)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not self.accelerator.gradient_state.sync_gradients:
                return loss
            window, self._sam_window = self._sam_window, []
            sam.first_step()
            for batch, n_items, steps in window:
                self.current_gradient_accumulation_steps = steps
                super().training_step(model, batch, n_items)
            sam.second_step()  # the restore, then engine.step()
        except BaseException:
            self._sam_window = []
            sam.abort()  # the weights go back to w exactly; the error propagates
            raise
        finally:
            self.accelerator.deepspeed_engine_wrapped = wrapped
        return loss


class _BackwardOnly:
    """accelerate's DeepSpeed engine wrapper without the ``engine.step()`` it runs after a backward:
    DeepSpeedSAM sets the accumulation boundary and makes the step."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def backward(self, loss, sync_gradients=True, **kwargs):
        self.engine.backward(loss, **kwargs)

    def get_global_grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return norm.item() if hasattr(norm, "item") else norm
