# Two commands do all the set-up on a fresh machine: `make test` and `make run`.
# The virtual environment reuses an installed torch (system site packages) when there is one;
# otherwise it installs the CPU build these machines ship, never the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test run clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_CPU_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

run: install
	$(VENV)/bin/dynconv run

clean:
	rm -rf $(VENV) build *.egg-info

# --- On a lent GPU machine (no network; python, torch and triton are installed there) --------
# Each target fits one 10-minute device call. Results land in the tree (perf_reports/<gpu>/,
# autotune_configs/) for committing.
.PHONY: gpu-install gpu-test gpu-tune gpu-bench

gpu-install:
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .

gpu-test: gpu-install
	DYNCONV_TEST_DEVICE=cuda $(PYTHON) -m pytest -q --ignore=tests/test_aot.py $(PYTEST_ARGS)  # AOT checks need no GPU

gpu-tune: gpu-install
	$(PYTHON) -m dynconv.cli autotune --quick --output autotune_configs

gpu-bench: gpu-install
	$(PYTHON) -m dynconv.cli bench
