# A newcomer's commands (each creates .venv on first use; `make help` lists them):
#   make serve [CHECKPOINT=demo] [PORT=8023] [DEVICE=auto] [HOST=127.0.0.1]   what serving needs only
#   make test           the whole suite (the command CI runs), on two pytest workers: 4 minutes on 2 quiet cores
#   make test-quick     without the tests marked slow: 1 minute on 2 quiet cores
#   make install [TORCH=cpu] [NAPARI=0]   the full environment: test tools, Ray, napari (NAPARI=0: without napari)
# PyTorch comes from PyPI unless TORCH names one of PyTorch's own package indexes: TORCH=cpu
# (the CPU-only build, ~10x smaller on Linux) or a CUDA one such as TORCH=cu128. Tests and CI
# never set TORCH, so they only ever contact PyPI.
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= demo
PORT ?= 8023
DEVICE ?= auto
HOST ?= 127.0.0.1
TORCH_VERSION ?= 2.13.0
TORCH ?=
TORCH_INDEX_URL := https://download.pytorch.org/whl/$(TORCH)
TORCH_INDEX := $(if $(TORCH),--index-url $(TORCH_INDEX_URL))
PYTEST_ARGS ?=
# pytest-xdist workers for make test and test-quick: each test file runs whole on one worker
# (its module fixtures made once); WORKERS=0 runs them all in one process
WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(WORKERS) --dist loadfile
# napari, pytest-qt and ./napari-cryolens for tests/napari/ (~900 MB, ~2 minutes)
NAPARI ?= 1
NAPARI_REQS := 'napari[pyqt6]>=0.9,<0.10' pytest-qt -e ./client -e ./napari-cryolens

.PHONY: help install serve test test-quick bench lint

help:
	@sed -n 's/^#   //p' Makefile

# Two stamps: .serve (PyTorch and the package alone: what `make serve` needs) and .installed
# (.serve plus the test tools, Ray and napari). `make serve` then `make test` adds to the same
# environment; a full environment also serves, so serve waits on .installed when it exists.
SERVE_STAMP := $(if $(wildcard $(VENV)/.installed),$(VENV)/.installed,$(VENV)/.serve)

$(VENV)/.serve: pyproject.toml client/pyproject.toml
	@echo "==> creating $(VENV) (first use only; pip shows its progress below)"
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "==> installing PyTorch $(TORCH_VERSION)$(if $(TORCH), from $(TORCH_INDEX_URL)) (the largest download: minutes on a slow link)"
	$(PY) -m pip install --progress-bar on "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	@echo "==> installing cryolens-client and cryolens-server (what serving needs; make test adds the test tools)"
	$(PY) -m pip install --progress-bar on -e ./client -e .
	touch $@

$(VENV)/.installed: $(VENV)/.serve pyproject.toml napari-cryolens/pyproject.toml
	@echo "==> adding the test tools and Ray to $(VENV)"
	$(PY) -m pip install --progress-bar on -e ./client -e '.[dev,ray]'
	@echo "==> $(if $(filter 0,$(NAPARI)),skipping napari (NAPARI=0),installing napari and the napari-cryolens plugin)"
	$(if $(filter 0,$(NAPARI)),,$(PY) -m pip install --progress-bar on $(NAPARI_REQS))
	touch $@

install: $(VENV)/.installed

serve: $(SERVE_STAMP)
	$(PY) -m cryolens.server.minimal_cryolens_server --checkpoint "$(CHECKPOINT)" --port $(PORT) --device $(DEVICE) --host $(HOST)

test: $(VENV)/.installed
	$(PYTEST) $(PYTEST_ARGS)

test-quick: $(VENV)/.installed
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/engine.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src client tests bench scripts napari-cryolens
