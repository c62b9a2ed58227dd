"""timm: SAM, ASAM and Momentum-SAM from timm's optimizer factory, with its weight-decay and
layer-decay grouping.

    from sam_fused.integrations.timm import create_optimizer
    opt = create_optimizer(model, "sam_sgd", lr=0.1, weight_decay=5e-4, rho=0.05)
    opt = create_optimizer(model, "msam_adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75, rho=3.0)

``create_optimizer`` registers the optimizers below in timm's registry (once) and calls
``timm.optim.create_optimizer_v2``, so the parameter groups are timm's own: no weight decay on
biases and norms, ``model.no_weight_decay()``, ``layer_decay`` with its ``lr_scale`` per group
(which timm's schedulers apply). After :func:`register`, timm's own factory and training script
take the names too (``create_optimizer_v2(model, "samsgd")``, ``train.py --opt msamadamw``): timm
parses the name after its last underscore, so the registered names have none.

| name here | in timm's registry | optimizer |
|---|---|---|
| ``sam_sgd`` | ``samsgd`` | FusedSAM over SGD, Nesterov momentum (timm's ``sgd``) |
| ``sam_momentum`` | ``sammomentum`` | FusedSAM over SGD with plain momentum (timm's ``momentum``) |
| ``sam_adamw`` | ``samadamw`` | FusedSAM over AdamW |
| ``asam_sgd``, ``asam_adamw`` | ``asamsgd``, ``asamadamw`` | ASAM (``adaptive=True``) over those |
| ``msam_sgd`` | ``msamsgd`` | Momentum-SAM over SGD with plain momentum (its rule has no Nesterov) |
| ``msam_adamw`` | ``msamadamw`` | Momentum-SAM over AdamW |

A SAM step needs two backward passes, which timm's loss scalers do not run: use
``first_step(grad_scaler=scaler)`` and ``scaler.step(opt)`` (see ``examples/timm_sam.py``).
Momentum-SAM needs one, so timm's ``NativeScaler`` (``loss_scaler(loss, optimizer)``) drives it
as it drives any optimizer.
"""

from __future__ import annotations

import torch

from ..optim import MSAM, FusedSAM


class SAMSGD(FusedSAM):
    """FusedSAM over ``torch.optim.SGD``, built as timm builds an optimizer (``params, lr=..., momentum=...``)."""

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0, backend=None, **kwargs):
        super().__init__(params, torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, backend=backend, **kwargs)


class SAMAdamW(FusedSAM):
    """FusedSAM over ``torch.optim.AdamW``, built as timm builds an optimizer."""

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0, backend=None, **kwargs):
        super().__init__(params, torch.optim.AdamW, rho=rho, adaptive=adaptive, eta=eta, backend=backend, **kwargs)


class MSAMSGD(MSAM):
    """Momentum-SAM over ``torch.optim.SGD`` (plain momentum), built as timm builds an optimizer."""

    def __init__(self, params, rho: float = 3.0, backend=None, **kwargs):
        super().__init__(params, torch.optim.SGD, rho=rho, backend=backend, **kwargs)


class MSAMAdamW(MSAM):
    """Momentum-SAM over ``torch.optim.AdamW``, built as timm builds an optimizer."""

    def __init__(self, params, rho: float = 3.0, backend=None, **kwargs):
        super().__init__(params, torch.optim.AdamW, rho=rho, backend=backend, **kwargs)


# name here -> (name in timm's registry, class, has momentum, has betas, defaults, description)
OPTIMIZERS = {
    "sam_sgd": ("samsgd", SAMSGD, True, False, {"nesterov": True}, "SAM (sam_fused) over SGD with Nesterov momentum"),
    "sam_momentum": ("sammomentum", SAMSGD, True, False, {"nesterov": False}, "SAM (sam_fused) over SGD with momentum"),
    "sam_adamw": ("samadamw", SAMAdamW, False, True, None, "SAM (sam_fused) over AdamW"),
    "asam_sgd": ("asamsgd", SAMSGD, True, False, {"nesterov": True, "adaptive": True}, "ASAM (sam_fused) over SGD"),
    "asam_adamw": ("asamadamw", SAMAdamW, False, True, {"adaptive": True}, "ASAM (sam_fused) over AdamW"),
    "msam_sgd": ("msamsgd", MSAMSGD, True, False, {"nesterov": False}, "Momentum-SAM (sam_fused) over SGD"),
    "msam_adamw": ("msamadamw", MSAMAdamW, False, True, None, "Momentum-SAM (sam_fused) over AdamW"),
}


def register(registry=None) -> list[str]:
    """Register the optimizers in timm's registry (its default one unless given); idempotent.
    Returns the registered names."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    registry = default_registry if registry is None else registry
    names = []
    for timm_name, cls, momentum, betas, defaults, text in OPTIMIZERS.values():
        names.append(timm_name)
        if getattr(registry, "_optimizers", {}).get(timm_name) is not None and \
                registry.get_optimizer_info(timm_name).opt_class is cls:
            continue  # registered before (timm warns on every overwrite)
        registry.register(OptimInfo(name=timm_name, opt_class=cls, description=text, has_momentum=momentum,
                                    has_betas=betas, has_eps=betas, defaults=defaults))
    return names


def create_optimizer(model_or_params, opt: str = "sam_sgd", **kwargs):
    """timm's ``create_optimizer_v2`` for the names above (``rho``, ``adaptive``, ``eta``,
    ``backend`` and every timm argument: ``lr``, ``weight_decay``, ``momentum``, ``layer_decay``,
    ...). A name timm knows on its own (``"sgd"``, ``"adamw"``) gives timm's plain optimizer."""
    import timm.optim

    register()
    name = OPTIMIZERS[opt][0] if opt in OPTIMIZERS else opt
    return timm.optim.create_optimizer_v2(model_or_params, opt=name, **kwargs)


__all__ = ["create_optimizer", "register", "SAMSGD", "SAMAdamW", "MSAMSGD", "MSAMAdamW", "OPTIMIZERS"]
