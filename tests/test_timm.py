"""timm: SAM, ASAM and Momentum-SAM from timm's optimizer factory (its weight-decay and layer-decay
groups), small timm models built without downloads, a training step with AMP's GradScaler.

timm needs torchvision, which does not load beside the CPU torch 2.13.0 of `make test`: these tests
skip there and run in CI in a second environment with torch 2.14.1 and torchvision 0.29.1
(`.ci/timm_check.sh`)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F


def _timm_loads() -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        import timm  # noqa: F401  (imports torchvision)
    except Exception:  # torchvision built for another torch
        return False
    return True


pytestmark = pytest.mark.skipif(not _timm_loads(), reason="timm (with a torchvision that loads) is not installed")

from sam_fused import MSAM, FusedSAM  # noqa: E402

BACKEND = "torch"  # the kernels are tested elsewhere; these tests are about timm's groups and loops


def _model(name="resnet10t", **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kw)


def _data(n=4, size=32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("name, cls, base", [
    ("sam_sgd", FusedSAM, torch.optim.SGD), ("sam_adamw", FusedSAM, torch.optim.AdamW),
    ("asam_sgd", FusedSAM, torch.optim.SGD), ("msam_sgd", MSAM, torch.optim.SGD),
    ("msam_adamw", MSAM, torch.optim.AdamW)])
def test_factory_keeps_timms_weight_decay_groups(name, cls, base):
    import timm.optim

    from sam_fused.integrations.timm import create_optimizer

    model = _model()
    opt = create_optimizer(model, name, lr=0.05, weight_decay=1e-3, rho=0.1, backend=BACKEND)
    plain = timm.optim.create_optimizer_v2(model, "adamw" if base is torch.optim.AdamW else "momentum", lr=0.05,
                                           weight_decay=1e-3)
    assert isinstance(opt, cls) and type(opt.base_optimizer) is base
    ours = [(sorted(id(p) for p in g["params"]), g["weight_decay"]) for g in opt.param_groups]
    theirs = [(sorted(id(p) for p in g["params"]), g["weight_decay"]) for g in plain.param_groups]
    assert sorted(ours) == sorted(theirs)  # no decay on biases and norms, as timm groups them
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-3}
    assert all(g["rho"] == 0.1 for g in opt.param_groups)
    if name.startswith("asam"):
        assert all(g["adaptive"] for g in opt.param_groups)
    if name == "sam_sgd":
        assert all(g["nesterov"] for g in opt.param_groups)  # timm's "sgd" is Nesterov momentum


def test_layer_decay_scales_reach_the_groups():
    from sam_fused.integrations.timm import create_optimizer

    model = _model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    opt = create_optimizer(model, "sam_adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5, backend=BACKEND)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.3
    assert opt.param_groups[0]["rho"] == 0.05


def test_registered_names_work_through_timms_own_factory():
    import timm.optim

    from sam_fused.integrations.timm import register

    names = register()
    assert register() == names  # idempotent
    assert set(names) <= set(timm.optim.list_optimizers())
    opt = timm.optim.create_optimizer_v2(_model(), "msamsgd", lr=0.1, rho=2.0, backend=BACKEND)
    assert isinstance(opt, MSAM) and opt.param_groups[0]["rho"] == 2.0 and not opt.param_groups[0]["nesterov"]


def test_sam_with_grad_scaler_and_the_scheduler():
    """Two passes per step with torch.amp.GradScaler (the flow examples/timm_sam.py shows), timm's
    cosine scheduler: the loss falls, the scheduler moves the lr of every group."""
    from timm.scheduler import create_scheduler_v2

    from sam_fused.integrations.timm import create_optimizer

    model = _model()
    opt = create_optimizer(model, "sam_sgd", lr=0.05, weight_decay=1e-4, rho=0.05, backend=BACKEND)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=4, warmup_epochs=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    data = _data()
    x0, y0 = data[0]
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x0), y0).item()
    model.train()
    lrs = []
    for epoch in range(4):
        for x, y in data:
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        sched.step(epoch + 1)
        lrs.append(opt.param_groups[0]["lr"])
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x0), y0).item()
    assert after < before
    assert lrs[0] > lrs[-1]


def test_msam_under_timms_native_scaler():
    """Momentum-SAM takes one backward: timm's NativeScaler drives it as any optimizer, and its
    weights at the end are those of a hand-written GradScaler loop. (On the CPU NativeScaler turns
    its CUDA scaler off and calls step() directly; the hand-written loop's GradScaler("cpu") is on:
    with its power-of-two scale the two agree bit for bit.)"""
    from timm.utils import NativeScaler

    from sam_fused.integrations.timm import create_optimizer

    data = _data()
    results = []
    for use_timm in (True, False):
        model = _model()
        opt = create_optimizer(model, "msam_sgd", lr=0.05, weight_decay=1e-4, rho=1.0, backend=BACKEND)
        scaler = NativeScaler() if use_timm else torch.amp.GradScaler("cpu")
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            if use_timm:
                scaler(loss, opt, parameters=model.parameters())
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        with opt.unperturbed():
            results.append(copy.deepcopy([p.detach() for p in model.parameters()]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opt, rho", [("sam_sgd", "0.05"), ("msam_sgd", "0.5")])
def test_example_script_learns(opt, rho):
    """The example in fp32 (bf16 autocast on the CPU takes 7x as long; the GradScaler flows are
    the tests above)."""
    import pathlib
    import subprocess
    import sys

    import os

    root = pathlib.Path(__file__).parent.parent
    script = root / "examples" / "timm_sam.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), "--opt", opt, "--steps", "12", "--backend", BACKEND,
                          "--lr", "0.02", "--rho", rho, "--amp", "off"], capture_output=True, text=True, timeout=300, check=True, env=env).stdout
    first, last = (float(v) for v in out.strip().rsplit(" ", 3)[-3::2])
    assert last < first, out
