# Two entry points: `make run` (the service on its embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check bench deps clean

$(STAMP): pyproject.toml
	scripts/system-deps --run
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

run: $(STAMP)
	$(BIN)/mailer db upgrade
	$(BIN)/mailer serve

test: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The gates: mypy (strict, pydantic plugin) and ruff, both configured in pyproject.toml; 0 findings.
check: $(STAMP)
	$(BIN)/mypy
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/intake.py

clean:
	rm -rf $(VENV) var .pytest_cache
