# Two commands set everything up on a fresh machine:
#   make pretrain   # venv + install + a short 2-rank pretraining run on the embedded corpus (deepspeed launcher)
#   make test       # venv + install + the test suite without the tests marked slow (<= 30 min on 2 cores)
# CI (.ci/run) runs `make test` and then `make test-slow` (the launcher, pipeline and long training tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NUM_RANKS ?= 2
ARGS ?=

.PHONY: setup pretrain test test-slow test-all test-fast bench clean

setup: $(STAMP)

# Reinstalls only when requirements.txt or setup.py change (idempotent).
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

pretrain: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(NUM_RANKS) launch/pretrain.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=30 -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=30 -m slow tests

test-all: test test-slow

test-fast: test

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf runs multirun outputs
