# The two commands: `make demo` (main job) and `make test` (tests + docs). Both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fwdtrans demo --threads 2

test: $(STAMP)
	$(PY) -m pytest
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-enable --benchmark-only --benchmark-json bench/results.json

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis .benchmarks
