# Each target creates .venv when missing. torch==2.13.0 is installed first so that pip takes the
# CPU wheel available locally instead of resolving a multi-GB CUDA build through the torch range.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= A list of colors: red, blue
# Where `make bench-peers` builds llama.cpp and the OpenVINO virtualenv (outside the repository).
PEERS ?= $(HOME)/.cache/tokenloom/peers
BENCH_MODEL ?= smollm2-135m-instruct

.PHONY: run test test-fast install install-test lint bench bench-peers clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/tokenloom pull smollm2-135m-instruct
	$(VENV)/bin/tokenloom generate "$(PROMPT)" --max-new-tokens 40

# Test files are spread over one worker per core, at most 2 (each worker runs one torch thread and
# holds its own real models: about 6 GB each); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= $(shell python3 -c 'import os; print(min(2, len(os.sched_getaffinity(0))))' 2>/dev/null || echo 1)

# The whole suite: about 10 minutes on a quiet 2-core machine (the real-model tests dominate).
test: install-test
	$(VENV)/bin/ruff check tokenloom tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Without the tests marked slow (those that load the real SmolLM2 / Gemma 3 files and transformers):
# under two minutes.
test-fast: install-test
	$(VENV)/bin/ruff check tokenloom tests
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

lint: install-test
	$(VENV)/bin/ruff check tokenloom tests

bench: install-test
	$(VENV)/bin/tokenloom bench $(if $(wildcard $(PEERS)),--peers $(PEERS))

# llama.cpp's llama-bench and llama-server from the tree vendored in the llama-cpp-python sdist, and
# OpenVINO GenAI in its own virtualenv with the model exported to int4; none of it is a test
# dependency. An existing build is reused. About 15 minutes on 2 cores the first time.
bench-peers: install-test
	$(VENV)/bin/tokenloom pull $(BENCH_MODEL)
	bash scripts/bench-peers.sh "$(PEERS)" "$(abspath $(PY))" \
		"$$($(PY) -c 'from tokenloom.loading.pull import pull; print(pull("$(BENCH_MODEL)", progress=False))')"

clean:
	rm -rf $(VENV) build *.egg-info
