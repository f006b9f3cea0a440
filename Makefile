# Quick start:  make demo   (set up, then train the demo job: generated data, both stages)
#               make test   (set up, then run the test suite)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/accelerate launch --config_file jobs/accelerate/one_process.yaml pipeline/train.py

test: setup
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs
