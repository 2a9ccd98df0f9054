# bitlm: every target installs what it needs into .venv from the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==$$(sed -n 's/^pip==//p' constraints.txt)"
	$(PIP) install --quiet -c constraints.txt setuptools wheel
	$(PIP) install --quiet -c constraints.txt --no-build-isolation -e ".[platform,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) pipelines/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --out benchmarks/results

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache benchmarks/results
