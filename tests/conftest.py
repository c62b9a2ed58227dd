"""Test setup: without CUDA, Triton kernels run on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any kernel is defined, so this runs before sam_fused's
kernel modules are imported. On a GPU machine the interpreter stays off and the same tests run
the compiled kernels on CUDA tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _interpret_nested_calls_once() -> None:
    """Triton's interpreter re-patches ``triton.language`` on every call of a ``@triton.jit``
    helper from inside a kernel (``walk``, ``load``, ``store``, ...): an ``inspect.getmembers``
    over the language modules, ~1.5 ms a call, 65% of an interpreted SAM step (measured with
    cProfile, triton 3.9). The kernel launch has already patched the same modules, so the nested
    call runs the helper as is; the kernels and their semantics are untouched. Applied only where
    the interpreter has the shape this relies on, else the interpreter stays as it is."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = getattr(interpreter, "InterpretedFunction", None)
    error = getattr(interpreter, "InterpreterError", None)
    if cls is None or error is None or not hasattr(cls, "rewrite") or getattr(cls, "_sam_fused_fast", False):
        return
    is_builtin = tl.core.is_builtin
    original = cls.__call__
    langs_of: dict = {}

    def call(self, *args, **kwargs):
        langs = langs_of.get(self.fn)
        if langs is None:  # the language modules the helper sees, as _patch_lang finds them
            langs = langs_of[self.fn] = [v for v in self.fn.__globals__.values() if v is tl or v is tl.core]
        if not langs or any(is_builtin(m.load) for m in langs):  # one not patched yet: the full call
            return original(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise error(repr(e)) from e

    cls.__call__ = call
    cls._sam_fused_fast = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_nested_calls_once()


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run every combination of the interpreted Triton matrices (make test-full); "
                          "the default runs the subset named by each test's quick_subset marker")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line(
        "markers",
        "quick_subset(backend, combos): for that backend (None: any), `make test` runs only the "
        "parametrizations matching one of the combos (dicts of parameter values); `make test-full` runs them all")


def full_matrix(config) -> bool:
    """Every combination: asked for (--full, SAM_FUSED_TEST_FULL=1), or on a GPU, where the Triton
    kernels run compiled and the whole matrix takes seconds."""
    return bool(config.getoption("--full")) or os.environ.get("SAM_FUSED_TEST_FULL") == "1" or HAS_CUDA


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_full = pytest.mark.skip(reason="full matrix only (make test-full)")
    full = full_matrix(config)
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:  # not keywords: a folder named gpu is one
            item.add_marker(skip_gpu)
        subset = item.get_closest_marker("quick_subset")
        if subset is None or full or not hasattr(item, "callspec"):
            continue
        backend, combos = subset.args
        params = item.callspec.params
        if backend is not None and params.get("backend") != backend:  # None: whatever the backend
            continue
        if not any(all(params.get(k) == v for k, v in combo.items()) for combo in combos):
            item.add_marker(skip_full)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how much of the matrix ran, so that a quick run is never mistaken for the full one."""
    skipped = terminalreporter.stats.get("skipped", [])
    n = sum(1 for r in skipped if "full matrix only" in str(r.longrepr))
    if n:
        terminalreporter.write_line(f"{n} combinations (interpreted Triton matrices, the larger compare tasks) left to "
                                    "`make test-full`")


@pytest.fixture
def device():
    """The device fast paths are tested on: CUDA when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
