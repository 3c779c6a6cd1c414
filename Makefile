# One entry point per job. `make setup` then `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HARNESS := $(BIN)/harness

.PHONY: setup test smoke reproduce report bench clean

setup:  ## create .venv with the pinned versions (constraints.txt) and the project, editable
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'

test:   ## the whole test suite (CPU, a few minutes)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
