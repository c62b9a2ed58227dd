"""The universal class of sharpness-aware objectives: Frob-SAM, Trace-SAM and Det-SAM.

Tahmasebi, Soleymani, Bahri, Jegelka, Jaillet, "A Universal Class of Sharpness-Aware Minimization
Algorithms", ICML 2024. Any function of the Hessian becomes a sharpness-aware objective estimated
with n random perturbations eps_i of the weights; with g0 the gradient at w and L_i, g_i the loss
and gradient at w + eps_i (weights restored exactly after each sample), the update direction is

    Frob-SAM  (Frobenius norm of the Hessian), eps_i = rho z_i, z_i ~ N(0, I), n >= 2:
        g = g0 + (lam / rho^2) / (n - 1) * [sum_i L_i g_i - (1/n)(sum_i L_i)(sum_i g_i)]
    Trace-SAM (trace of the Hessian), eps_i = rho z_i, z_i ~ N(0, I); psi(d) = d, phi' = 1
    Det-SAM   (product of the non-zero eigenvalues; scale-invariant), eps_i = rho u_i,
              u_i ~ U[-h, h]^d; psi(d) = exp(-d/2), psi' = -psi/2, phi'(x) = -2 / x^3
        g = g0 + lam * phi'(x) * sum_i psi'(d_i)/n * (g_i - g0),
        d_i = (L_i - L0) / rho^2,  x = (1/n) sum_i psi(d_i)

and the base optimizer (SGD, AdamW, any) is applied with g. The closure is called n + 1 times per
step. Defaults are the paper's: Frob-SAM rho = lam = 0.005, n = 2; Trace-SAM rho = 0.01;
Det-SAM rho = 1, h = 0.01. The paper's rule leaves lam of Trace- and Det-SAM to the user: the
defaults here (0.1, 0.01) are ours. Large lam / rho^2 makes the estimator's variance explode:
see the documentation's results page (docs/results.md) for the range measured stable.

Memory: besides the base optimizer's state, parameter-sized buffers for the backup of w, g0 and
the accumulated sum(s): 4 for Frob-SAM (sum (L_i - L0)(g_i - g0) and sum (g_i - g0)), 3 for
Trace- and Det-SAM. The noise is never stored by the Triton backend: its kernels draw it from a
counter-based generator (Philox) keyed by (seed, step, sample) and the element's offset.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from ..backends import ALGORITHMS, make_backend
from ..backends.universal_reference import MEASURES, loss_tensor
from ..backends.base import GroupWork, unhooked_step
from ..distributed import local, mesh_mean
from .base import SAMOptimizer, _check_nonneg, _check_positive, _eager


def work_of(plan) -> list[GroupWork]:
    """The parameters with a gradient, per param group (the universal backends plan with no flat
    dtypes, so every parameter is in ``plan.slow``, in group order)."""
    work: list[GroupWork] = []
    for group, p, _ in plan.slow:
        if not work or work[-1].group is not group:
            work.append(GroupWork(len(work), group))
        work[-1].params.append(p)
    return work

UNIVERSAL_BACKENDS = ALGORITHMS["universal"]
_PAPER_DEFAULTS = {"frob": dict(rho=0.005, lam=0.005), "trace": dict(rho=0.01, lam=0.1), "det": dict(rho=1.0, lam=0.01)}


def _make_universal_backend(name: str | None, optimizer):
    return make_backend(name, optimizer, "universal")


class UniversalSAM(SAMOptimizer):
    """Frob-SAM, Trace-SAM or Det-SAM (``measure="frob" | "trace" | "det"``) around any base optimizer.

    Args:
        params: parameters or param groups; a group may set its own ``rho`` and ``lam``.
        base_optimizer: the optimizer class applied with the combined direction.
        measure: which function of the Hessian is penalized.
        rho: perturbation scale; lam: weight of the sharpness term (paper defaults per measure).
        n_samples: perturbations per step (Frob-SAM needs at least 2).
        h: half-width of Det-SAM's uniform noise.
        seed: seed of the perturbation noise (default: drawn from torch's global generator).
        noise: optional ``noise(step, sample, params) -> list[Tensor]`` giving the standardized draw
            (z_i, or u_i for Det-SAM) of each parameter: every backend then uses exactly that noise.
        backend: ``"torch"``, ``"triton"`` or None (Triton for CUDA parameters, else torch).

    Use through ``step(closure)``; the closure runs forward + backward and returns the loss. It
    returns the loss at w. ``state_dict()`` is the base optimizer's (the step counter that keys
    the noise is kept in the param groups, so a resumed run draws the same noise).
    """

    _group_keys = ("rho", "lam")

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type = torch.optim.SGD,
        measure: str = "frob",
        rho: float | None = None,
        lam: float | None = None,
        n_samples: int = 2,
        h: float = 0.01,
        seed: int | None = None,
        noise: Callable | None = None,
        backend: str | None = None,
        **base_kwargs,
    ) -> None:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")
        rho = _PAPER_DEFAULTS[measure]["rho"] if rho is None else rho
        lam = _PAPER_DEFAULTS[measure]["lam"] if lam is None else lam
        _check_nonneg("lam", lam)
        _check_nonneg("h", h)
        _check_positive("rho", rho)
        if not isinstance(n_samples, int) or n_samples < (2 if measure == "frob" else 1):
            raise ValueError(
                f"n_samples must be an integer >= {2 if measure == 'frob' else 1} for {measure}, got {n_samples!r}"
            )
        if backend is not None and backend not in UNIVERSAL_BACKENDS + ("cpu", "cuda"):
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(UNIVERSAL_BACKENDS)} or None")
        self.measure, self.n_samples, self.h, self.noise = measure, n_samples, float(h), noise
        self.seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
        super().__init__(params, base_optimizer, dict(rho=rho, lam=lam), backend, base_kwargs)

    _backend_factory = staticmethod(_make_universal_backend)

    def _check_group(self, group: dict) -> None:
        _check_positive("rho", group["rho"])
        _check_nonneg("lam", group["lam"])

    @_eager
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure that runs forward and backward "
                               "and returns the loss")
        closure = torch.enable_grad()(closure)
        loss = closure()
        with torch.no_grad():
            plan = self._step_plan()
            if not plan.active:
                return loss
            work = work_of(plan)
            step = self.param_groups[0].get("usam_step", 0)
            backend = self._backend
            if backend.plans.params.dtensor:  # FSDP2: every rank its own batch; the losses are the mean
                anchor = plan.active[0]
                device = local(anchor).device
                global_loss = lambda value: mesh_mean(loss_tensor(value, device).clone(), anchor)  # noqa: E731
            else:
                global_loss = lambda value: value  # noqa: E731
            backend.begin(work, global_loss(loss))
            try:
                for i in range(self.n_samples):
                    backend.perturb(work, step, i)
                    self.zero_grad()
                    with torch.enable_grad(), self._frozen_stats():  # a perturbed point
                        loss_i = closure()
                    backend.accumulate(work, i, global_loss(loss_i))
            except BaseException:  # a sample's closure raised: the weights go back to w, exactly
                for _, p, backup in plan.slow:
                    local(p).detach().copy_(backup)
                raise
            backend.finish(work)
            unhooked_step(self.base_optimizer)
            for group in self.param_groups:
                group["usam_step"] = step + 1
        self._opt_called = True
        return loss


class FrobSAM(UniversalSAM):
    """Frob-SAM: penalizes the Frobenius norm of the Hessian (paper defaults rho = lam = 0.005, n = 2)."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.005, lam=0.005, n_samples=2, **kwargs):
        super().__init__(params, base_optimizer, measure="frob", rho=rho, lam=lam, n_samples=n_samples, **kwargs)


class TraceSAM(UniversalSAM):
    """Trace-SAM: penalizes the trace of the Hessian (paper default rho = 0.01)."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.01, lam=0.1, n_samples=2, **kwargs):
        super().__init__(params, base_optimizer, measure="trace", rho=rho, lam=lam, n_samples=n_samples, **kwargs)


class DetSAM(UniversalSAM):
    """Det-SAM: penalizes the product of the non-zero Hessian eigenvalues, scale-invariant
    (paper defaults rho = 1, h = 0.01)."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=1.0, lam=0.01, n_samples=2, h=0.01, **kwargs):
        super().__init__(params, base_optimizer, measure="det", rho=rho, lam=lam, n_samples=n_samples, h=h, **kwargs)
