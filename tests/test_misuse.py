"""Misuse a torch.optim user can reach by accident, on every algorithm and backend: each is refused
clearly, with parameters and state bit-identical, or works as torch.optim's own optimizers do."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sam_fused import GSAM, MSAM, FrobSAM, FusedSAM, LookSAM, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)


def snap(opt, params):
    state = {(i, k): v.clone() if torch.is_tensor(v) else v
             for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()}
    return [p.detach().clone() for p in params], state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def sam_step(opt, params):
    """One SAM step by hand (MSAM: its single step)."""
    for p in params:
        p.grad = torch.randn_like(p)
    if isinstance(opt, MSAM):
        opt.step()
        return
    opt.first_step()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.second_step()


ALGOS = {
    "sam": lambda ps, b: FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "msam": lambda ps, b: MSAM(ps, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend=b),
}


@pytest.mark.quick_subset("triton", [dict(algo="sam"), dict(algo="gsam", swap="float64"), dict(algo="msam", swap="shorter")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("swap", ["shorter", "float64", "longer"])
def test_gradient_swapped_in_place_is_refused(backend, algo, swap):
    """``p.grad.data = x`` keeps the .grad object and skips the setter's checks: the plan must see
    the new size and dtype before a kernel reads it."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000, device=DEVICE)), torch.nn.Parameter(torch.randn(7, device=DEVICE))]
    opt = ALGOS[algo](params, backend)
    sam_step(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    g = params[0].grad
    g.data = {"shorter": torch.randn(100, device=DEVICE), "float64": torch.randn(5000, device=DEVICE, dtype=torch.float64),
              "longer": torch.randn(6000, device=DEVICE)}[swap]
    assert params[0].grad is g
    before = snap(opt, params)
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        opt.step() if algo == "msam" else opt.first_step()
    assert same(snap(opt, params), before)


STATE_SWAP = {  # (optimizer, the state entry a swap replaces)
    "sam": (lambda ps, b: FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b), "momentum_buffer"),
    "msam": (lambda ps, b: MSAM(ps, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend=b), "momentum_buffer"),
    "psam": (lambda ps, b: FusedSAM(ps, torch.optim.AdamW, lr=1e-3, precondition=True, backend=b), "exp_avg_sq"),
}


@pytest.mark.quick_subset("triton", [dict(algo="sam", swap="shorter"), dict(algo="msam", swap="float64"),
                                     dict(algo="psam", swap="moved")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(STATE_SWAP))
@pytest.mark.parametrize("swap", ["shorter", "float64", "moved"])
def test_state_swapped_in_place_is_refused_or_followed(backend, algo, swap):
    """``buf.data = x`` keeps the state tensor's object: the kernels' tables must see its new size,
    dtype and address. Another size or dtype is refused, with the weights and state as they were
    (FusedSAM: after restore(); its update pass refuses with the parameters still perturbed); the
    same size and dtype at a new address is read there, as an in-place copy of the values is."""
    make, key = STATE_SWAP[algo]

    def run(how):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5000, device=DEVICE)), torch.nn.Parameter(torch.randn(7, device=DEVICE))]
        opt = make(params, backend)
        sam_step(opt, params)
        sam_step(opt, params)
        buf = opt.state[params[0]][key]
        new = {"shorter": torch.rand(100, device=DEVICE), "float64": torch.rand(5000, device=DEVICE, dtype=torch.float64),
               "moved": torch.rand(5000, device=DEVICE)}[swap]
        if how == "copy":
            buf.copy_(new)
        else:
            buf.data = new
        return opt, params

    opt, params = run("swap")
    if swap == "moved":
        sam_step(opt, params)
        ref_opt, ref = run("copy")
        sam_step(ref_opt, ref)
        assert same(snap(opt, params), snap(ref_opt, ref))
        return
    before = snap(opt, params)
    with pytest.raises(RuntimeError, match="does not fit the parameter"):
        sam_step(opt, params)
    if not isinstance(opt, MSAM):
        opt.restore()
    after = snap(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
    assert opt.state[params[0]][key] is not None and after[1].keys() == before[1].keys()


# ---------------------------------------------------------------------- checkpoints mid-step
MID_STEP = {
    "sam": lambda ps, b: FusedSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "looksam": lambda ps, b: LookSAM(ps, torch.optim.SGD, k=3, lr=0.1, momentum=0.9, backend=b),
    "interval": lambda ps, b: FusedSAM(ps, torch.optim.SGD, interval=3, lr=0.1, momentum=0.9, backend=b),
}


@pytest.mark.quick_subset("triton", [dict(algo="looksam")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", list(MID_STEP))
def test_state_dict_between_the_steps_is_refused(backend, algo):
    """The model holds w + e between first_step() and second_step(): a checkpoint then would resume
    from the wrong weights with nothing to tell. Refused; after restore() (or the second step) it works."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, device=DEVICE)), torch.nn.Parameter(torch.randn(3, 5, device=DEVICE))]
    opt = MID_STEP[algo](params, backend)
    sam_step(opt, params)
    while not opt.sam_due():  # the plain steps of a schedule, up to the next SAM step
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    before = snap(opt, params)
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.state_dict()
    assert same(snap(opt, params), before)
    w_e = [p.detach().clone() for p in params]
    assert opt.restore()
    assert not any(torch.equal(a, p) for a, p in zip(w_e, params))
    sd = opt.state_dict()
    assert not opt.restore()  # a no-op when no step is under way: safe in a handler that saves at any moment
    assert opt.state_dict().keys() == sd.keys()


# ---------------------------------------------------------------------- GradScaler and the schedule
@pytest.mark.quick_subset("triton", [dict(algo="gsam", poison=1), dict(algo="interval", poison=2)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sam", "gsam", "interval"])
@pytest.mark.parametrize("poison", [1, 2])
def test_step_skipped_by_the_grad_scaler_leaves_the_schedule(backend, algo, poison):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(DEVICE)
    opt = MID_STEP[algo](list(model.parameters()), backend)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    x, y = torch.randn(16, 7, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)

    def amp_step(bad=None):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if bad == 1:
            model[0].weight.grad[0, 0] = float("inf")
        if not opt.sam_due():  # a plain step of the schedule: one backward, then scaler.step(opt)
            if bad == 2:
                model[2].bias.grad[1] = float("nan")
            scaler.step(opt)
            scaler.update()
            return
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if bad == 2:
            model[2].bias.grad[1] = float("nan")
        scaler.step(opt)
        scaler.update()

    def count():  # as a checkpoint has it (without a schedule the skips are settled there, sync-free)
        return [g["sam_step"] for g in opt.state_dict()["param_groups"]]

    amp_step()
    assert count() == [1]
    weights = [p.detach().clone() for p in model.parameters()]
    amp_step(poison)
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert count() == [1]
    if algo == "interval":  # with a schedule the host knows at once: the next step is the one that was due
        assert opt.param_groups[0]["sam_step"] == 1
    amp_step()
    amp_step(poison)
    amp_step()
    assert count() == [3]


# ---------------------------------------------------------------------- torch.optim's hooks
def _algorithms(params, backend):
    return {
        "sam": FusedSAM(params, torch.optim.SGD, lr=0.1, backend=backend),
        "gsam": GSAM(params, torch.optim.SGD, lr=0.1, backend=backend),
        "looksam": LookSAM(params, torch.optim.SGD, k=2, lr=0.1, backend=backend),
        "interval": FusedSAM(params, torch.optim.SGD, interval=2, lr=0.1, backend=backend),
        "generic": FusedSAM(params, torch.optim.RMSprop, lr=0.01, backend=backend),
        "msam": MSAM(params, torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, backend=backend),
        "frobsam": FrobSAM(params, torch.optim.SGD, lr=0.1),
    }


ALGO_NAMES = ["sam", "gsam", "looksam", "interval", "generic", "msam", "frobsam"]


@pytest.mark.quick_subset("triton", [dict(algo="interval", form="closure"), dict(algo="looksam", form="manual"),
                                     dict(algo="msam")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("form", ["closure", "manual"])
def test_step_hooks_see_one_step_per_step(backend, algo, form):
    """torch.optim's global and per-optimizer step hooks fire once per step, whatever the form of
    the step, the schedule or the base optimizer (its own step inside is no step of its own)."""
    if form == "manual" and algo in ("msam", "frobsam"):
        pytest.skip("no first_step()/second_step()")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).to(DEVICE)
    opt = _algorithms(list(model.parameters()), backend)[algo]
    x = torch.randn(8, 5, device=DEVICE)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("gpre", type(o)))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("gpost", type(o)))),
               opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o)))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", type(o))))]
    try:
        def closure():
            loss = model(x).square().mean()
            loss.backward()
            return loss

        for _ in range(4):
            opt.zero_grad()
            if form == "closure":
                opt.step(closure)
            else:
                closure()
                opt.first_step(zero_grad=True)
                closure()
                opt.second_step()
    finally:
        for h in handles:
            h.remove()
    assert calls == [("gpre", type(opt)), ("pre", type(opt)), ("post", type(opt)), ("gpost", type(opt))] * 4


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_state_dict_hooks_fire(algo):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    opt = _algorithms(list(model.parameters()), "torch")[algo]
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("post") or dict(sd, marked=True))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", sd.get("marked"))) or
                                          {k: v for k, v in sd.items() if k != "marked"})
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    sd = opt.state_dict()
    assert sd["marked"] is True and seen == ["pre", "post"]
    opt.load_state_dict(sd)
    assert seen == ["pre", "post", ("load_pre", True), "load_post"]
    opt.load_state_dict(state_dict=sd)  # by name, as torch.distributed.checkpoint passes it
    assert seen[-2:] == [("load_pre", True), "load_post"]


# ---------------------------------------------------------------------- complex parameters
@pytest.mark.parametrize("cls", [FusedSAM, GSAM, LookSAM, MSAM, FrobSAM])
def test_complex_parameters_are_refused_at_construction_naming_the_class(cls):
    real = torch.nn.Parameter(torch.randn(3))
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=f"^{cls.__name__} does not support complex parameters"):
        cls([real, z], torch.optim.SGD, lr=0.1, momentum=0.9)
    opt = cls([real], torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"^{cls.__name__} does not support complex parameters"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
