# bitlm: every target installs what it needs into .venv from the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install system-deps test demo serve fuzz bench lint format clean cluster-up cluster-down

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==$$(sed -n 's/^pip==//p' constraints.txt)"
	$(PIP) install --quiet -c constraints.txt setuptools wheel
	$(PIP) install --quiet -c constraints.txt --no-build-isolation -e ".[platform,dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser test (the playground page); installed when missing.
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium (the playground test drives it)"; exit 1; fi; }

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) pipelines/demo.py

serve: $(STAMP)
	$(PY) serve/run.py

# Fuzz the HTTP API from its OpenAPI schema (bounded: a fixed number of examples per route).
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py --out benchmarks/results/fuzz.json

# A real 2-node Ray cluster on this machine (two network namespaces; needs root): see cluster/.
cluster-up: $(STAMP)
	bash cluster/local/up.sh

cluster-down:
	bash cluster/local/down.sh

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
