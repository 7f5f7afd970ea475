# The targets README and CI call. Quick start on a fresh machine: `make book`, then `make test`.
#
#   make book [PROFILE=default]        install, run every chapter, build the HTML book (_build/html/index.html)
#   make chapter CHAPTER=01_world      run one chapter (PROFILE=... as above; FORCE=1 re-executes unchanged ones)
#   make check [PROFILE=default]       every figure and table the chapters declare exists for PROFILE, and no
#                                      executed page shows a machine path, warning, error or progress bar
#   make adapt [PROFILE=default]       adapt the SAEs and compute their per-feature statistics on the profile's
#                                      [distributed] processes (torchrun when more than one), before `make book`
#   make organism [PROFILE=default]    train the organism on this CPU and export it to artifacts/ (+ provenance)
#   make organism-verify               retrain from scratch and check it equals artifacts/ bit for bit
#   make test                          unit tests and chapter smoke runs (no built book needed)
#   make rendered                      load every page of the built book in headless Chromium
#   make lint | format                 ruff
#   make chromium                      install Debian's chromium (for `make rendered`)
#   make clean                         remove build products (not the artifact cache; `make clean-cache` does)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYSTEM ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
CHAPTER ?=
PYTEST_ARGS ?=
# e.g. RUNNER_ARGS=--verbose: echo what the cells print while they run
RUNNER_ARGS ?=
# FORCE=1: execute every chapter even if its inputs are unchanged since its last run (artifacts are still reused)
FORCE ?=
ifeq ($(FORCE),1)
RUNNER_ARGS += --force
endif

# Kernels, tests and the book build run offline whatever the calling shell has set (lib/io/runner.py sets the same
# for the chapter kernels). PIP_NO_INDEX is not set here: `make install` needs the package index.
OFFLINE := HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPLBACKEND=Agg

# The stamp depends on requirements.txt: editing it re-runs the install, a second `make install` does nothing.
STAMP := $(VENV)/.installed

.PHONY: help venv install book html chapter check adapt organism organism-verify test rendered lint format chromium \
	clean clean-cache

help:
	@awk '!/^#/ {exit} {sub(/^# ?/, ""); print}' Makefile

venv: $(STAMP)
install: $(STAMP)

# torch alone and first: `torch==2.13.0` resolves to the CPU build, and nothing installed later can bring the CUDA
# build (with several GB of nvidia-* packages) in through another package's looser requirement.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install -r requirements.txt
	@touch $@

book: $(STAMP)
	$(OFFLINE) $(PY) -m lib.io.runner --profile $(PROFILE) $(RUNNER_ARGS)
	$(MAKE) --no-print-directory html
	@echo "book: $(CURDIR)/_build/html/index.html"

# Render what the runner executed; every Sphinx warning fails the build (-W), all of them reported (--keep-going).
html: $(STAMP)
	$(OFFLINE) $(VENV)/bin/jupyter-book build --all --warningiserror --keep-going .

chapter: $(STAMP)
	@test -n "$(CHAPTER)" || { echo "usage: make chapter CHAPTER=01_world [PROFILE=$(PROFILE)]"; exit 2; }
	$(OFFLINE) $(PY) -m lib.io.runner --profile $(PROFILE) --chapter $(CHAPTER) $(RUNNER_ARGS)

# The steps that share the SAEs out over processes (lib/steps/distributed.py), run from a process that loads no
# model: on GPUs every GPU then holds one model copy. The book reuses what they cache.
adapt: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.distributed_run --profile $(PROFILE) --run adapted-saes feature-table spatial-stats

organism: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.export --profile $(PROFILE)

organism-verify: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.export --profile $(PROFILE) --verify

check: $(STAMP)
	$(PY) -m lib.io.runner --profile $(PROFILE) --check

# pytest exits 5 when it collected no test (a fresh checkout filtered down by -k, say): say so and pass; make
# would otherwise turn it into its own exit status 2 and hide which it was.
test: $(STAMP)
	@rc=0; $(OFFLINE) PIP_NO_INDEX=1 $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

rendered: $(STAMP)
	@test -x /usr/bin/chromium || $(MAKE) --no-print-directory chromium
	$(PY) -m pytest -m rendered tests/test_rendered.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Debian's package lists are fetched only when apt does not know the package yet (a fresh machine).
chromium:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; else \
		apt-cache show chromium >/dev/null 2>&1 || apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; fi

clean:
	rm -rf _build book/notebooks book/logs book/figures book/tables .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

clean-cache:
	rm -rf .cache
