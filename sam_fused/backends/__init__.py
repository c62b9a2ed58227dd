"""The one backend registry: which implementations each algorithm has, and where each can run.

``make_backend(name, optimizer, algorithm)`` builds them all: ``algorithm="sam"`` (FusedSAM:
torch, triton, cpu, cuda) and ``algorithm="universal"`` (Frob/Trace/Det-SAM: torch, triton).
``name=None`` picks the best one available for the parameters' device.
"""

from __future__ import annotations

import os
import warnings

import torch

from .base import Backend
from .reference import TorchBackend

BACKENDS = ("torch", "triton", "cpu", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def triton_interpreting() -> bool:
    """True when Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _devices(optimizer) -> set[torch.device]:
    return {p.device for g in optimizer.param_groups for p in g["params"]}


def _triton_backend(optimizer, algorithm: str = "sam") -> Backend:
    try:
        if algorithm == "universal":
            from .universal_triton import UniversalTritonBackend as cls
        else:
            from .triton_backend import TritonBackend as cls
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
    return cls(optimizer)


def _native_backend(optimizer, name: str) -> Backend:
    from ..native import NativeUnavailable, load

    devices = _devices(optimizer)
    if len(devices) != 1 or next(iter(devices)).type != name:
        raise BackendUnavailable(
            f"backend {name!r} needs every parameter on one {name} device, got {sorted(map(str, devices))}"
        )
    try:
        module = load()
    except NativeUnavailable as exc:
        raise BackendUnavailable(f"backend {name!r} cannot load the native extension: {exc}") from exc
    if name == "cuda" and not module.has_cuda():
        raise BackendUnavailable(
            "backend 'cuda': the native extension was built without CUDA kernels (CPU-only torch, no GPU, "
            "no nvcc, or SAM_FUSED_CUDA=0)"
        )
    from .native_backend import NativeBackend

    return NativeBackend(optimizer, module, name)


_warned_fallback = False


def default_backend(optimizer) -> str:
    """Every parameter on one CUDA device: ``"triton"`` when Triton imports, else ``"cuda"`` when the
    native extension has CUDA kernels. On the CPU: ``"cpu"`` when the native extension builds.
    Otherwise ``"torch"``."""
    global _warned_fallback
    from ..native import NativeUnavailable, load

    devices = _devices(optimizer)
    if len(devices) != 1:
        return "torch"
    device = next(iter(devices))
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            pass
    if device.type in ("cpu", "cuda"):
        try:
            module = load()
            if device.type == "cpu" or module.has_cuda():
                return device.type
        except NativeUnavailable as exc:
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(f"sam_fused: native kernels unavailable ({exc}); using the torch reference backend")
    return "torch"


ALGORITHMS = {"sam": BACKENDS, "universal": ("torch", "triton")}


def make_backend(name: str | None, optimizer, algorithm: str = "sam") -> Backend:
    """The backend ``name`` of ``algorithm`` for ``optimizer``'s parameters (None: the default)."""
    names = ALGORITHMS[algorithm]
    if name is None:
        name = default_backend(optimizer)
        if name not in names:
            name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(names)} or None")
    if name not in names:
        raise BackendUnavailable(
            f"backend {name!r}: the {algorithm} algorithms run on the {' and '.join(repr(n) for n in names)} "
            "backends only"
        )
    if name == "torch":
        if algorithm == "universal":
            from .universal_reference import UniversalTorchBackend

            return UniversalTorchBackend(optimizer)
        return TorchBackend(optimizer)
    if name == "triton":
        return _triton_backend(optimizer, algorithm)
    return _native_backend(optimizer, name)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run parameters on ``device`` in this process."""
    from ..native import available

    device = torch.device(device)
    names = ["torch"]
    try:
        import triton  # noqa: F401

        if device.type == "cuda" or triton_interpreting():
            names.append("triton")
    except ImportError:
        pass
    if device.type in ("cpu", "cuda") and available(device):
        names.append(device.type)
    return names
