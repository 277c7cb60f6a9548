# Orchestra: `make demo` sets up and runs the quickstart; `make test` sets up and runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_USAGE_STATS_REPORT_URL ?= http://127.0.0.1:9/
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export PYTHONUNBUFFERED ?= 1

.PHONY: venv demo test test-fast lint bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 first: the CPU build on disk; an unpinned torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,video]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orchestra run experiments/quickstart.yaml

# Two workers, one test file per worker at a time (files share Ray clusters and namespaces).
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=600 -m "not slow and not multinode" tests

# Every GPU path (learners and replay on CUDA, MixFlow-MG vs reverse memory); says so and exits 0 without CUDA.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlruns .pytest_cache
