# Two entry points for a new machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo up test lint typecheck unit bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed  ## install, then run the demo on the embedded defaults
	$(BIN)/cohortflow demo $(ARGS)

up: $(VENV)/.installed  ## install, then run the embedded stack
	$(BIN)/cohortflow up $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

unit: $(VENV)/.installed
	$(BIN)/pytest $(ARGS)

test: lint typecheck unit  ## install, then lint, type-check and run every test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
