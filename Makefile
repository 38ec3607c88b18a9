# The README's two commands: `make run` (the train-pipeline flow once, on the embedded
# default corpus, no server needed) and `make test` (ruff and the whole test suite). Both
# create .venv when missing and install torch first, then the project with its dev extra.
# `make up` / `make down` start and stop the local Prefect server, worker and MLflow server.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# One stamp per torch requirement: `make test TORCH='torch==X.Y.Z'` installs that one into an
# existing .venv instead of doing nothing.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9._-' '_')
# `make test` runs the suite in one process per CPU (pytest-xdist; tests/conftest.py groups the
# tests so each module's fixtures are built once; at most 8: each holds its own servers and
# models); PYTEST_PARALLEL= runs it in this one process.
PYTEST_PARALLEL ?= -n auto --maxprocesses 8
# Tiny Shakespeare for `make bench`: SHAKESPEARE=PATH, else ../shared/data, else downloaded once.
SHAKESPEARE ?=

.PHONY: install run test lint bench up down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed*
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m flows.train_pipeline

up: $(STAMP)
	$(BIN)/python deployments/services.py up

down:
	$(BIN)/python deployments/services.py down

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest $(PYTEST_PARALLEL)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prepare.py $(if $(SHAKESPEARE),--shakespeare '$(SHAKESPEARE)')

clean:
	rm -rf data runs .pytest_cache .ruff_cache
