# marginlab — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned here (the versions CI installs); everything else comes from pyproject.toml
TORCH := torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: help install train test format bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv and install marginlab (editable) with its test tools

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,sweep,export,mlflow,align,wandb,docs]'
	touch $@

train: install ## train on the embedded default (scikit-learn digits); extra overrides: make train ARGS="head=arcface"
	$(VENV)/bin/marginlab train $(ARGS)

test: install ## lint and format check (ruff), then the test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(ARGS)

format: install ## apply ruff's formatter and import order
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/ruff format .

bench: install ## run the ratio benchmarks in benchmarks/
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: ## remove the venv and caches (outputs/ is kept)
	rm -rf $(VENV) .pytest_cache build *.egg-info
