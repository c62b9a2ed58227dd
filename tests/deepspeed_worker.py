"""The rank side of tests/test_deepspeed.py: a 2-process gloo group on the CPU runs every DeepSpeed
configuration in sequence (one launch: DeepSpeed's imports are most of a run's time); rank 0
saves what the test compares (full tensors) to ``out/<name>.pt``.

Shared with the test module: the model (an MLP, 7 -> 13 -> 3: flat sizes that split unevenly
over two ranks, with alignment padding), the data (global batches of 16) and the optimizers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

STEPS = 3
GLOBAL = 16
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, eps=0.05, weight_decay=1e-2)),
}
RHO = 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def data(steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL, 7, generator=gen), torch.randint(0, 3, (GLOBAL,), generator=gen)) for _ in range(steps)]


def micro_batches(x, y, rank, world, gas):
    """This rank's ``gas`` micro-batches of a global batch (equal sizes: their mean is the global mean)."""
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    return list(zip(xs.chunk(gas), ys.chunk(gas)))


def ds_config(stage: int, gas: int, world: int, bf16: str = "", clip: float = 0.0) -> dict:
    """``bf16``: "" (fp32), "bf16" (bf16 gradients), "bf16_fp32acc" (fp32 gradient accumulation)."""
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL // world // gas,
        "gradient_accumulation_steps": gas,
        "train_batch_size": GLOBAL,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32" if bf16 == "bf16_fp32acc" else "bf16"}
    return cfg


def setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops

    # an inference-only shared-memory op DeepSpeed would JIT-build (~60 s) on its first init
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def engine_for(opt_name: str, cfg: dict, model=None, groups: int = 1, optimizer=None):
    """``groups=2``: the weights and the biases in two param groups (two flat buffers under ZeRO);
    ``optimizer``: a function of the model's parameters that builds the client optimizer."""
    import deepspeed

    model = make_model() if model is None else model
    cls, kw = OPTIMIZERS[opt_name]
    params = list(model.parameters())
    if groups == 2:
        params = [{"params": [p for p in params if p.dim() > 1]}, {"params": [p for p in params if p.dim() == 1]}]
    opt = cls(params, **kw) if optimizer is None else optimizer(params)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def run_steps(engine, sam, batches, rank, world, gas, sam_on=True):
    losses = []
    for x, y in batches:
        mbs = micro_batches(x, y, rank, world, gas)
        dtype = next(engine.module.parameters()).dtype

        def closure():
            total = 0.0
            for xm, ym in mbs:
                loss = F.cross_entropy(engine(xm.to(dtype)).float(), ym)
                engine.backward(loss)
                total += float(loss) / gas
            return total

        if sam_on:
            losses.append(sam.step(closure))
        else:
            closure_loss = None
            for i, (xm, ym) in enumerate(mbs):
                engine.set_gradient_accumulation_boundary(i == gas - 1)
                engine.backward(F.cross_entropy(engine(xm.to(dtype)).float(), ym))
                closure_loss = 0
            engine.set_gradient_accumulation_boundary(True)
            engine.step()
    return losses


def full_params(engine):
    """Every parameter whole, as it is (under ZeRO-3, where ``param.data`` is an empty tensor
    between forwards, gathered from the ranks' partitions)."""
    params = list(engine.module.parameters())
    if int(engine.zero_optimization_stage()) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def unchanged(before, after) -> list[bool]:
    """Bit for bit, per parameter; an empty comparison (a freed parameter) counts as changed."""
    return [a.numel() > 0 and a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)]


def main(rank: int, world: int, port: int, out: str, cases: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    setup(rank, world, port)
    import torch.distributed as dist

    from sam_fused.integrations.deepspeed import DeepSpeedFunctionalSAM, DeepSpeedSAM

    out = Path(out)
    for case in cases:
        name, kind = case["name"], case.get("kind", "sam")
        cfg = ds_config(case["stage"], case["gas"], world, case.get("bf16", ""), case.get("clip", 0.0))
        if kind == "refused_configs":
            engine = sam = None
            result = {}
        else:
            engine = engine_for(case["opt"], cfg, groups=case.get("groups", 1))
            sam = DeepSpeedSAM(engine, rho=case.get("rho", RHO), adaptive=case.get("adaptive", False),
                               backend=case.get("backend"))
            result = {"layout": sam.layout.kind}
        if kind == "sam":
            result["partitions"] = [(w.data_ptr(), w.numel(), str(w.dtype)) for w, _ in sam.layout.partitions()]
            with recorded_kernels(sam) as calls:
                run_steps(engine, sam, data(), rank, world, case["gas"], sam_on=case.get("sam_on", True))
            result["kernels"] = calls
            result["params"] = full_params(engine)
        elif kind == "functional":
            sam.detach()
            fsam = DeepSpeedFunctionalSAM(engine, rho=RHO)
            result["losses"] = run_functional(engine, fsam, data(), rank, world, case["gas"], case.get("hand", False))
            result["params"] = full_params(engine)
        elif kind == "collectives":
            sam.detach()
            result.update(collectives(case, cfg, rank, world))
        elif kind == "refused_configs":
            result["refused"] = refused_configs(world)
        elif kind == "checkpoint":
            batches = data(4)
            run_steps(engine, sam, batches[:2], rank, world, case["gas"])
            ckpt = out / f"{name}_ckpt"
            engine.save_checkpoint(str(ckpt), tag="mid")
            run_steps(engine, sam, batches[2:], rank, world, case["gas"])
            result["uninterrupted"] = full_params(engine)
            engine2 = engine_for(case["opt"], cfg)
            sam2 = DeepSpeedSAM(engine2, rho=RHO)
            engine2.load_checkpoint(str(ckpt), tag="mid")
            run_steps(engine2, sam2, batches[2:], rank, world, case["gas"])
            result["resumed"] = full_params(engine2)
        elif kind == "refusals":
            result.update(refusals(engine, sam, rank, world, case["gas"]))
        dist.barrier()
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


def refusals(engine, sam, rank, world, gas) -> dict:
    """Calls that must be refused with the weights bit-identical, and a closure that raises after
    the perturbation (the weights restored to w)."""
    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    before = full_params(engine)
    found = {}
    for label, kw in {"rho_negative": dict(rho=-1.0), "rho_nan": dict(rho=float("nan")), "eta": dict(eta=-1.0)}.items():
        try:
            DeepSpeedSAM(engine, **kw)
        except ValueError as exc:
            found[label] = str(exc)
    try:
        DeepSpeedSAM(engine, rho=RHO)  # a second one over the same engine
    except RuntimeError as exc:
        found["second_wrapper"] = str(exc)
    try:
        sam.first_step()  # no backward yet
    except RuntimeError as exc:
        found["first_step_without_backward"] = str(exc)
    x, y = data(1)[0]
    xm, ym = micro_batches(x, y, rank, world, gas)[0]
    calls = []

    def failing():
        engine.backward(F.cross_entropy(engine(xm), ym))
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("second pass fails")
        return 0.0

    try:
        sam.step(failing)
    except KeyError:
        found["closure_raised"] = "restored"
    found["weights"] = [torch.equal(a, b) for a, b in zip(before, full_params(engine))]
    found.update(functional_refusals(engine, sam, xm, ym, before))
    return {"refused": found}


def functional_refusals(engine, sam, xm, ym, before) -> dict:
    """DeepSpeedFunctionalSAM's misuses, each refused (then abort()) with the weights at w."""
    from sam_fused.integrations.deepspeed import DeepSpeedFunctionalSAM

    sam.detach()
    fsam = DeepSpeedFunctionalSAM(engine, rho=RHO)
    found = {}
    attempts = {
        "f_detached_outputs": lambda: fsam.accumulate(*(lambda o: (F.cross_entropy(o, ym), o.detach()))(engine(xm))),
        "f_unrelated_outputs": lambda: fsam.accumulate(F.cross_entropy(engine(xm), ym), engine(xm)),
        "f_first_step_after_plain_backward": lambda: (engine.backward(F.cross_entropy(engine(xm), ym)),
                                                      fsam.first_step()),
        "f_closure_returns_loss": lambda: fsam.step(lambda i: F.cross_entropy(engine(xm), ym)),
        "f_second_step_without_second_pass": lambda: (fsam.accumulate(*(lambda o: (F.cross_entropy(o, ym), o))(
            engine(xm))), fsam.first_step(), fsam.second_step()),
    }
    for label, attempt in attempts.items():
        try:
            attempt()
        except (RuntimeError, ValueError, TypeError) as exc:
            found[label] = f"{type(exc).__name__}: {exc}"
        fsam.abort()
        found[label + "_weights"] = all(torch.equal(a, b) for a, b in zip(before, full_params(engine)))
    fsam.detach()
    return found


# ---------------------------------------------------------------------- which ops run
def _tensors(ts) -> list[tuple]:
    return [(t.data_ptr(), t.numel(), str(t.dtype)) for t in ts]


@contextlib.contextmanager
def recorded_kernels(sam):
    """Every call that makes the norm and the perturbation, in order: the native module's
    ``sq_sum_`` / ``perturb_`` (with the weight tensors they were given: address, size, dtype, and
    the gradients' dtypes) and the torch reference ops of ``sam_fused.integrations.deepspeed``."""
    import sam_fused.integrations.deepspeed as D

    calls: list[tuple] = []
    native = sam._kernels.C if sam._kernels is not None else None

    class Recording:
        def __getattr__(self, name):
            return getattr(native, name)

        def sq_sum_(self, out, weights, grads, **kw):
            calls.append(("native sq_sum_", _tensors(weights), [str(g.dtype) for g in grads]))
            return native.sq_sum_(out, weights, grads, **kw)

        def perturb_(self, weights, grads, backups, *args, **kw):
            calls.append(("native perturb_", _tensors(weights), [str(g.dtype) for g in grads]))
            return native.perturb_(weights, grads, backups, *args, **kw)

    ref_sq, ref_perturb = D._ref_sq, D._ref_perturb

    def sq(out, w, g, *args):
        calls.append(("torch sq", _tensors([w]), [str(g.dtype)]))
        return ref_sq(out, w, g, *args)

    def perturb(w, g, *args):
        calls.append(("torch perturb", _tensors([w]), [str(g.dtype)]))
        return ref_perturb(w, g, *args)

    if native is not None:
        sam._kernels.C = Recording()
    D._ref_sq, D._ref_perturb = sq, perturb
    try:
        yield calls
    finally:
        D._ref_sq, D._ref_perturb = ref_sq, ref_perturb
        if native is not None:
            sam._kernels.C = native


# ---------------------------------------------------------------------- what is communicated
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_coalesced", "all_gather",
               "all_gather_into_tensor", "all_gather_base", "_all_gather_base", "all_gather_coalesced", "broadcast",
               "all_to_all", "all_to_all_single", "gather", "scatter", "barrier", "all_gather_object",
               "broadcast_object_list")
_INPUT_SECOND = ("all_gather_into_tensor", "all_gather_base", "_all_gather_base", "reduce_scatter_tensor",
                 "_reduce_scatter_base")


def _describe(name, args, kwargs) -> tuple:
    """(collective, dtype, elements) of the tensor a rank contributes."""
    for key in ("input_tensor", "tensor", "input", "tensors"):
        if key in kwargs:
            t = kwargs[key]
            break
    else:
        tensors = [a for a in args if torch.is_tensor(a) or isinstance(a, (list, tuple))]
        t = tensors[1] if name in _INPUT_SECOND and len(tensors) > 1 else (tensors[0] if tensors else None)
    if isinstance(t, (list, tuple)):
        return (name, str(t[0].dtype) if t else None, sum(x.numel() for x in t))
    return (name, None if t is None else str(t.dtype), 0 if t is None else t.numel())


class CommLog:
    """Every collective called while it is on, by phase: DeepSpeed's communication backend's
    methods (``deepspeed.comm.comm.cdb``, where every ``deepspeed.comm`` call goes) and
    ``torch.distributed``'s functions (for any call that bypasses deepspeed.comm); a call is counted
    once, at the outermost of the two."""

    def __init__(self) -> None:
        self.phase = None
        self.calls: dict[str, list] = {}
        self._depth = 0
        self._undo: list = []

    def _wrap(self, obj, name):
        fn = getattr(obj, name, None)
        if not callable(fn):
            return
        log = self

        def wrapped(*args, **kwargs):
            if log._depth == 0 and log.phase is not None:
                log.calls.setdefault(log.phase, []).append(_describe(name, args, kwargs))
            log._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                log._depth -= 1

        had = name in vars(obj)
        self._undo.append((obj, name, vars(obj).get(name), had))
        setattr(obj, name, wrapped)

    def __enter__(self):
        import deepspeed.comm.comm as dscomm
        import torch.distributed as tdist
        import torch.distributed.distributed_c10d as c10d

        for obj in (dscomm.cdb, tdist, c10d):
            for name in COLLECTIVES:
                self._wrap(obj, name)
        return self

    def __exit__(self, *exc):
        for obj, name, value, had in reversed(self._undo):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self.phase = None


def collectives(case, cfg, rank, world, steps: int = 2) -> dict:
    """The collectives of ``steps`` SAM steps (DeepSpeedSAM by hand: pass 1, first_step, pass 2,
    second_step) and of the same engine's plain steps (one pass and engine.step()), per phase."""
    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    gas, groups = case["gas"], case.get("groups", 1)
    batches = data(steps)
    engine = engine_for(case["opt"], cfg, groups=groups)
    sam = DeepSpeedSAM(engine, rho=RHO)
    dtype = next(engine.module.parameters()).dtype
    parts = [(w.numel(), str(w.dtype)) for w, _ in sam.layout.partitions()]

    def backward_pass(mbs, plain=False):
        for i, (xm, ym) in enumerate(mbs):
            if plain:
                engine_plain.set_gradient_accumulation_boundary(i == gas - 1)
                engine_plain.backward(F.cross_entropy(engine_plain(xm.to(dtype)).float(), ym))
            else:
                engine.backward(F.cross_entropy(engine(xm.to(dtype)).float(), ym))

    out = {"partitions": parts, "sam": [], "plain": []}
    with CommLog() as log:
        for x, y in batches:
            mbs, log.calls = micro_batches(x, y, rank, world, gas), {}
            log.phase = "pass1"
            backward_pass(mbs)
            log.phase = "first_step"
            sam.first_step()
            log.phase = "pass2"
            backward_pass(mbs)
            log.phase = "second_step"
            sam.second_step()
            log.phase = None
            out["sam"].append(log.calls)
    sam.detach()
    engine_plain = engine_for(case["opt"], cfg, groups=groups)
    with CommLog() as log:
        for x, y in batches:
            mbs, log.calls = micro_batches(x, y, rank, world, gas), {}
            log.phase = "pass"
            backward_pass(mbs, plain=True)
            log.phase = "step"
            engine_plain.set_gradient_accumulation_boundary(True)
            engine_plain.step()
            log.phase = None
            out["plain"].append(log.calls)
    return out


# ---------------------------------------------------------------------- refused engines
@contextlib.contextmanager
def fp16_allowed():
    """DeepSpeed's CPU accelerator declares fp16 unsupported and deepspeed.initialize refuses it;
    for the refusal test the engine is built anyway (its fp16 optimizer runs on the CPU)."""
    from deepspeed.accelerator import get_accelerator

    cls = type(get_accelerator())
    saved = cls.is_fp16_supported, cls.supported_dtypes
    cls.is_fp16_supported = lambda self: True
    cls.supported_dtypes = lambda self: saved[1](self) + [torch.float16]
    try:
        yield
    finally:
        cls.is_fp16_supported, cls.supported_dtypes = saved


REFUSED_CONFIGS = {
    # label: (ZeRO stage, config entries, client optimizer or None, expected exception)
    "zero3": (3, {}, None, "NotImplementedError"),
    "offload_optimizer_cpu_z1": (1, {"offload_optimizer": {"device": "cpu"}}, None, "NotImplementedError"),
    "offload_optimizer_cpu_z2": (2, {"offload_optimizer": {"device": "cpu"}}, None, "NotImplementedError"),
    "fp16_z0": (0, "fp16", None, "NotImplementedError"),
    "fp16_z1": (1, "fp16", None, "NotImplementedError"),
    "fp16_z2": (2, "fp16", None, "NotImplementedError"),
    "client_msam": (1, {}, "msam", "TypeError"),
    "client_fusedsam": (2, {}, "fusedsam", "TypeError"),
    "offload_optimizer_none_z2": (2, {"offload_optimizer": {"device": "none"}}, None, None),  # no offload: accepted
}


def refused_configs(world) -> dict:
    """Engines DeepSpeedSAM must refuse at construction, before any write: the exception, its
    message, whether the weights (all of them, gathered under ZeRO-3) are bit-identical and whether
    engine.backward was left alone."""
    from sam_fused import MSAM, FusedSAM
    from sam_fused.integrations.deepspeed import DeepSpeedSAM

    found = {}
    for label, (stage, extra, client, _) in REFUSED_CONFIGS.items():
        cfg = ds_config(stage, 1, world)
        if extra == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
        else:
            cfg["zero_optimization"].update(extra)
        if "offload_optimizer" in cfg["zero_optimization"]:
            cfg["zero_force_ds_cpu_optimizer"] = False  # the client torch optimizer over the host partition
        build = {"msam": lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9),
                 "fusedsam": lambda ps: FusedSAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
                 None: None}[client]
        with fp16_allowed() if extra == "fp16" else contextlib.nullcontext():
            engine = engine_for("sgd", cfg, optimizer=build)
        before = full_params(engine)
        entry = {"exception": None, "message": "", "elements": sum(t.numel() for t in before)}
        try:
            sam = DeepSpeedSAM(engine, rho=RHO)
            sam.detach()
        except Exception as exc:
            entry.update(exception=type(exc).__name__, message=str(exc))
        entry["unchanged"] = unchanged(before, full_params(engine))
        entry["backward_wrapped"] = "backward" in vars(engine)
        found[label] = entry
    return found


# ---------------------------------------------------------------------- Functional-SAM
def run_functional(engine, fsam, batches, rank, world, gas, hand=False):
    """DeepSpeedFunctionalSAM steps: ``fsam.step(closure)`` or, with ``hand``, accumulate /
    first_step / second_backward / second_step around the user's own forwards."""
    losses = []
    for x, y in batches:
        mbs = micro_batches(x, y, rank, world, gas)

        def forward(i):
            logits = engine(mbs[i][0])
            return F.cross_entropy(logits, mbs[i][1]), logits

        if hand:
            for i in range(gas):
                fsam.accumulate(*forward(i))
            fsam.first_step()
            for i in range(gas):
                fsam.second_backward(forward(i)[1])
            fsam.second_step()
        else:
            losses.append(fsam.step(forward))
    return losses


if __name__ == "__main__":  # python tests/deepspeed_worker.py RANK WORLD PORT OUT CASES_JSON
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
