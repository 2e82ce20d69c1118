# Two commands do all the set-up on a fresh machine: `make test` and `make run`.
# The virtual environment reuses an installed torch (system site packages) when there is one;
# otherwise it installs the CPU build these machines ship, never the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The oldest toolchain we support is the GPU machines' (triton 3.6, whose bundled ptxas differs
# from newer wheels'); the second lane runs the whole suite, AOT spill checks included, against it.
# Its interpreter needs numpy < 2.4 (int() of a 1-element array); GPU runs never use the interpreter.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_SPEC ?= triton==3.6.0 numpy<2.4

.PHONY: install test test-newest test-oldest run clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_CPU_SPEC)"
	$(PY) -m pip install -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

$(OLDEST_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(OLDEST_VENV)
	$(OLDEST_PY) -c "import torch" 2>/dev/null || $(OLDEST_PY) -m pip install "$(TORCH_CPU_SPEC)"
	$(OLDEST_PY) -m pip install -e ".[test,bench]" $(foreach spec,$(OLDEST_SPEC),"$(spec)")
	touch $@

test: test-newest test-oldest

test-newest: install
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_PY) -c "import triton; print('oldest supported toolchain: triton', triton.__version__)"
	$(OLDEST_PY) -m pytest -n 2 -q $(PYTEST_ARGS)

run: install
	$(VENV)/bin/dynconv run

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info

# --- On a lent GPU machine (no network; python, torch and triton are installed there) --------
# Each target fits one 10-minute device call and leaves its log and a tarball of the results under
# $(OUT), the only folder a device call sends back (perf_reports/gpu_session.sh says more).
.PHONY: gpu-test gpu-tune gpu-bench

gpu-test:
	bash perf_reports/gpu_session.sh check

gpu-tune:
	bash perf_reports/gpu_session.sh tune

gpu-bench:
	bash perf_reports/gpu_session.sh bench
