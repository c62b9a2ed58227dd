"""SAM over a DeepSpeed engine: ``DeepSpeedSAM`` (SAM, ASAM) and ``DeepSpeedFunctionalSAM``
(Functional-SAM), for ZeRO stages 0, 1 and 2, fp32 and bf16.

DeepSpeed has no place for SAM inside its optimizer: the client optimizer's ``step()`` gets no
closure and sees only a flat fp32 slice of this rank's master weights, whose gradient exists only
inside ``engine.step()``. So SAM drives the engine instead::

    sam = DeepSpeedSAM(engine, rho=0.05)

    def closure():
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        return loss

    loss = sam.step(closure)          # both passes and the engine's update

or by hand, around the two backward passes::

    engine.backward(loss_fn(engine(x), y))
    sam.first_step()                  # w -> w + e
    engine.backward(loss_fn(engine(x), y))
    sam.second_step()                 # w + e -> w, then engine.step() with the second gradient

With ``gradient_accumulation_steps = k`` each pass is ``k`` micro-batch backwards (the closure
runs all ``k``); DeepSpeedSAM sets the engine's accumulation boundary for each of them (it wraps
``engine.backward`` to count them), so the engine reduces the gradient once per pass.

A SAM step, per rank, with ``P`` this rank's partition of the flat working weights (the bf16 or
fp32 weights the forward reads; ZeRO-1/2: ``parallel_partitioned_bit16_groups``; stage 1 with bf16
and fp32 gradient accumulation: BF16_Optimizer's ``bf16_partitioned_groups``):

1. ``engine.backward`` at ``w``: the engine reduces the gradient; ``g_P`` is this rank's partition
   of it (fp32, or bf16 for bf16 without fp32 accumulation);
2. the local sum of squares of ``(T *) g_P`` (fp64), **one scalar all-reduce** over the
   data-parallel group, ``norm = sqrt``; ``e_P = rho T^2 g_P / (norm + 1e-12)`` (``T = |w| + eta``
   for ASAM, 1 for SAM); a backup of the flat working weights, ``P += e_P``, then the all-gather
   of the working weights (DeepSpeed's own ``all_gather_dp_groups``: **one all-gather per param
   group**). A non-finite norm leaves the weights untouched, as FusedSAM does;
3. the first gradient cleared (the path DeepSpeed itself takes when it skips a step), the second
   ``engine.backward`` at ``w + e``;
4. the working weights restored from the backup (local, bit for bit) and ``engine.step()``: the
   engine's own clipping (``gradient_clipping``), update, all-gather and LR scheduler, on the
   second gradient only.

Nothing else is communicated. Stage 0 (no ZeRO, fp32): each rank holds the whole all-reduced
gradient, so the norm and the perturbation are local and SAM communicates nothing of its own.

Kernels: the partition is one flat buffer per param group, which the native kernels
(``sam_fused._C``'s ``sq_sum_`` and ``perturb_``, backends "cpu" and "cuda") take as a list of
those buffers (one call of each per step over every group), when the gradient has the weights'
dtype: fp32, and bf16 without fp32 accumulation. Where it has not (bf16 weights with an fp32
gradient: ``grad_accum_dtype: fp32``), with ``backend="torch"`` and where the native kernels do
not load, the torch reference ops (``sam_fused.backends.reference``'s formulas) run, on each
group's flat partition at once. The Triton kernels index a per-step pointer table of parameters
and are not used here.

Communication per step, beyond the engine's own for two backward passes and one ``engine.step()``
(counted in tests/test_deepspeed.py, which wraps every collective): one all-reduce of an fp64
scalar and, per param group, one ``all_gather_into_tensor`` of this rank's perturbed partition
into the group's flat working weights (``G`` groups: ``G`` all-gathers; torch without
``all_gather_into_tensor`` would make DeepSpeed split each into bucket-sized ``all_gather`` calls).

Functional-SAM (:class:`DeepSpeedFunctionalSAM`): the same step, with the second pass
backpropagating the outputs at ``w + e`` with the output gradient ``dL/dF(w)`` of the first:
``engine.backward`` takes any scalar, so the second pass is ``engine.backward((F(w + e) *
dL/dF(w)).sum())``, whose gradient is ``J(w + e)^T dL/dF(w)``. ``dL/dF(w)`` is read by a tensor
hook during the first pass's own ``engine.backward(loss)`` (no extra pass, and the engine's
gradient-accumulation scaling is in it); the second pass's backward is unscaled
(``scale_wrt_gas=False``), so its output gradient is the first pass's exactly.

Not over the engine:

* Momentum-SAM (``MSAM``) perturbs the working weights to ``w - r m`` with ``m`` the base
  optimizer's momentum buffer (``exp_avg`` for Adam), which here lives in the client optimizer's
  state over this rank's fp32 master partition (``optimizer.state[single_partition_of_fp32_groups[i]]``;
  BF16_Optimizer: ``fp32_groups_flat_partition[i]``), aligned with the working partition, so the
  perturbation itself would fit. What does not is where it has to be written: after the engine's
  update of the master weights and before the engine's own all-gather of the working weights,
  both inside ``DeepSpeedZeroOptimizer.step()`` (``BF16_Optimizer.step()``), which offers no hook
  between them. Done after ``engine.step()`` it costs a second all-gather of the whole working
  weights every step (MSAM's point is SAM at the cost of one pass); the internal it needs is that
  point inside ``step()`` (the all-gather of ``bit16_groups_flat`` after the fp32-to-bit16 copy).
  Two more semantic gaps: MSAM's SGD rule decays the perturbed weights (``g + wd (w - r m)``) where
  the engine decays its master ``w``, and between steps the module holds ``w - r m``, which
  ``engine.save_checkpoint`` writes beside the fp32 master ``w`` and ``load_checkpoint`` replaces
  by the master's copy (the perturbation would have to be remade after every load). A SAM
  optimizer of this package handed to ``deepspeed.initialize`` as the client optimizer is refused.
* GSAM's and LookSAM's gradient combinations rewrite the gradient that ``engine.step()`` consumes
  inside the engine (and LookSAM keeps a parameter-sized buffer across steps), for which DeepSpeed
  has no hook.
* ZeRO-3 (parameters partitioned between forwards), CPU/NVMe offload (gradients and master
  weights on the host, reached through other internals) and fp16 (the loss scaler's skipped
  steps) are refused, with the weights untouched.

DeepSpeed keeps what SAM needs in internal attributes; ``TESTED_VERSIONS`` are the releases these
paths were run against (tests/test_deepspeed.py), and any other version is refused at
construction.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..constants import NORM_EPS

# The DeepSpeed releases tests/test_deepspeed.py ran these paths against; any other version (a
# later patch release, a pre-release, a local build "0.19.8+abc") is refused: the attributes read
# here are internal and change between releases. Keep pyproject.toml's extra the same.
TESTED_VERSIONS = ("0.19.8",)


def _check_number(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or value > 1e30 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number (at most 1e30), got {value!r}")
    return float(value)


class _Native:
    """The native kernels over lists of flat tensors of one dtype."""

    def __init__(self, module) -> None:
        self.C = module

    def sq(self, out: Tensor, weights: list[Tensor], grads: list[Tensor], adaptive: bool, eta: float) -> None:
        self.C.sq_sum_(out, weights, grads, adaptive=adaptive, eta=eta, accumulate=True)

    def perturb(self, weights, grads, backups, norm: Tensor, rho: float, adaptive: bool, eta: float) -> None:
        self.C.perturb_(weights, grads, backups, [], norm=norm, rho=rho, adaptive=adaptive, eta=eta)


def _ref_sq(out: Tensor, w: Tensor, g: Tensor, adaptive: bool, eta: float) -> None:
    x = g.to(torch.float64)
    if adaptive:
        x = x * (w.to(torch.float64).abs() + eta)
    out += x.square().sum()


def _ref_perturb(w: Tensor, g: Tensor, backup: Tensor, norm: Tensor, rho: float, adaptive: bool, eta: float) -> None:
    """backup = w; w += e (``reference.perturb_``'s formula; fp32 math, fp64 for fp64 weights)."""
    backup.copy_(w)
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    norm = norm.to(dt)
    ok = torch.isfinite(norm)
    scale = torch.where(ok, rho / (norm + NORM_EPS), torch.zeros_like(norm))
    x = w.to(dt)
    e = g.to(dt) * scale
    if adaptive:
        t = x.abs() + eta
        e = t * t * e
    w.copy_(torch.where(ok, x + e, x))


# ---------------------------------------------------------------------- the engine's layouts
class _Layout:
    """Where one engine path keeps the working weights and this rank's reduced gradient."""

    kind = "?"
    communicates = True

    def __init__(self, engine, opt) -> None:
        self.engine, self.opt = engine, opt

    def flats(self) -> list[Tensor]:
        """The flat working-weight buffers (one per param group), backed up and restored whole."""
        raise NotImplementedError

    def partitions(self) -> list[tuple[Tensor, Tensor | None]]:
        """(this rank's working-weight partition, its reduced gradient or None) per param group."""
        raise NotImplementedError

    def all_gather(self) -> None:
        raise NotImplementedError

    def clear_grads(self) -> None:
        raise NotImplementedError

    def group(self):
        return None


def _need(obj, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise RuntimeError(f"DeepSpeedSAM: {what} has no {', '.join(missing)}; this DeepSpeed version keeps its "
                           f"gradients elsewhere (tested: {_tested_text()})")


class _Zero12(_Layout):
    """DeepSpeedZeroOptimizer (ZeRO stages 1 and 2)."""

    kind = "zero"

    def __init__(self, engine, opt) -> None:
        super().__init__(engine, opt)
        _need(opt, ("averaged_gradients", "bit16_groups_flat", "parallel_partitioned_bit16_groups", "partition_size",
                    "real_dp_process_group", "nccl_start_alignment_factor", "allgather_bucket_size", "zero_grad",
                    "flatten", "flatten_dense_tensors_aligned", "_release_preflattened_grad_buffers",
                    "_get_preflattened_grad_partition"), type(opt).__name__)

    def flats(self):
        return list(self.opt.bit16_groups_flat)

    def group(self):
        return self.opt.real_dp_process_group[0]

    def partitions(self):
        import deepspeed.comm as dist

        opt, out = self.opt, []
        for i in range(len(opt.bit16_groups_flat)):
            pg = opt.real_dp_process_group[i]
            rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
            w = opt.parallel_partitioned_bit16_groups[i][rank]
            grads = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else None
            if grads is None:
                out.append((w, None))
                continue
            g = opt._get_preflattened_grad_partition(i)  # the compact fp32 buffer: a view, no copy
            if g is None:  # as DeepSpeed's step() flattens it
                size = int(opt.partition_size[i])
                g = opt.flatten_dense_tensors_aligned(grads, size) if rank == world - 1 else opt.flatten(grads)
            if g.numel() != w.numel():
                raise RuntimeError(f"DeepSpeedSAM: group {i}: gradient partition of {g.numel()} elements beside a "
                                   f"weight partition of {w.numel()}")
            out.append((w, g.view(-1)))
        return out

    def all_gather(self):
        from deepspeed.runtime.utils import all_gather_dp_groups

        opt = self.opt
        all_gather_dp_groups(groups_flat=opt.bit16_groups_flat, partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                             dp_process_group=opt.real_dp_process_group,
                             start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)

    def clear_grads(self):
        # what DeepSpeedZeroOptimizer.step() does with the gradients of a step it skips
        opt = self.opt
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        for k in list(opt.averaged_gradients.keys()):
            opt.averaged_gradients[k] = None
        if isinstance(getattr(opt, "all_grad_tensors", None), dict):
            for k in list(opt.all_grad_tensors.keys()):
                opt.all_grad_tensors[k] = None
        if hasattr(opt, "micro_step_id"):
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            opt.micro_step_id = INITIAL_MICRO_STEP_ID


class _BF16(_Layout):
    """BF16_Optimizer (ZeRO stage 1 with bf16 weights and fp32 gradient accumulation)."""

    kind = "bf16"

    def __init__(self, engine, opt) -> None:
        super().__init__(engine, opt)
        _need(opt, ("bf16_groups_flat", "bf16_partitioned_groups", "fp32_groups_gradient_flat_partition",
                    "fp32_groups_gradients_flat", "fp32_groups_has_gradients", "real_dp_process_group",
                    "nccl_start_alignment_factor", "allgather_bucket_size", "clear_hp_grads", "clear_lp_grads"),
              "BF16_Optimizer")

    def flats(self):
        return list(self.opt.bf16_groups_flat)

    def group(self):
        return self.opt.real_dp_process_group[0]

    def partitions(self):
        import deepspeed.comm as dist

        opt, out = self.opt, []
        for i in range(len(opt.bf16_groups_flat)):
            rank = dist.get_rank(group=opt.real_dp_process_group[i])
            w = opt.bf16_partitioned_groups[i][rank]
            has = any(opt.fp32_groups_has_gradients[i])
            out.append((w, opt.fp32_groups_gradient_flat_partition[i] if has else None))
        return out

    def all_gather(self):
        from deepspeed.runtime.utils import all_gather_dp_groups

        opt = self.opt
        all_gather_dp_groups(groups_flat=opt.bf16_groups_flat, partitioned_param_groups=opt.bf16_partitioned_groups,
                             dp_process_group=opt.real_dp_process_group,
                             start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)

    def clear_grads(self):
        self.opt.clear_hp_grads()
        self.opt.clear_lp_grads(set_to_none=True)


class _Plain(_Layout):
    """Stage 0 with fp32 weights: the client optimizer over the module's parameters; every rank
    holds the whole all-reduced gradient in ``.grad``."""

    kind = "plain"
    communicates = False

    def __init__(self, engine, opt) -> None:
        super().__init__(engine, opt)
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def flats(self):
        return [p.detach() for p in self.params]

    def partitions(self):
        return [(p.detach(), None if p.grad is None else p.grad.detach()) for p in self.params]

    def all_gather(self):
        pass

    def clear_grads(self):
        for p in self.params:
            p.grad = None


def _tested_text() -> str:
    return "DeepSpeed " + " or ".join(TESTED_VERSIONS)


def check_version(version: str) -> None:
    """Refuse a DeepSpeed version that is not in ``TESTED_VERSIONS`` (exactly)."""
    if version not in TESTED_VERSIONS:
        raise RuntimeError(f"DeepSpeedSAM reads DeepSpeed internals and was tested with {_tested_text()} only; this is "
                           f"DeepSpeed {version}: install a tested one (pip install \"sam_fused[deepspeed]\" pins it)")


def _layout(engine) -> _Layout:
    """The layout of ``engine``'s path, or a refusal that names what works."""
    works = ("works: ZeRO stages 0 (fp32), 1 and 2 (fp32 or bf16, with or without fp32 gradient accumulation), "
             "without offload")
    stage = int(engine.zero_optimization_stage())
    if stage >= 3:
        raise NotImplementedError(f"DeepSpeedSAM: ZeRO stage {stage} partitions the parameters between forwards, "
                                  f"which SAM's perturbation cannot reach; {works}")
    offload = False
    for name in ("zero_cpu_offload", "zero_offload_optimizer", "zero_offload_param"):
        fn = getattr(engine, name, None)
        if callable(fn):
            value = fn()
            offload = offload or bool(value if not hasattr(value, "device") else str(value.device) != "none")
    if offload:
        raise NotImplementedError(f"DeepSpeedSAM: ZeRO offload keeps gradients and master weights on the host; {works}")
    if engine.fp16_enabled():
        raise NotImplementedError(f"DeepSpeedSAM: fp16 (loss scaling) is not supported; {works}")
    if callable(getattr(engine, "managed_gradient_accumulation", None)) and not engine.managed_gradient_accumulation():
        raise NotImplementedError("DeepSpeedSAM: managed_gradient_accumulation=false is not supported: SAM sets "
                                  "the accumulation boundary of each pass itself")
    if getattr(engine, "zenflow", False):
        raise NotImplementedError(f"DeepSpeedSAM: ZenFlow is not supported; {works}")
    from ..optim.base import SAMOptimizer

    client = getattr(engine, "client_optimizer", None)
    if isinstance(client, SAMOptimizer):
        why = (" (MSAM does not run over the engine: its perturbation would have to be written between the "
               "engine's update and its all-gather, inside engine.step(); see the module docstring)"
               if type(client).__name__ == "MSAM" else "")
        raise TypeError(f"DeepSpeedSAM: the engine's client optimizer is {type(client).__name__}, a SAM optimizer; hand "
                        f"deepspeed.initialize the base optimizer (torch.optim.SGD, AdamW, ...): DeepSpeedSAM or "
                        f"DeepSpeedFunctionalSAM makes the SAM step around it{why}")
    opt = engine.optimizer
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer):
        return _Zero12(engine, opt)
    if isinstance(opt, BF16_Optimizer):
        return _BF16(engine, opt)
    if stage == 0 and isinstance(opt, torch.optim.Optimizer) and not engine.bfloat16_enabled():
        params = [p for p in engine.module.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise NotImplementedError(f"DeepSpeedSAM: stage 0 with non-fp32 parameters; {works}")
        return _Plain(engine, opt)
    raise NotImplementedError(f"DeepSpeedSAM: the engine's optimizer {type(opt).__name__} (stage {stage}, "
                              f"bf16={engine.bfloat16_enabled()}) is not a path DeepSpeedSAM knows; {works}")


# ---------------------------------------------------------------------- SAM
class DeepSpeedSAM:
    """SAM (or ASAM) over a ``deepspeed.DeepSpeedEngine`` (module docstring).

    Args:
        engine: the engine from ``deepspeed.initialize`` (any client base optimizer).
        rho: the radius (>= 0).
        adaptive: ASAM (Kwon et al., 2021): ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta``.
        eta: ASAM's offset (>= 0).
        backend: ``None`` (the native kernels where they load and fit, else the torch ops),
            ``"torch"`` (the reference ops), ``"cpu"`` / ``"cuda"`` (the native kernels; an error
            where they do not load).

    ``grad_norm`` holds the global norm of the last first step (a 0-dim fp32 tensor). Every check
    runs before the first write: a refused call leaves the weights bit-identical, and a closure that
    raises after the perturbation leaves them restored to ``w`` (with the gradients cleared).
    """

    def __init__(self, engine, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0,
                 backend: str | None = None) -> None:
        self.rho = _check_number("rho", rho)
        self.eta = _check_number("eta", eta)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        if backend not in (None, "torch", "cpu", "cuda"):
            raise ValueError(f"backend must be None, 'torch', 'cpu' or 'cuda', got {backend!r}")
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine

        check_version(deepspeed.__version__)
        if not isinstance(engine, DeepSpeedEngine):
            raise TypeError(f"engine must be a DeepSpeedEngine (from deepspeed.initialize), got {type(engine).__name__}")
        if "backward" in vars(engine):
            raise RuntimeError("DeepSpeedSAM: this engine's backward is already wrapped (by another DeepSpeedSAM: call "
                               "its detach() first); two would count every micro-batch twice")
        self.engine = engine
        self.layout = _layout(engine)
        self.gas = int(engine.gradient_accumulation_steps())
        self._kernels = self._load_kernels(backend)
        self._backups: list[Tensor] | None = None
        self._perturbed = False
        self._count = 0  # micro-batch backwards in the current pass
        self.grad_norm: Tensor | None = None
        self._backward = engine.backward
        engine.backward = self._counted_backward  # sets the accumulation boundary of each micro-batch

    def _load_kernels(self, backend):
        if backend == "torch":
            return None
        from ..native import NativeUnavailable, load

        device = self.layout.flats()[0].device
        try:
            module = load()
            if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not module.has_cuda()):
                raise NativeUnavailable(f"no native kernels for {device}")
            if backend is not None and backend != device.type:
                raise NativeUnavailable(f"the weights are on {device}")
        except NativeUnavailable as exc:
            if backend is None:
                return None
            from ..backends import BackendUnavailable

            raise BackendUnavailable(f"backend {backend!r}: {exc}") from exc
        return _Native(module)

    # ------------------------------------------------------------------ the passes
    def _counted_backward(self, loss, *args, **kwargs):
        self._count += 1
        self.engine.set_gradient_accumulation_boundary(self._count % self.gas == 0)
        return self._backward(loss, *args, **kwargs)

    def _check_pass(self, what: str) -> None:
        if self._count != self.gas:
            raise RuntimeError(f"DeepSpeedSAM.{what}() after {self._count} engine.backward call(s) in this pass; "
                               f"gradient_accumulation_steps is {self.gas}")

    @torch.no_grad()
    def first_step(self) -> Tensor:
        """The perturbation after the first pass's ``gas`` backwards; returns the global norm."""
        if self._perturbed:
            raise RuntimeError("DeepSpeedSAM.first_step() twice without second_step()")
        self._check_pass("first_step")
        parts = self.layout.partitions()
        if all(g is None for _, g in parts) and not self.layout.communicates:
            raise RuntimeError("DeepSpeedSAM.first_step() without gradients: call engine.backward(loss) first")
        if any(g is None for _, g in parts) and self.layout.kind != "plain":
            raise RuntimeError("DeepSpeedSAM.first_step() without gradients: call engine.backward(loss) first")
        flats = self.layout.flats()
        if self._backups is None or any(b.shape != f.shape or b.dtype != f.dtype for b, f in zip(self._backups, flats)):
            self._backups = [torch.empty_like(f) for f in flats]
        parts = [(w, g) for w, g in parts if g is not None]
        device = flats[0].device
        # from here on, only writes
        sq = torch.zeros((), dtype=torch.float64, device=device)
        native = self._kernels is not None
        fit = [native and g.dtype == w.dtype and w.is_contiguous() and g.is_contiguous() for w, g in parts]
        if any(fit):
            self._kernels.sq(sq, [w for (w, _), f in zip(parts, fit) if f], [g for (_, g), f in zip(parts, fit) if f],
                             self.adaptive, self.eta)
        for (w, g), f in zip(parts, fit):
            if not f:
                _ref_sq(sq, w, g, self.adaptive, self.eta)
        if self.layout.communicates:
            import deepspeed.comm as dist

            dist.all_reduce(sq, group=self.layout.group())  # the one scalar all-reduce
        norm = sq.sqrt().float().reshape(1)
        self.grad_norm = norm.reshape(())
        # the backup: the flat buffers whole; this rank's partition is written by the perturbation pass
        views = []
        for flat, backup in zip(flats, self._backups):
            backup.copy_(flat)
        for (w, g), f in zip(parts, fit):
            views.append(self._backup_view(w, flats))
        if any(fit):
            sel = [i for i, f in enumerate(fit) if f]
            self._kernels.perturb([parts[i][0] for i in sel], [parts[i][1] for i in sel], [views[i] for i in sel],
                                  norm, self.rho, self.adaptive, self.eta)
        for (w, g), f, b in zip(parts, fit, views):
            if not f:
                _ref_perturb(w, g, b, norm, self.rho, self.adaptive, self.eta)
        self._perturbed = True
        self.layout.all_gather()  # one all-gather per param group: every rank's perturbed partition
        self.layout.clear_grads()
        self._count = 0
        return self.grad_norm

    def _backup_view(self, w: Tensor, flats: list[Tensor]) -> Tensor:
        """The part of a backup buffer that holds partition ``w`` (a view into a flat buffer)."""
        for flat, backup in zip(flats, self._backups):
            if w.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and w.dtype == flat.dtype:
                start = w.storage_offset() - flat.storage_offset()
                if 0 <= start and start + w.numel() <= flat.numel():
                    return backup.view(-1).narrow(0, start, w.numel()).view_as(w)
        return torch.empty_like(w)  # not inside a flat buffer: the whole-buffer copy already backs it up

    @torch.no_grad()
    def restore(self) -> None:
        """The working weights back to ``w``, bit for bit (local: every rank holds the whole backup)."""
        if not self._perturbed:
            return
        for flat, backup in zip(self.layout.flats(), self._backups):
            flat.copy_(backup)
        self._perturbed = False

    def second_step(self) -> None:
        """After the second pass's ``gas`` backwards: restore, then ``engine.step()`` (the engine's
        clipping, update and scheduler on the second gradient)."""
        if not self._perturbed:
            raise RuntimeError("DeepSpeedSAM.second_step() without first_step()")
        self._check_pass("second_step")
        self.restore()
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._count = 0

    def abort(self) -> None:
        """Undo a started step: the weights back to ``w``, the gradients cleared, the pass count reset."""
        self.restore()
        self.layout.clear_grads()
        self._count = 0

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One SAM step: ``closure()`` at ``w`` (the forward and ``engine.backward`` of every
        micro-batch of the step), the perturbation, ``closure()`` at ``w + e``, the restore and
        ``engine.step()``. Returns the first closure's loss."""
        if not callable(closure):
            raise TypeError("DeepSpeedSAM.step() needs a closure that runs the forward and engine.backward")
        if self._perturbed or self._count:
            raise RuntimeError("DeepSpeedSAM.step() inside a started step (first_step() or a backward already ran)")
        try:
            with torch.enable_grad():
                loss = closure()
            self.first_step()
            with torch.enable_grad():
                closure()
            self.second_step()
        except BaseException:
            self.abort()
            raise
        return loss

    def detach(self) -> None:
        """Give the engine its own ``backward`` back (DeepSpeedSAM no longer counts micro-batches)."""
        if self.engine.__dict__.get("backward") == self._counted_backward:
            del self.engine.backward


# ---------------------------------------------------------------------- Functional-SAM
def _split(out, where: str) -> tuple[Tensor, Tensor]:
    """(loss, outputs) of a closure call, or a clear error (FunctionalSAM's contract)."""
    from ..optim.functional import split_outputs

    return split_outputs(out, where, "DeepSpeedFunctionalSAM")


class DeepSpeedFunctionalSAM(DeepSpeedSAM):
    """Functional-SAM (:class:`~sam_fused.FunctionalSAM`'s rule) over a ``DeepSpeedEngine``: the
    perturbation as :class:`DeepSpeedSAM` makes it, then the update gradient ``J(w + e)^T
    dL/dF(w)`` (module docstring). Arguments, refusals, gradient accumulation, the engine's
    clipping (of the update gradient) and communication: as DeepSpeedSAM's.

    ``step(closure)``: ``closure(i)`` runs the forward of micro-batch ``i`` of the step (``0 <= i <
    gradient_accumulation_steps``) and returns ``(loss, outputs)``, calling no backward; it is
    called for every ``i`` at ``w``, then again at ``w + e``. Returns the mean of the first pass's
    losses (a float). By hand::

        for x, y in micro_batches:                 # at w
            logits = engine(x)
            sam.accumulate(loss_fn(logits, y), logits)   # engine.backward(loss); dL/dlogits kept
        sam.first_step()                           # w -> w + e
        for x, y in micro_batches:                 # the same micro-batches, in the same order
            sam.second_backward(engine(x))         # engine.backward((logits * dL/dlogits).sum())
        sam.second_step()                          # w + e -> w, engine.step()

    The saved output gradients take the memory of the outputs (one logits-sized tensor per
    micro-batch) until the second pass.
    """

    def __init__(self, engine, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0,
                 backend: str | None = None) -> None:
        super().__init__(engine, rho=rho, adaptive=adaptive, eta=eta, backend=backend)
        self._saved: list[Tensor] = []  # dL/doutputs of each micro-batch of the first pass, as the engine scaled it
        self._replayed = 0

    def accumulate(self, loss: Tensor, outputs: Tensor, **backward_kwargs) -> None:
        """One micro-batch of the first pass: ``engine.backward(loss, **backward_kwargs)``, keeping
        the gradient it sends into ``outputs``."""
        if self._perturbed:
            raise RuntimeError("DeepSpeedFunctionalSAM.accumulate() is the first pass: the weights are perturbed "
                               "(call second_step() or abort() first)")
        loss, outputs = _split((loss, outputs), "accumulate()")
        seen: list[Tensor] = []
        handle = outputs.register_hook(lambda grad: seen.append(grad.detach()))
        try:
            with torch.enable_grad():
                self.engine.backward(loss, **backward_kwargs)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError("DeepSpeedFunctionalSAM.accumulate(): the loss's backward did not reach the outputs: "
                               "hand over the outputs the loss was computed from")
        self._saved.append(seen[0])

    def first_step(self) -> Tensor:
        if len(self._saved) != self._count:
            raise RuntimeError(f"DeepSpeedFunctionalSAM.first_step(): {self._count} engine.backward call(s) in this "
                               f"pass but {len(self._saved)} through accumulate(): every micro-batch of the first pass "
                               "goes through accumulate(loss, outputs)")
        norm = super().first_step()
        self._replayed = 0
        return norm

    def second_backward(self, outputs: Tensor) -> None:
        """At ``w + e``: ``engine.backward((outputs * dL/dF(w)).sum())`` with the saved output
        gradient of the next micro-batch (in the order of the first pass), unscaled: the engine's
        gradient is then ``J(w + e)^T dL/dF(w)``, accumulated as the first pass's was."""
        if not self._perturbed:
            raise RuntimeError("DeepSpeedFunctionalSAM.second_backward() comes after first_step()")
        from ..optim.functional import next_saved

        saved = next_saved(self._saved, self._replayed, outputs, "DeepSpeedFunctionalSAM")
        with torch.enable_grad():
            self.engine.backward((outputs * saved.to(outputs.dtype)).sum(), scale_wrt_gas=False)
        self._replayed += 1

    def second_step(self) -> None:
        if self._perturbed and self._replayed != len(self._saved):
            raise RuntimeError(f"DeepSpeedFunctionalSAM.second_step(): the second pass backpropagated {self._replayed} "
                               f"of the first pass's {len(self._saved)} micro-batches (second_backward); the weights "
                               "stay perturbed until the rest are, or abort()")
        super().second_step()
        self._saved, self._replayed = [], 0

    def abort(self) -> None:
        super().abort()
        self._saved, self._replayed = [], 0

    def step(self, closure: Callable[[int], tuple]) -> float:
        """One Functional-SAM step (class docstring): ``closure(i)`` per micro-batch at ``w``, the
        perturbation, ``closure(i)`` per micro-batch at ``w + e``, the restore and ``engine.step()``."""
        if not callable(closure):
            raise TypeError("DeepSpeedFunctionalSAM.step() needs a closure(i) that runs the forward of micro-batch i "
                            "and returns (loss, outputs)")
        if self._perturbed or self._count or self._saved:
            raise RuntimeError("DeepSpeedFunctionalSAM.step() inside a started step (first_step() or a backward "
                               "already ran)")
        try:
            total = 0.0
            for i in range(self.gas):
                with torch.enable_grad():
                    loss, outputs = _split(closure(i), f"closure({i}) at w")
                self.accumulate(loss, outputs)
                total += float(loss.detach()) / self.gas
            self.first_step()
            for i in range(self.gas):
                with torch.enable_grad():
                    _, outputs = _split(closure(i), f"closure({i}) at w + e")
                self.second_backward(outputs)
            self.second_step()
        except BaseException:
            self.abort()
            raise
        return total
