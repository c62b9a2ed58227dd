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
    SAM_FUSED_BUILD_WAIT seconds to wait for another process's build of the extension (default 600)
    MAX_JOBS             parallel compile jobs (torch's variable)

A build interrupted by Ctrl-C or a killed job leaves torch's lock file in the build directory, and
torch then waits for it forever. Each build here records its process id beside the lock; a lock
whose owner is gone (or, without a record, older than the wait) is removed, and a lock held by a
live process longer than the wait ends in an error that names it, never in a hang.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
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

    from torch.utils.cpp_extension import _get_build_directory

    cuda = want_cuda()
    src = source_dir()
    sources = [str(src / s) for s in SOURCES_CPU + (SOURCES_CUDA if cuda else ())]
    name = "sam_fused_C_cuda" if cuda else "sam_fused_C_cpu"
    verbose = _flag("SAM_FUSED_VERBOSE") in ("1", "true")
    build_dir = Path(_get_build_directory(name, verbose))
    clear_stale_lock(build_dir)
    owner = build_dir / OWNER_FILE
    try:
        owner.write_text(str(os.getpid()))
    except OSError:
        owner = None
    try:
        return jit_load(name=name, sources=sources, verbose=verbose, extra_include_paths=[str(src)],
                        **compile_flags(cuda))
    finally:
        if owner is not None and owner.exists() and owner.read_text().strip() == str(os.getpid()):
            owner.unlink(missing_ok=True)


OWNER_FILE = "sam_fused.owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_lock(build_dir: Path, wait: float | None = None) -> None:
    """Make sure torch's build lock in ``build_dir`` will not hang this process: remove it when its
    owner is gone; wait (at most ``wait`` s, default SAM_FUSED_BUILD_WAIT or 600) while a live
    process builds; then raise NativeUnavailable naming the lock file."""
    lock = build_dir / "lock"
    if wait is None:
        wait = float(os.environ.get("SAM_FUSED_BUILD_WAIT", "600"))
    deadline = time.monotonic() + wait
    while lock.exists():
        owner = build_dir / OWNER_FILE
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            pid = None
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        stale = (pid is not None and not _alive(pid)) or (pid is None and age > wait)
        if stale:
            warnings.warn(f"sam_fused: removing the stale build lock {lock} (its build was interrupted)")
            lock.unlink(missing_ok=True)
            return
        if time.monotonic() >= deadline:
            who = f"process {pid}" if pid is not None else "another process"
            raise NativeUnavailable(
                f"the native extension's build lock {lock} is held by {who} for {age:.0f} s; wait for that "
                f"build to finish, or remove the file if no build is running (SAM_FUSED_BUILD_WAIT={wait:g})"
            )
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))


def available(device: torch.device) -> bool:
    """True when the extension loads and has kernels for ``device``."""
    try:
        module = load()
    except NativeUnavailable:
        return False
    return device.type == "cpu" or (device.type == "cuda" and module.has_cuda())
