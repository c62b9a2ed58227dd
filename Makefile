# The two commands of the README: `make bench` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	@# torch first: 2.13.0 satisfies the package's range, so the editable install adds nothing to it
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: bench test
bench: $(VENV)/.installed
	$(BIN)/sam-fused bench $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)
