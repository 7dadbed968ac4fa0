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
	# the official OSV JSON schema for the tests (the package's data only: none of its dependencies)
	$(BIN)/pip install --quiet --no-deps 'osv==0.0.22'
	touch $(STAMP)

deps: $(STAMP)

run: $(STAMP)
	$(BIN)/mailer db upgrade
	$(BIN)/mailer serve

# The suite waits on real daemons (Dovecot, Postfix, Docker, gpg) more than it computes: four
# workers, a test file each at a time (--dist loadfile), keep it well under 15 minutes on 2 cores.
PYTEST_WORKERS ?= 4
test: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The gates: mypy (strict, pydantic plugin) and ruff, both configured in pyproject.toml; 0 findings.
check: $(STAMP)
	$(BIN)/mypy
	$(BIN)/ruff check .

# quick sizes; see bench/README.md for the full-size runs
bench: $(STAMP)
	$(BIN)/python bench/intake.py --json -n 100
	$(BIN)/python bench/intake.py --json --encrypted -n 40
	$(BIN)/python bench/intake.py --json --rate 3 --duration 10
	$(BIN)/python bench/flood.py --json --n 200
	$(BIN)/python bench/openpgp.py --json -n 40
	$(BIN)/python bench/imap.py --json --messages 200

clean:
	rm -rf $(VENV) var .pytest_cache
