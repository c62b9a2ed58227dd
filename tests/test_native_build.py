"""The native extension's build: named by everything the binary depends on, so two checkouts or
two environments never rebuild over each other, and a build says when it starts and how long it
took. No compiler runs here: torch's JIT loader is replaced by a recorder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sam_fused import native


def _sources(tmp_path: Path, name: str, edit: str = "") -> Path:
    src = tmp_path / name
    shutil.copytree(native.source_dir(), src)
    if edit:
        path = src / "sam_math.h"
        path.write_text(path.read_text() + edit)
    return src


def test_build_name_follows_the_sources_the_flags_torch_and_python(tmp_path, monkeypatch):
    a, b, c = _sources(tmp_path, "a"), _sources(tmp_path, "b"), _sources(tmp_path, "c", "\n// edited\n")
    assert native.build_name(False, a) == native.build_name(False, b)  # two checkouts of one commit share a build
    assert native.build_name(False, a) != native.build_name(False, c)  # another commit's sources: another build
    assert native.build_name(False, a) != native.build_name(True, a)
    assert native.build_name(False, a).startswith("sam_fused_C_cpu_")
    before = native.build_name(False, a)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert native.build_name(False, a) != before  # another torch (another venv): another build
    monkeypatch.setattr(native, "compile_flags", lambda cuda: {"extra_cflags": ["-O0"]})
    assert native.build_name(False, a) != before


def test_a_build_says_when_it_starts_and_how_long_it_took(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    built = []

    def fake_load(name, sources, **kw):
        (tmp_path / f"{name}.so").write_text("")
        built.append(name)
        return object()

    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(native, "want_cuda", lambda: False)
    monkeypatch.setattr(native.shutil, "which", lambda cmd: "/usr/bin/c++")
    monkeypatch.delenv("SAM_FUSED_NATIVE", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "sam_fused._C", None)  # no install-time build
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
