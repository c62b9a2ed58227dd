"""Lock-step comparison of a fast backend with the reference, for base optimizers whose step is
badly conditioned (RMSprop's division by ``sqrt(square_avg) + eps``).

Run over several steps, the fp32 fast path and the fp32 reference drift apart wherever a gradient
is near zero: their global norms are summed in different orders (~1e-7 relative), the perturbation
carries that into the second gradient, and RMSprop divides it by a tiny ``sqrt(v)``. How far they
drift depends on the CPU's arithmetic (AVX-512 or AVX2 kernels), so no tolerance built from
another run's error holds on every machine. Here every step starts from identical inputs instead:
the fast run gets the reference's weights and state before each step, and each quantity is
compared where it is well conditioned:

* the perturbed weights ``w + e`` (seen by the closure's second call) and the gradients the base
  optimizer's step read (after a combination rewrote them): the FP32 table;
* the updated weights and state: :func:`tolerances.rmsprop_step_bound`, the error a gradient
  difference can cause through one RMSprop step, from the conditioning of that step.
"""

from __future__ import annotations

import copy

import torch

import harness
from harness import NO_GRAD_PARAM, NO_GRAD_STEP, assert_close, grad_fn, groups_of, lrs_of, make_params, problem
from tolerances import FP32, rmsprop_step_bound



class RecordingRMSprop(torch.optim.RMSprop):
    """RMSprop that keeps a copy of the gradients its last step read (the combinations rewrite the
    gradients for the base optimizer's step and put the user's back afterwards)."""

    def step(self, closure=None):
        self.seen_grads = {p: p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None}
        return super().step(closure)


RMSPROP = (RecordingRMSprop, dict(momentum=0.5, weight_decay=1e-3))


def _build(backend, spec, sam_cls, sam_kwargs):
    weights, coefs = problem(0)
    params = make_params(weights, torch.float32, torch.device("cpu"))
    cls, kwargs = spec
    opt = sam_cls(groups_of(params, lrs_of(spec)), cls, backend=backend, **kwargs, **sam_kwargs)
    return params, coefs, opt


def _set_grads(params, coefs, source, missing):
    for i, (p, c) in enumerate(zip(params, coefs)):
        p.grad = None if i in missing else \
            torch.empty_like(p, memory_format=torch.preserve_format).copy_(grad_fn(source[i].double(), c))


def run_lockstep(backend: str, sam_cls, steps: int, spec=RMSPROP, rho_scale: float = 1.0, **sam_kwargs) -> int:
    """``steps`` steps of ``sam_cls`` through ``step(closure)`` on ``backend`` and on the reference,
    in lock step (see the module docstring); raises AssertionError on the first difference past the
    bounds. ``rho_scale`` scales the radii of the ``backend`` run only (a planted error). Returns the
    number of steps whose closure ran twice (SAM steps)."""
    params, coefs, opt = _build(backend, spec, sam_cls, sam_kwargs)
    ref_params, _, ref = _build("torch", spec, sam_cls, sam_kwargs)
    atol, rtol = FP32["fast_vs_reference"]
    group_of = [gi for gi, g in enumerate(ref.param_groups) for _ in g["params"]]
    sam_steps = 0
    for step in range(steps):
        missing = {NO_GRAD_PARAM} if step == NO_GRAD_STEP else set()
        with torch.no_grad():
            for p, r in zip(params, ref_params):
                p.copy_(r)
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # load_state_dict keeps tensors of the right dtype as they are
        for group in opt.param_groups:  # the state dict carried the reference's radii
            group["rho"] *= rho_scale
        before = [r.detach().clone() for r in ref_params]
        state_before = [{k: v.clone() for k, v in ref.state[r].items()} for r in ref_params]

        seen = {}

        def closure(run, ps):
            calls = seen.setdefault(run, [])
            calls.append([p.detach().clone() for p in ps])
            # the second call: the gradient at the reference's w + e, so that both updates see the
            # same second gradient (the perturbations are compared below, with the FP32 table)
            source = calls[0] if len(calls) == 1 else seen["ref"][1] if run == "fast" else calls[1]
            _set_grads(ps, coefs, source, missing)
            return torch.zeros(())

        for run, o, ps in (("ref", ref, ref_params), ("fast", opt, params)):
            for p in ps:
                p.grad = None
            o.step(lambda run=run, ps=ps: closure(run, ps))
        assert len(seen["fast"]) == len(seen["ref"]), f"step {step}: closure calls differ"
        if len(seen["ref"]) == 2:
            sam_steps += 1
            for i, (a, b) in enumerate(zip(seen["fast"][1], seen["ref"][1])):
                assert_close(a, b, atol, rtol, f"step {step}: w + e of {harness.SHAPES[i]}")
        for i, (p, r) in enumerate(zip(params, ref_params)):
            if i in missing:
                assert torch.equal(p, r) and torch.equal(p, before[i]), f"step {step}: {harness.SHAPES[i]} moved"
                continue
            ga, gb = opt.base_optimizer.seen_grads[p], ref.base_optimizer.seen_grads[r]
            assert_close(ga, gb, atol, rtol, f"step {step}: gradient the base read of {harness.SHAPES[i]}")
            st = state_before[i]
            # the group's values: GSAM's and LookSAM's alpha take the place of RMSprop's
            hp = {k: ref.param_groups[group_of[i]][k] for k in ("lr", "alpha", "eps", "momentum", "weight_decay")}
            bound = rmsprop_step_bound(ga, gb, before[i], st.get("square_avg"), st.get("momentum_buffer"), **hp)
            fs, rs = opt.state[p], ref.state[r]
            assert set(fs) == set(rs)
            for name, a, b in [("weight", p, r)] + [(k, fs[k], rs[k]) for k in ("square_avg", "momentum_buffer")]:
                err = (a.detach().double() - b.detach().double()).abs()
                bad = err > bound[name]
                assert not bad.any(), (
                    f"step {step}: {name} of {harness.SHAPES[i]}: {int(bad.sum())} elements past the one-step "
                    f"bound, worst {float(err.max()):.3g} (bound there {float(bound[name].flatten()[err.argmax()]):.3g})")
    return sam_steps
