# bitlm: every target installs what it needs into .venv from the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= --durations=25  # the slowest tests, in every log: CI time is watched
# TORCH=cuda installs torch's CUDA build (constraints-cuda.txt) in place of the CPU one; the venv
# remembers the choice, so later targets keep it until another `make install TORCH=...`.
TORCH ?= $(shell cat $(VENV)/.torch 2>/dev/null || echo cpu)
ifeq ($(TORCH),cpu)
CONSTRAINTS := constraints.txt
else ifeq ($(TORCH),cuda)
CONSTRAINTS := $(VENV)/constraints-cuda.txt
else
$(error TORCH must be cpu or cuda, got '$(TORCH)')
endif
STAMP := $(VENV)/.installed$(if $(filter cuda,$(TORCH)),-cuda)

.PHONY: install system-deps test demo serve fuzz bench lint format clean cluster-up cluster-down

$(STAMP): pyproject.toml constraints.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==$$(sed -n 's/^pip==//p' constraints.txt)"
	$(PIP) install --quiet -c $(CONSTRAINTS) setuptools wheel
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation -e ".[platform,dev]"
	test $(TORCH) = cpu || $(PY) -c 'import sys, torch; sys.exit(None if torch.version.cuda else "TORCH=cuda installed torch " + torch.__version__ + ", a CPU build")'
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	echo $(TORCH) > $(VENV)/.torch
	touch $(STAMP)

# constraints.txt with its torch pin replaced by the CUDA build's pins.
$(VENV)/constraints-cuda.txt: constraints.txt constraints-cuda.txt
	mkdir -p $(VENV)
	sed '/^torch==/d' constraints.txt | cat - constraints-cuda.txt > $@

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
