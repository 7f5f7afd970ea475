# The targets README and CI call. Quick start on a fresh machine: `make book`, then `make test`.
#
#   make book [PROFILE=default]        install, run every chapter, build the HTML book (_build/html/index.html)
#   make chapter CHAPTER=01_world      run one chapter (PROFILE=... as above; FORCE=1 re-executes unchanged ones)
#   make check [PROFILE=default]       every figure and table the chapters declare exists for PROFILE, and no
#                                      executed page shows a machine path, warning, error or progress bar
#   make download PROFILE=paper        fetch the models, SAEs and datasets the profile names (DRY_RUN=1: the plan)
#   make adapt [PROFILE=default]       adapt the SAEs, their reconstruction and per-feature statistics on the profile's
#                                      [distributed] processes (torchrun when more than one), before `make book`
#   make organism [PROFILE=default] [SEED=n]  train the organism on this CPU and export it to artifacts/ (+ provenance;
#                                      SEED replaces the profile's seed)
#   make organism-verify               retrain from scratch and check it equals artifacts/ bit for bit
#   make seed SEED=n [PROFILE=default] `make organism` for seed n, then its whole pipeline to every chapter's
#                                      findings row, committed beside it (the book reads the rows of extra seeds)
#   make test                          unit tests and chapter smoke runs (no built book needed; lists the 15 slowest)
#   make rendered                      load every page of the built book in headless Chromium
#   make lab                           JupyterLab on this checkout: chapters/*.py open as notebooks (Jupytext)
#   make lab-check                     start `make lab` headless, check it answers and opens the chapters, stop it
#   make lint | format                 ruff, and actionlint on .github/workflows
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

# The book build and its kernels run offline by default: HF_HUB_OFFLINE is 1 unless the caller sets it, so a user
# with hub access can run `HF_HUB_OFFLINE=0 make book PROFILE=paper` (or `make book PROFILE=paper HF_HUB_OFFLINE=0`);
# lib/io/runner.py passes the caller's value to the chapter kernels and defaults to 1 as well. `make download`
# fetches what a profile needs ahead of an offline build. The tests always run offline, whatever the caller set.
# PIP_NO_INDEX is not set here: `make install` needs the package index.
HF_HUB_OFFLINE ?= 1
ifeq ($(strip $(HF_HUB_OFFLINE)),)
override HF_HUB_OFFLINE := 1
endif
OFFLINE = HF_HUB_OFFLINE=$(HF_HUB_OFFLINE) WANDB_MODE=disabled MPLBACKEND=Agg
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPLBACKEND=Agg

# The stamp depends on requirements.txt: editing it re-runs the install, a second `make install` does nothing.
STAMP := $(VENV)/.installed

# The repository root goes on the virtual environment's path as a one-line .pth file in its site-packages, so that
# `import lib` works from any working directory and in every way of running a chapter: a Jupyter kernel started in
# chapters/ (`make lab`), `python chapters/01_world.py`, `jupyter nbconvert --execute` of a converted chapter, and
# the runner. A kernel spec with PYTHONPATH would cover the kernels only, and a sys.path line in every chapter is
# plumbing in the pages. Written by the install and checked again by every `make install` (a moved checkout).
PTH := spatial-book-repo.pth
define write_pth
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	if [ "$$(cat "$$site/$(PTH)" 2>/dev/null)" != "$(CURDIR)" ]; then \
		echo "$(CURDIR)" > "$$site/$(PTH)"; echo "install: $$site/$(PTH) puts $(CURDIR) on the path"; fi
endef

# `make lab`: requirements-lab.txt on top (its own stamp), then JupyterLab on 127.0.0.1 with this checkout as its
# root (--allow-root only where make runs as root, as in CI containers). The kernels get the hub setting above but not
# MPLBACKEND=Agg (a reader's own plots show inline). LAB_ARGS adds options, e.g. LAB_ARGS="--no-browser --port=8890".
LAB_STAMP := $(VENV)/.installed-lab
LAB_IP ?= 127.0.0.1
LAB_ARGS ?=
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
JUPYTEXT_DEFAULT_VIEWER := {"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}

.PHONY: help venv install book html chapter check download adapt organism seed organism-verify test rendered lint format \
	chromium clean clean-cache lab lab-check

help:
	@awk '!/^#/ {exit} {sub(/^# ?/, ""); print}' Makefile

venv: $(STAMP)
install: $(STAMP)
	$(write_pth)

# torch alone and first: `torch==2.13.0` resolves to the CPU build, and nothing installed later can bring the CUDA
# build (with several GB of nvidia-* packages) in through another package's looser requirement.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install -r requirements.txt
	$(write_pth)
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

# The one target that goes online by default (it exists to fetch): HF_HUB_OFFLINE=0 unless the caller set it, and a
# caller's HF_HUB_OFFLINE=1 makes it refuse. What it fetches lands in the hub's and datasets' caches, where the book
# then finds it offline (lib/io/download.py). DRY_RUN=1 prints the plan (with sizes when online) and fetches nothing.
DRY_RUN ?=
download: $(STAMP)
	HF_HUB_OFFLINE=$(if $(filter file override,$(origin HF_HUB_OFFLINE)),0,$(HF_HUB_OFFLINE)) \
		$(PY) -m lib.io.download --profile $(PROFILE) $(if $(filter 1,$(DRY_RUN)),--dry-run)
# The steps that share the SAEs out over processes (lib/steps/distributed.py), run from a process that loads no
# model: on GPUs every GPU then holds one model copy. The book reuses what they cache.
adapt: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.distributed_run --profile $(PROFILE) --run adapted-saes reconstruction feature-table spatial-stats

organism: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.export --profile $(PROFILE) $(if $(SEED),--seed $(SEED))

seed: $(STAMP)
	@test -n "$(SEED)" || { echo "make seed: name the seed, e.g. make seed SEED=1"; exit 2; }
	$(OFFLINE) $(PY) -m lib.steps.export --profile $(PROFILE) --seed $(SEED) --findings

organism-verify: $(STAMP)
	$(OFFLINE) $(PY) -m lib.steps.export --profile $(PROFILE) --verify $(if $(SEED),--seed $(SEED))

check: $(STAMP)
	$(PY) -m lib.io.runner --profile $(PROFILE) --check

# pytest exits 5 when it collected no test (a fresh checkout filtered down by -k, say): say so and pass; make
# would otherwise turn it into its own exit status 2 and hide which it was.
test: $(STAMP)
	@rc=0; $(TEST_ENV) PIP_NO_INDEX=1 $(PY) -m pytest --durations=15 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

$(LAB_STAMP): requirements-lab.txt
	$(PY) -m pip install -r requirements-lab.txt
	@mkdir -p $(LAB_SETTINGS)
	echo '$(JUPYTEXT_DEFAULT_VIEWER)' > $(LAB_SETTINGS)/overrides.json
	@touch $@

lab: install $(LAB_STAMP)
	HF_HUB_OFFLINE=$(HF_HUB_OFFLINE) WANDB_MODE=disabled $(VENV)/bin/jupyter lab --ServerApp.ip=$(LAB_IP) \
		--ServerApp.root_dir=$(CURDIR) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The headless check of `make lab` (tests/test_lab.py): it must run here, not skip.
lab-check: install $(LAB_STAMP)
	REQUIRE_LAB=1 $(TEST_ENV) $(PY) -m pytest -m lab tests/test_lab.py $(PYTEST_ARGS)

rendered: $(STAMP)
	@test -x /usr/bin/chromium || $(MAKE) --no-print-directory chromium
	$(PY) -m pytest -m rendered tests/test_rendered.py $(PYTEST_ARGS)

# actionlint with the pinned shellcheck (requirements.txt), so every machine checks the workflows' scripts alike.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/actionlint -shellcheck=$(VENV)/bin/shellcheck -pyflakes= .github/workflows/*.yml

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
