# The two commands of the README: `make bench` and `make test`. Both set up .venv on first use, as
# does `make docs` (the documentation site, into site/).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	@# torch first: 2.13.0 satisfies the package's range, so the editable install adds nothing to it
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: bench test test-full docs
bench: $(VENV)/.installed
	$(BIN)/sam-fused bench $(ARGS)

# The suite with each interpreted Triton matrix cut to a covering subset (tests' quick_subset
# markers); every other test runs whole. The slowest tests are listed at the end (pytest.ini).
test: $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)

# Every combination of the Triton matrices too (on a GPU, where they run compiled, `make test`
# already does this).
test-full: $(VENV)/.installed
	$(BIN)/python -m pytest --full $(ARGS)

# The documentation site (mkdocs.yml, docs/), built offline into site/; any warning fails it.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Static GPU checks without a GPU: every Triton kernel's pass representative compiled for sm_80,
# sm_89, sm_90 and sm_100 under the default launch configuration and each sweep candidate; prints
# registers, spills, access width and predicted occupancy (tests/gpu_compile_check.py), then the
# CUDA C++ kernels' ptxas report where nvcc is installed.
.PHONY: gpu-static
gpu-static: $(VENV)/.installed
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=$(CURDIR) $(BIN)/python tests/gpu_compile_check.py --table --json gpu-static.json
	@if command -v nvcc >/dev/null; then PYTHON=$(BIN)/python bash benchmarks/cuda_static.sh; else echo "nvcc not found: CUDA C++ static check skipped"; fi
