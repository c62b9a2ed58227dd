"""Loading the native extension ``sam_fused._C`` (kernels in ``csrc/``).

Order: a copy built at install time (``SAM_FUSED_BUILD_EXT=1 pip install --no-build-isolation .``),
else a just-in-time build with ninja through ``torch.utils.cpp_extension.load``, cached under
``$TORCH_EXTENSIONS_DIR`` (torch's default: ``~/.cache/torch_extensions``) and reused afterwards.
The CPU kernels build with the system C++ compiler; the CUDA kernels are added only where torch
is a CUDA build, a GPU is visible and nvcc is found.

Environment:
    SAM_FUSED_NATIVE=0   never build or load the extension (backends "cpu" and "cuda" unavailable)
    SAM_FUSED_CUDA=0     build the CPU kernels only;  SAM_FUSED_CUDA=1  require the CUDA kernels
    SAM_FUSED_VERBOSE=1  show the compiler's output
    MAX_JOBS             parallel compile jobs (torch's variable)
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

_LOCK = threading.Lock()
_MODULE = None
_ERROR: str | None = None
SOURCES_CPU = ("bindings.cpp", "sam_cpu.cpp")
SOURCES_CUDA = ("sam_cuda.cu",)


class NativeUnavailable(RuntimeError):
    pass


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower()


def source_dir() -> Path:
    """``csrc/``: shipped inside the package by a wheel build, or beside it in a checkout."""
    for candidate in (Path(__file__).parent / "_csrc", Path(__file__).resolve().parents[1] / "csrc"):
        if (candidate / SOURCES_CPU[0]).exists():
            return candidate
    raise NativeUnavailable("the C++ sources (csrc/) are not installed with this copy of sam_fused")


def want_cuda() -> bool:
    """Whether the CUDA kernels are built: a CUDA build of torch, a GPU and nvcc, unless overridden."""
    setting = _flag("SAM_FUSED_CUDA")
    if setting in ("0", "false", "no", "off"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if setting in ("1", "true", "yes", "on"):
        if not possible:
            raise NativeUnavailable("SAM_FUSED_CUDA=1, but torch is not a CUDA build or nvcc (CUDA_HOME) was not found")
        return True
    return possible and torch.cuda.is_available()


def compile_flags(cuda: bool) -> dict:
    # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas; without
    # the flag the CPU kernels silently run on one thread.
    cflags = ["-O3", "-fopenmp"]
    if os.uname().machine in ("x86_64", "amd64"):
        cflags.append("-march=native")  # a JIT build runs where it was compiled
    flags = dict(extra_cflags=cflags + (["-DSAM_FUSED_WITH_CUDA"] if cuda else []), extra_ldflags=["-fopenmp"])
    if cuda:
        flags["extra_cuda_cflags"] = ["-O3", "-DSAM_FUSED_WITH_CUDA", "--use_fast_math"]
    return flags


def load():
    """The extension module; builds it on first use. Raises NativeUnavailable with the cause."""
    global _MODULE, _ERROR
    if _MODULE is not None:
        return _MODULE
    if _ERROR is not None:
        raise NativeUnavailable(_ERROR)
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        try:
            _MODULE = _load()
        except NativeUnavailable as exc:
            _ERROR = str(exc)
            raise
        except Exception as exc:  # the compiler's error, whatever torch wraps it in
            _ERROR = f"building the native extension failed: {exc}"
            raise NativeUnavailable(_ERROR) from exc
    return _MODULE


def _load():
    if _flag("SAM_FUSED_NATIVE") in ("0", "false", "no", "off"):
        raise NativeUnavailable("disabled by SAM_FUSED_NATIVE=0")
    try:
        from . import _C  # built at install time

        return _C
    except ImportError:
        pass
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    from torch.utils.cpp_extension import load as jit_load

    cuda = want_cuda()
    src = source_dir()
    sources = [str(src / s) for s in SOURCES_CPU + (SOURCES_CUDA if cuda else ())]
    name = "sam_fused_C_cuda" if cuda else "sam_fused_C_cpu"
    return jit_load(name=name, sources=sources, verbose=_flag("SAM_FUSED_VERBOSE") in ("1", "true"),
                    extra_include_paths=[str(src)], **compile_flags(cuda))


def available(device: torch.device) -> bool:
    """True when the extension loads and has kernels for ``device``."""
    try:
        module = load()
    except NativeUnavailable:
        return False
    return device.type == "cpu" or (device.type == "cuda" and module.has_cuda())
