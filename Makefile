# Two commands on a fresh machine:
#   make demo   - create the environment and run the embedded demo
#   make test   - create the environment and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env demo test bench clean-env

$(STAMP): requirements.txt requirements-slicer.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -r requirements.txt -r requirements-slicer.txt
	$(BIN)/pip install --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train/pretrain.py

test: $(STAMP)
	tools/system-packages
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/encoder.py

clean-env:
	rm -rf $(VENV)
