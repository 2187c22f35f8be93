# spine1k workspace. `make help` lists the targets.
SHELL := /bin/bash
comma := ,
.DEFAULT_GOAL := help

PROFILE ?= synthetic
PYTHON_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FORCE ?=
STAGES ?=
EXTRAS ?=
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: help setup lab reproduce test test-all reliability bench lint clean check-params

help: ## List the targets with a one-line description
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PROFILE=$(PROFILE) (synthetic|ci|paper)  FORCE=1 re-runs stages  STAGES=02-04 subset  EXTRAS=nnunet (setup)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[preview,dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (spine1k)" >/dev/null
	@touch $(STAMP)

# An optional extra (EXTRAS=nnunet): installed with the CPU torch pinned; PyPI's torchvision, which
# timm pulls in, does not import beside that torch ("operator torchvision::nms does not exist") and
# nothing the workspace runs needs it, so it is removed (lib/ml/nnunet/tools.py says which paths would).
$(VENV)/.installed-extra-%: $(STAMP) constraints/torch-cpu.txt
	$(PY) -m pip install --quiet -e '.[$*]' -c constraints/torch-cpu.txt
	$(PY) -m pip uninstall --quiet -y torchvision 2>/dev/null || true
	@touch $@

setup: $(STAMP) $(foreach e,$(subst $(comma), ,$(EXTRAS)),$(VENV)/.installed-extra-$(e)) ## Create .venv and install the workspace (idempotent; re-runs when pyproject.toml changes); EXTRAS=nnunet adds nnU-Net v2

lab: $(STAMP) ## Start JupyterLab on localhost (token kept; open the printed URL)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

reproduce: $(STAMP) ## Run every notebook in order with params/PROFILE/ into runs/PROFILE/ (skips up-to-date stages)
	$(PY) -m lib reproduce --profile $(PROFILE) $(if $(FORCE),--force,) $(if $(STAGES),--stages $(STAGES),)

check-params: $(STAMP) ## Validate every params file against its notebook's parameters cell
	$(PY) -m lib check-params

test: $(STAMP) ## Fast test suite (no `slow` tests; a few minutes)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) ## Full test suite including `slow` tests (DDP, browser, paper-scale)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

reliability: $(STAMP) ## The fault corpus (tests/reliability) with its table -> runs/reliability_corpus.md
	SPINE1K_CORPUS_MD=$(CURDIR)/runs/reliability_corpus.md $(PY) -m pytest -q tests/reliability $(PYTEST_ARGS)

bench: $(STAMP) ## Benchmarks: NIfTI loading, phantom, evaluation, conversion, model (ratios vs competitors)
	@for f in bench/bench_*.py; do echo "=== $$f"; $(PY) $$f $(BENCH_ARGS) || exit 1; done

lint: $(STAMP) ## ruff on lib, tests, bench, notebooks and tools
	$(VENV)/bin/ruff check lib tests bench notebooks tools

clean: ## Remove run outputs (runs/) and caches; never data/ sources
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
