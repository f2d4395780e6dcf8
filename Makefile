# Two commands for a newcomer: `make serve` (the server on the embedded demo model) and
# `make test` (the whole suite). Both create .venv on first use with the CPU build of PyTorch.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8023
TORCH ?= torch==2.13.0

.PHONY: serve test bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(PY) -m cryolens.server.minimal_cryolens_server --checkpoint demo --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/engine.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench scripts
