# Quick start:  make demo   (set up, then train the demo job: generated data, both stages)
#               make test   (set up, then run the whole test suite: ~20 min on 2 CPU cores)
#               make test-fast (set up, then the tests not marked slow: under 1 min)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/accelerate launch --config_file jobs/accelerate/one_process.yaml pipeline/train.py

# -v prints each test's name and result as it finishes; --durations lists the slowest at the end.
test: setup
	$(BIN)/python -m pytest -v --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -v --durations=10 -m "not slow" tests

clean-runs:
	rm -rf runs
