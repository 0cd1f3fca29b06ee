# Two commands on a fresh machine: `make demo` (install, then the whole pipeline on generated data)
# and `make test` (install, then the test suite). Everything goes into a virtualenv in .venv/.
# Also: `make learn` (does a trained model follow its text?) and `make bench` (speed benches).
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the CPU build of torch, installed first so no CUDA build is pulled in. GPU machines:
# make TORCH_SPEC=torch (or any build you need).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: install demo learn test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	bash launch/demo.sh

# Does a trained model follow its text? Train, sample and score from nothing; writes docs/RESULTS.md.
learn: install
	$(BIN)/python bench/learn.py --report docs/RESULTS.md

test: install
	$(BIN)/python -m pytest -q

# The speed benches in their quick forms, each a few minutes at most on 2 CPU cores; the full
# runs, ab.py and what the figures mean are in bench/README.md.
bench: install
	$(BIN)/python bench/unet.py
	$(BIN)/python bench/sampling.py --configs demo
	$(BIN)/python bench/loader.py --configs demo
	$(BIN)/python bench/shard.py

clean:
	rm -rf demo_out learn_out runs .pytest_cache
