"""Loading the native extension ``sam_fused._C`` (kernels in ``csrc/``).

Order: a copy built at install time (``SAM_FUSED_BUILD_EXT=1 pip install --no-build-isolation .``),
else a just-in-time build with ninja through ``torch.utils.cpp_extension.load``, cached under
``$TORCH_EXTENSIONS_DIR`` (torch's default: ``~/.cache/torch_extensions``) and reused afterwards.
The build's name carries a key of everything the binary depends on (the C++ sources and headers,
the compile flags, the torch build and the Python version), so two checkouts or two virtual
environments that differ in any of them build side by side instead of rebuilding over each other,
and those that agree share one build. A build says on stderr when it starts and how long it took.
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

import hashlib
import os
import shutil
import sys
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
    # the flag the CPU kernels silently run on one thread. -fno-math-errno: std::sqrt may set errno,
    # so without it gcc keeps Adam's update loop scalar (a sqrt call per element): 3-7x slower,
    # measured (benchmarks/NOTES.md). sqrt is correctly rounded either way: the results are the same.
    cflags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.uname().machine in ("x86_64", "amd64"):
        cflags.append("-march=native")  # a JIT build runs where it was compiled
    flags = dict(extra_cflags=cflags + (["-DSAM_FUSED_WITH_CUDA"] if cuda else []), extra_ldflags=["-fopenmp"])
    if cuda:
        flags["extra_cuda_cflags"] = ["-O3", "-DSAM_FUSED_WITH_CUDA", "--use_fast_math"]
    return flags


def build_name(cuda: bool, src: Path | None = None) -> str:
    """``sam_fused_C_{cpu,cuda}_<key>``: the key is a hash of the sources and headers in ``src``, the
    compile flags, torch's version and CUDA version, and the Python version and ABI tag."""
    src = source_dir() if src is None else src
    h = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(repr(sorted(compile_flags(cuda).items())).encode())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{sys.implementation.cache_tag}".encode())
    return f"sam_fused_C_{'cuda' if cuda else 'cpu'}_{h.hexdigest()[:12]}"


def _built(build_dir: Path, name: str) -> bool:
    return any(build_dir.glob(f"{name}*.so")) or any(build_dir.glob(f"{name}*.pyd"))


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


def _disabled() -> bool:
    return _flag("SAM_FUSED_NATIVE") in ("0", "false", "no", "off")


def _installed():
    """``sam_fused._C`` when it was built at install time, else None."""
    try:
        from . import _C

        return _C
    except ImportError:
        return None


def _jit_target(verbose: bool = False) -> tuple[bool, Path, str, Path]:
    """(with CUDA, source folder, build name, build folder) of the just-in-time build."""
    from torch.utils.cpp_extension import _get_build_directory

    cuda = want_cuda()
    src = source_dir()
    name = build_name(cuda, src)
    return cuda, src, name, Path(_get_build_directory(name, verbose))


def _load():
    if _disabled():
        raise NativeUnavailable("disabled by SAM_FUSED_NATIVE=0")
    installed = _installed()
    if installed is not None:
        return installed
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    from torch.utils.cpp_extension import load as jit_load

    verbose = _flag("SAM_FUSED_VERBOSE") in ("1", "true")
    cuda, src, name, build_dir = _jit_target(verbose)
    sources = [str(src / s) for s in SOURCES_CPU + (SOURCES_CUDA if cuda else ())]
    clear_stale_lock(build_dir)
    owner = build_dir / OWNER_FILE
    try:
        owner.write_text(str(os.getpid()))
    except OSError:
        owner = None
    fresh = not _built(build_dir, name)
    if fresh:
        print(f"sam_fused: building the native kernels ({'CPU and CUDA' if cuda else 'CPU'}) in {build_dir}, "
              "once for these sources, torch and Python: 1-4 minutes", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        module = jit_load(name=name, sources=sources, verbose=verbose, extra_include_paths=[str(src)],
                          **compile_flags(cuda))
        if fresh:
            print(f"sam_fused: native kernels built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return module
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


def build_pending() -> bool:
    """Whether the first use of the native backends will build them now (for an ETA)."""
    if _MODULE is not None or _ERROR is not None or _disabled() or _installed() is not None:
        return False
    try:
        _, _, name, build_dir = _jit_target()
        return not _built(build_dir, name)
    except Exception:  # no sources, no compiler settings: nothing will be built
        return False


def available(device: torch.device) -> bool:
    """True when the extension loads and has kernels for ``device``."""
    try:
        module = load()
    except NativeUnavailable:
        return False
    return device.type == "cpu" or (device.type == "cuda" and module.has_cuda())
