"""The native extension's build: named by everything the binary and torch's build.ninja depend on,
so two checkouts or two environments never rebuild over each other, and a compile says when it
starts and how long it took. The unit tests replace torch's JIT loader by a recorder; the switch
tests compile for real (a small stand-in for csrc/ in `make test`, csrc/ itself in `make test-full`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_fused import native

ROOT = Path(__file__).resolve().parents[1]
HAS_TOOLS = shutil.which("ninja") is not None and shutil.which("c++") is not None


def _sources(tmp_path: Path, name: str, edit: str = "") -> Path:
    src = tmp_path / name
    shutil.copytree(native.source_dir(), src)
    if edit:
        path = src / "sam_math.h"
        path.write_text(path.read_text() + edit)
    return src


def test_build_name_follows_the_sources_their_folder_the_flags_torch_python_and_compiler(tmp_path, monkeypatch):
    a, b, c = _sources(tmp_path, "a"), _sources(tmp_path, "b"), _sources(tmp_path, "c", "\n// edited\n")
    assert native.build_name(False, a) == native.build_name(False, a)
    # another folder: build.ninja holds the absolute paths, so a shared build would be rebuilt at each switch
    assert native.build_name(False, a) != native.build_name(False, b)
    assert native.build_name(False, a) != native.build_name(False, c)  # another commit's sources: another build
    assert native.build_name(False, a) != native.build_name(True, a)
    assert native.build_name(False, a).startswith("sam_fused_C_cpu_")
    before = native.build_name(False, a)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert native.build_name(False, a) != before  # another torch: another build
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "venv2" / "torch" / "__init__.py"))
    assert native.build_name(False, a) != before  # the same torch in another venv: its include paths differ
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert native.build_name(False, a) != before
    monkeypatch.undo()
    monkeypatch.setattr(native, "compile_flags", lambda cuda: {"extra_cflags": ["-O0"]})
    assert native.build_name(False, a) != before
    monkeypatch.undo()
    assert native.build_name(False, a) == before


@pytest.mark.skipif(shutil.which("ninja") is None, reason="needs ninja")
def test_a_build_says_when_it_starts_and_how_long_it_took(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    built = []
    header = tmp_path / "sam_math.h"
    header.write_text("")

    def fake_load(name, sources, **kw):  # what torch and ninja leave: the library, up to date for ninja
        (tmp_path / "build.ninja").write_text(f"rule touch\n  command = touch $out\nbuild {name}.so: touch {header}\n")
        subprocess.run(["ninja", "-C", str(tmp_path)], check=True, capture_output=True)
        built.append(name)
        return object()

    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(native, "want_cuda", lambda: False)
    monkeypatch.setattr(native.shutil, "which", lambda cmd: "/usr/bin/c++")
    monkeypatch.delenv("SAM_FUSED_NATIVE", raising=False)
    monkeypatch.setitem(sys.modules, "sam_fused._C", None)  # no install-time build
    monkeypatch.setattr(native, "_MODULE", None)
    monkeypatch.setattr(native, "_ERROR", None)
    assert native.build_pending()
    native._load()
    err = capsys.readouterr().err
    assert "building the native kernels (CPU)" in err and "built in" in err
    assert built == [native.build_name(False)]
    assert not native.build_pending()
    native._load()  # built already: loading says nothing
    assert capsys.readouterr().err == ""
    later = header.stat().st_mtime + 10
    os.utime(header, (later, later))  # newer than the library (a checkout touched it): ninja will compile
    assert native.build_pending()
    native._load()
    err = capsys.readouterr().err
    assert "building the native kernels (CPU)" in err and "built in" in err


# A stand-in for csrc/ that compiles in a second: a Python module named as torch's load expects
# (TORCH_EXTENSION_NAME), and the files of csrc/ that the build names and hashes.
TINY = {
    "bindings.cpp": """#include <Python.h>
#include "sam_math.h"
#define SF_CAT(a, b) a##b
#define SF_INIT(name) SF_CAT(PyInit_, name)
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", nullptr, -1, nullptr};
extern "C" PyObject* SF_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&tiny); }
""",
    "sam_cpu.cpp": '#include "sam_math.h"\nint sam_fused_tiny = SF_TINY;\n',
    "sam_math.h": "#define SF_TINY 1\n",
}

LOAD = """
import sys
from pathlib import Path
sys.modules["sam_fused._C"] = None  # no install-time build: the JIT build
from sam_fused import native
native.source_dir = lambda: Path(sys.argv[1])
native.load()
"""


def _load_in_a_process(src: Path, ext: Path, cxx: str, python: str = sys.executable) -> str:
    """A fresh process (another shell, another checkout, another environment's ``python``) loading
    the extension from ``src``; its stderr."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), SAM_FUSED_CUDA="0", CXX=cxx, PYTHONPATH=str(ROOT))
    env.pop("SAM_FUSED_NATIVE", None)
    run = subprocess.run([python, "-c", LOAD, str(src)], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr
    return run.stderr


def _state(ext: Path) -> dict:
    """Per build folder: build.ninja's and the library's modification times, and ninja's log."""
    return {d.name: ((d / "build.ninja").stat().st_mtime_ns, next(d.glob("*.so")).stat().st_mtime_ns,
                     (d / ".ninja_log").read_text())
            for d in sorted(ext.iterdir()) if d.is_dir()}


def _second_environment(root: Path) -> str:
    """A second virtual environment whose torch is the same torch at another path (as two venvs
    with the same torch wheel have it: its include paths, which build.ninja names, differ), the
    rest of this environment's packages reachable through a .pth file; its python."""
    import site
    import sysconfig

    import torch

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "torch").symlink_to(Path(torch.__file__).parent, target_is_directory=True)
    here = [sysconfig.get_paths()["purelib"]] + site.getsitepackages()
    Path(purelib, "outer.pth").write_text("\n".join(dict.fromkeys(here)) + "\n")
    return str(python)


@pytest.mark.skipif(not HAS_TOOLS, reason="needs ninja and a C++ compiler")
@pytest.mark.quick_subset(None, [{"sources": "tiny", "switch": "checkouts"}, {"sources": "tiny", "switch": "environments"}])
@pytest.mark.parametrize("switch", ["checkouts", "compilers", "environments"])
@pytest.mark.parametrize("sources", ["tiny", "csrc"])
def test_switching_back_and_forth_builds_each_once(tmp_path, sources, switch):
    """A, B, A, B with one TORCH_EXTENSIONS_DIR: two checkouts (the same sources at two paths),
    one checkout built by two compilers (CXX), or by two virtual environments (their torch at two
    paths): each builds once, saying so, then loads without a compile (build.ninja, the library
    and ninja's log untouched). With one build folder for both, each switch recompiled everything,
    silently."""
    if sources == "csrc" and switch != "checkouts":
        pytest.skip("the compiler and environment switches are covered by the small sources")
    if switch == "compilers" and shutil.which("g++") is None:
        pytest.skip("needs g++ beside c++")
    ext = tmp_path / "ext"
    trees = []
    for name in ("a", "b"):
        src = tmp_path / name / "csrc"
        if sources == "csrc":
            shutil.copytree(ROOT / "csrc", src)
        else:
            src.mkdir(parents=True)
            for file, text in TINY.items():
                (src / file).write_text(text)
        trees.append(src)
    if switch == "compilers":
        runs = [(trees[0], "c++", sys.executable), (trees[0], "g++", sys.executable)] * 2
    elif switch == "environments":
        runs = [(trees[0], "c++", sys.executable), (trees[0], "c++", _second_environment(tmp_path / "venv"))] * 2
    else:
        runs = [(trees[0], "c++", sys.executable), (trees[1], "c++", sys.executable)] * 2
    first = [_load_in_a_process(src, ext, cxx, py) for src, cxx, py in runs[:2]]
    for err in first:
        assert "building the native kernels (CPU)" in err and "built in" in err, err
    built = _state(ext)
    assert len(built) == 2, built
    again = [_load_in_a_process(src, ext, cxx, py) for src, cxx, py in runs[2:]]
    for err in again:
        assert "native kernels" not in err, err  # neither a compile announced nor one found afterwards
    assert _state(ext) == built


def test_a_compile_the_dry_run_missed_is_still_said(tmp_path, monkeypatch, capsys):
    """Should ninja compile where its dry run found nothing to do, the compile is reported after it."""
    import torch.utils.cpp_extension as ext

    def fake_load(name, sources, **kw):
        (tmp_path / f"{name}.so").write_text(str(len(kw)))  # a new library
        return object()

    (tmp_path / f"{native.build_name(False)}.so").write_text("")
    os.utime(tmp_path / f"{native.build_name(False)}.so", (0, 0))
    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(native, "want_cuda", lambda: False)
    monkeypatch.setattr(native, "will_compile", lambda build_dir, name: False)
    monkeypatch.setattr(native.shutil, "which", lambda cmd: "/usr/bin/c++")
    monkeypatch.delenv("SAM_FUSED_NATIVE", raising=False)
    monkeypatch.setitem(sys.modules, "sam_fused._C", None)
    native._load()
    assert "native kernels (CPU) rebuilt in" in capsys.readouterr().err
