"""A deterministic SAM problem, run through any backend and through a float64 transcription.

Parameters: sizes 1, 97, 278011, a 0-dim, an empty tensor, a transposed (dense, non-contiguous)
view and a strided slice (not dense), split over two param groups with their own rho and lr.
The "loss" has the elementwise gradient ``g(w) = a*w + b + 0.1*sin(3w)``, so the gradient at the
perturbed point differs from the one at w. At step 3 one parameter has no gradient.
"""

from __future__ import annotations

import math

import torch

from sam_fused import FusedSAM

SHAPES = ["1", "97", "278011", "0-dim", "empty", "transposed", "strided"]
NO_GRAD_STEP = 3
NO_GRAD_PARAM = 1  # the 97-element one
LRS = (0.05, 0.02)
ADAM_LRS = (0.01, 0.004)
# The global norm over ~280k gradients is ~800: rho of this order gives each element a
# perturbation of ~0.05, large enough that an error in it shows in every comparison.
RHOS = (20.0, 40.0)


def _raw(shape: str, gen: torch.Generator) -> torch.Tensor:
    if shape == "0-dim":
        return torch.randn((), generator=gen, dtype=torch.float64)
    if shape == "empty":
        return torch.randn(0, generator=gen, dtype=torch.float64)
    if shape == "transposed":
        return torch.randn(17, 13, generator=gen, dtype=torch.float64).t()
    if shape == "strided":
        return torch.randn(20, 10, generator=gen, dtype=torch.float64)[:, ::2]
    return torch.randn(int(shape), generator=gen, dtype=torch.float64)


def problem(seed: int = 0):
    """Initial float64 weights and gradient coefficients (a, b) per parameter."""
    gen = torch.Generator().manual_seed(seed)
    weights = [_raw(s, gen) for s in SHAPES]
    coefs = [(0.5 + 1.5 * torch.rand(w.shape, generator=gen, dtype=torch.float64),
              torch.randn(w.shape, generator=gen, dtype=torch.float64)) for w in weights]
    return weights, coefs


def grad_fn(w: torch.Tensor, coef) -> torch.Tensor:
    a, b = coef
    return a * w + b + 0.1 * torch.sin(3 * w)


def make_params(weights, dtype, device):
    """Parameters of ``dtype`` on ``device`` with the layouts of ``weights`` (views kept as views)."""
    params = []
    for shape, w in zip(SHAPES, weights):
        if shape == "transposed":
            data = w.t().to(dtype=dtype, device=device).t()
        elif shape == "strided":
            data = torch.zeros(20, 10, dtype=dtype, device=device)[:, ::2]
            data.copy_(w)
        else:
            data = w.to(dtype=dtype, device=device)
        params.append(torch.nn.Parameter(data))
    return params


def lrs_of(opt_name) -> tuple[float, float]:
    cls = (OPTIMIZERS[opt_name] if isinstance(opt_name, str) else opt_name)[0]
    return ADAM_LRS if cls in (torch.optim.Adam, torch.optim.AdamW) else LRS


def groups_of(params, lrs, rhos=RHOS):
    return [
        {"params": params[:4], "lr": lrs[0], "rho": rhos[0]},
        {"params": params[4:], "lr": lrs[1], "rho": rhos[1]},
    ]


def set_grads(params, coefs, missing=()):
    for i, (p, c) in enumerate(zip(params, coefs)):
        if i in missing:
            p.grad = None
            continue
        g = grad_fn(p.detach().double().cpu(), (c[0], c[1]))
        p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)


# name -> (base optimizer class, kwargs); lr comes from the groups
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "sgd_momentum_wd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-2)),
    "sgd_nesterov": (torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_dampening_maximize": (torch.optim.SGD, dict(momentum=0.8, dampening=0.3, maximize=True)),
    # lr and eps chosen so that lr * max|dg/dw| / eps < 1: see ADAM in tolerances.py
    "adam": (torch.optim.Adam, dict(weight_decay=1e-2, eps=0.05)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=1e-2, betas=(0.8, 0.95), eps=0.05)),
    "adam_maximize": (torch.optim.Adam, dict(maximize=True, eps=0.1)),
}


def run_backend(backend, dtype, device, opt_name, adaptive=False, eta=0.0, steps=7, seed=0, rho_scale=1.0,
                sam_cls=FusedSAM, closure=False, **sam_kwargs):
    """Run ``steps`` SAM steps (``sam_cls``, FusedSAM by default, with ``sam_kwargs``), by
    first/second_step or, with ``closure``, through ``step(closure)`` with a closure that sets the
    gradients; returns (params, per-param state dicts, optimizer)."""
    weights, coefs = problem(seed)
    params = make_params(weights, dtype, device)
    cls, kwargs = OPTIMIZERS[opt_name] if isinstance(opt_name, str) else opt_name
    groups = groups_of(params, lrs_of(opt_name), rhos=tuple(r * rho_scale for r in RHOS))
    opt = sam_cls(groups, cls, adaptive=adaptive, eta=eta, backend=backend, **kwargs, **sam_kwargs)
    for step in range(steps):
        missing = {NO_GRAD_PARAM} if step == NO_GRAD_STEP else set()
        if closure:
            for p in params:
                p.grad = None
            opt.step(lambda: set_grads(params, coefs, missing) or torch.zeros(()))
            continue
        set_grads(params, coefs, missing)
        opt.first_step(zero_grad=True)
        set_grads(params, coefs, missing)
        opt.second_step(zero_grad=True)
    return params, [opt.state[p] for p in params], opt


# ---------------------------------------------------------------------- float64 transcription
GROUP_OF = [0] * 4 + [1] * (len(SHAPES) - 4)


def base_update(opt_name, w: torch.Tensor, g: torch.Tensor, st: dict, lr: float) -> torch.Tensor:
    """One step of the base optimizer ``opt_name`` on one float64 parameter (torch.optim's
    formulas); updates its state ``st``, returns the new weight."""
    cls, kw = OPTIMIZERS[opt_name]
    if kw.get("maximize", False):
        g = -g
    wd = kw.get("weight_decay", 0.0)
    if cls is torch.optim.SGD:
        g = g + wd * w
        mom = kw.get("momentum", 0.0)
        if mom:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.clone()
            else:
                st["momentum_buffer"] = mom * st["momentum_buffer"] + (1 - kw.get("dampening", 0.0)) * g
            buf = st["momentum_buffer"]
            g = g + mom * buf if kw.get("nesterov", False) else buf
        return w - lr * g
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    eps = kw.get("eps", 1e-8)
    if not st:
        st.update(step=0.0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
    st["step"] += 1
    if cls is torch.optim.AdamW:
        w = w * (1 - lr * wd)
    else:
        g = g + wd * w
    st["exp_avg"] = beta1 * st["exp_avg"] + (1 - beta1) * g
    st["exp_avg_sq"] = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** st["step"]
    bc2 = 1 - beta2 ** st["step"]
    denom = st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + eps
    return w - (lr / bc1) * st["exp_avg"] / denom


def active_at(step: int) -> list[int]:
    return [i for i in range(len(SHAPES)) if not (step == NO_GRAD_STEP and i == NO_GRAD_PARAM)]


def sam_point(ws, coefs, active, adaptive=False, eta=0.0, rho_scale=1.0):
    """(g at w, the perturbed weights w + e, g at w + e) of a SAM step, in float64."""
    g0 = {i: grad_fn(ws[i], coefs[i]) for i in active}
    t = {i: (ws[i].abs() + eta) if adaptive else torch.ones_like(ws[i]) for i in active}
    norm = math.sqrt(sum(float(((t[i] * g0[i]) ** 2).sum()) for i in active))
    moved = {i: ws[i] + rho_scale * RHOS[GROUP_OF[i]] * t[i] ** 2 * g0[i] / (norm + 1e-12) for i in active}
    g1 = {i: grad_fn(moved[i], coefs[i]) for i in active}
    return g0, moved, g1


def dot(a: dict, b: dict) -> float:
    return sum(float((a[i] * b[i]).sum()) for i in a)


def run_float64(opt_name, adaptive=False, eta=0.0, steps=7, seed=0, dtype=torch.float32, combine=None):
    """The formulas of the README, in float64, on the weights rounded to ``dtype`` first.
    ``combine(g0, g1, step)`` (GSAM's), if given, returns the gradients the update uses."""
    weights, coefs = problem(seed)
    ws = [w.to(dtype).double().clone() for w in weights]
    lrs = lrs_of(opt_name)
    state = [dict() for _ in ws]
    for step in range(steps):
        active = active_at(step)
        g0, _, g1 = sam_point(ws, coefs, active, adaptive, eta)
        if combine is not None:
            g1 = combine(g0, g1)
        for i in active:
            ws[i] = base_update(opt_name, ws[i], g1[i], state[i], lrs[GROUP_OF[i]])
    return ws, state


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def assert_close(actual, expected, atol, rtol, what=""):
    """Elementwise |a - e| <= atol + rtol*|e|; on failure, name the first bad indices and any NaN/inf."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if a.numel() == 0:
        return
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}: actual {[a[tuple(i)].item() for i in idx]} expected {[e[tuple(i)].item() for i in idx]}; "
            f"max abs diff {(a - e).abs().max().item():.3g}; non-finite in actual: {int((~torch.isfinite(a)).sum())}"
        )
