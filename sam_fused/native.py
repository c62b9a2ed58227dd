"""Loading the native extension ``sam_fused._C`` (kernels in ``csrc/``).

Order: a copy built at install time (``SAM_FUSED_BUILD_EXT=1 pip install --no-build-isolation .``),
else a just-in-time build with ninja through ``torch.utils.cpp_extension.load``, cached under
``$TORCH_EXTENSIONS_DIR`` (torch's default: ``~/.cache/torch_extensions``) and reused afterwards.
The build's name carries a key of everything the binary and torch's build.ninja depend on (the
C++ sources and headers, their absolute folder, the compile flags, the torch install (version and
path), Python's version, ABI and include folder, the compiler), so two checkouts or two virtual
environments build side by side, each once, instead of rebuilding over each other at every switch
(build.ninja holds absolute paths: one folder shared by two checkouts was rebuilt by ninja each time
the other one had built last). A compile says on stderr when it starts and how long it took; a
build folder whose library ninja finds out of date (``ninja -n``) counts as one.
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
import subprocess
import sys
import sysconfig
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


def _jit_arguments(cuda: bool, src: Path) -> dict:
    """The arguments of ``torch.utils.cpp_extension.load`` but the name: the absolute paths of the
    sources and the include folder, as torch writes them into build.ninja, and the flags."""
    sources = [os.path.abspath(src / s) for s in SOURCES_CPU + (SOURCES_CUDA if cuda else ())]
    return dict(sources=sources, extra_include_paths=[os.path.abspath(src)], **compile_flags(cuda))


def _build_inputs(cuda: bool, src: Path) -> dict:
    """Everything the build's build.ninja and binary depend on, besides the sources' contents:
    torch puts the source and include paths, the torch install's include and library folders,
    Python's include folder and the compiler into build.ninja, so a build shared by two checkouts
    or two environments that differ in any of them would be rebuilt by ninja on every switch."""
    inputs = dict(
        jit=_jit_arguments(cuda, src),
        torch=(torch.__version__, torch.version.cuda, os.path.dirname(os.path.abspath(torch.__file__))),
        python=(sys.version_info[:2], sys.implementation.cache_tag, sysconfig.get_config_var("SOABI"),
                sysconfig.get_paths()["include"]),
        cxx=os.environ.get("CXX", "c++"),
    )
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch is None:  # torch then compiles for the GPUs it sees
            arch = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        inputs["cuda"] = (CUDA_HOME, arch, os.environ.get("CC"))
    return inputs


def build_name(cuda: bool, src: Path | None = None) -> str:
    """``sam_fused_C_{cpu,cuda}_<key>``: the key is a hash of the sources and headers in ``src``
    and of everything build.ninja holds (``_build_inputs``: the absolute source folder, the compile
    flags, the torch install's version, CUDA version and path, Python's version, ABI and include
    folder, the compiler), so a build folder is only ever reused by a build that ninja finds up
    to date."""
    src = source_dir() if src is None else src
    h = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(repr(sorted(_build_inputs(cuda, src).items())).encode())
    return f"sam_fused_C_{'cuda' if cuda else 'cpu'}_{h.hexdigest()[:12]}"


def _library(build_dir: Path, name: str) -> Path | None:
    for suffix in (".so", ".pyd"):
        if (build_dir / f"{name}{suffix}").exists():
            return build_dir / f"{name}{suffix}"
    return None


def _built(build_dir: Path, name: str) -> bool:
    return _library(build_dir, name) is not None


def will_compile(build_dir: Path, name: str) -> bool:
    """Whether loading the build ``name`` from ``build_dir`` compiles: no library yet, no
    build.ninja beside it, or ninja has work to do there (a source or header newer than its
    object, a changed command line: asked with a dry run, ``ninja -n``)."""
    if not _built(build_dir, name) or not (build_dir / "build.ninja").exists():
        return True
    try:
        dry = subprocess.run(["ninja", "-n", "-C", str(build_dir)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):  # no ninja: torch's load will say so
        return True
    return dry.returncode != 0 or "no work to do" not in dry.stdout


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
    clear_stale_lock(build_dir)
    owner = build_dir / OWNER_FILE
    try:
        owner.write_text(str(os.getpid()))
    except OSError:
        owner = None
    library = _library(build_dir, name)
    before = library.stat().st_mtime_ns if library is not None else None
    announced = will_compile(build_dir, name)
    what = "CPU and CUDA" if cuda else "CPU"
    if announced:
        print(f"sam_fused: building the native kernels ({what}) in {build_dir}, "
              "once for these sources, torch and Python: 1-4 minutes", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        module = jit_load(name=name, verbose=verbose, **_jit_arguments(cuda, src))
        library = _library(build_dir, name)
        after = library.stat().st_mtime_ns if library is not None else None
        if announced:
            print(f"sam_fused: native kernels built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        elif after != before:  # ninja found work that the dry run did not foresee
            print(f"sam_fused: native kernels ({what}) rebuilt in {build_dir} in {time.monotonic() - start:.0f} s",
                  file=sys.stderr, flush=True)
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
        return will_compile(build_dir, name)
    except Exception:  # no sources, no compiler settings: nothing will be built
        return False


def available(device: torch.device) -> bool:
    """True when the extension loads and has kernels for ``device``."""
    try:
        module = load()
    except NativeUnavailable:
        return False
    return device.type == "cpu" or (device.type == "cuda" and module.has_cuda())
