# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse .venv/ and install what they need; no network but the package index.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch installs from the local wheel cache; override for a CUDA machine,
# e.g. `make test TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test env clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,train]"
	touch $@

env: $(VENV)/.ready

test: $(VENV)/.ready
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) tools/check_sizes.py
	PS3_KERNEL_CACHE=off $(PY) -m pytest -q tests

demo: $(VENV)/.ready
	$(PY) -m ps3.demo

clean:
	rm -rf $(VENV) runs
