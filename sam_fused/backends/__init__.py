"""Backend registry: one ``FusedSAM`` API over several implementations of the same three passes."""

from __future__ import annotations

import os

import torch

from .base import Backend
from .reference import TorchBackend

BACKENDS = ("torch", "triton")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def triton_interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _devices(optimizer) -> set[torch.device]:
    return {p.device for g in optimizer.param_groups for p in g["params"]}


def _triton_backend(optimizer) -> Backend:
    try:
        from .triton_backend import TritonBackend
    except ImportError as exc:  # triton missing or broken
        raise BackendUnavailable(f"backend 'triton' cannot load: {exc}") from exc
    devices = _devices(optimizer)
    if len(devices) != 1:
        raise BackendUnavailable(
            f"backend 'triton' needs every parameter on one device, got {sorted(map(str, devices))}"
        )
    (device,) = devices
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise BackendUnavailable(
            f"backend 'triton' runs on CUDA parameters, or on CPU parameters under TRITON_INTERPRET=1; "
            f"parameters are on {device}"
        )
    return TritonBackend(optimizer)


def default_backend(optimizer) -> str:
    """``"triton"`` when every parameter is on one CUDA device and Triton imports, else ``"torch"``."""
    devices = _devices(optimizer)
    if len(devices) == 1 and next(iter(devices)).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def make_backend(name: str | None, optimizer) -> Backend:
    if name is None:
        name = default_backend(optimizer)
    if name == "torch":
        return TorchBackend(optimizer)
    if name == "triton":
        return _triton_backend(optimizer)
    raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)} or None")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run parameters on ``device`` in this process."""
    device = torch.device(device)
    names = ["torch"]
    try:
        import triton  # noqa: F401

        if device.type == "cuda" or triton_interpreting():
            names.append("triton")
    except ImportError:
        pass
    return names
