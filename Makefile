# The two commands: `make demo` (main job) and `make test` (lint, types, tests, docs). Both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# bench-page's inputs and output: make bench-page BENCH_JSON=bench/results-scaling.json MEMORY_JSON=
BENCH_JSON ?= bench/results.json bench/results-scaling.json
MEMORY_JSON ?= bench/results-memory.json
PAGE ?= docs/performance-results.md

.PHONY: demo test bench bench-scaling bench-memory bench-page gpu-check docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fwdtrans demo --threads 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -n 2 tests fwdtrans --doctest-modules  # the tests and the docstring examples, on 2 workers
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m pytest bench/test_step_time.py --benchmark-enable --benchmark-only --benchmark-json bench/results.json

bench-scaling: $(BENCH_STAMP)
	$(PY) -m pytest bench/test_scaling.py --benchmark-enable --benchmark-only --benchmark-json bench/results-scaling.json

bench-memory: $(BENCH_STAMP)
	$(PY) bench/memory.py --width 16 --batch 128 --blocks 16 --json bench/results-memory.json

bench-page: $(BENCH_STAMP)
	$(PY) bench/make_page.py $(BENCH_JSON) $(foreach f,$(MEMORY_JSON),--memory $(f)) -o $(PAGE)

# on one CUDA GPU, under 10 minutes: tests/test_cuda.py, step time and memory, a CIFAR-10 epoch -> bench/results-gpu.json
gpu-check: $(BENCH_STAMP)
	$(PY) bench/gpu_check.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis .benchmarks
