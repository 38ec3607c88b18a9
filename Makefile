# The README's two commands: `make run` (the train-pipeline flow once, on the embedded
# default corpus, no server needed) and `make test` (ruff and the whole test suite). Both
# create .venv when missing and install torch first, then the project with its dev extra.
# `make up` / `make down` start and stop the local Prefect server, worker and MLflow server.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench up down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
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
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prepare.py

clean:
	rm -rf data runs .pytest_cache .ruff_cache
