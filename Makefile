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
