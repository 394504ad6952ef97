# Each target creates .venv when missing. torch==2.13.0 is installed first so that pip takes the
# CPU wheel available locally instead of resolving a multi-GB CUDA build through the torch range.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= A list of colors: red, blue

.PHONY: run test test-fast install install-test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/tokenloom pull smollm2-135m-instruct
	$(VENV)/bin/tokenloom generate "$(PROMPT)" --max-new-tokens 40

# The whole suite: about 10 minutes on a quiet 2-core machine (the real-model tests dominate).
test: install-test
	$(VENV)/bin/ruff check tokenloom tests
	$(PY) -m pytest -q

# Without the tests marked slow (those that load the real SmolLM2 / Gemma 3 files and transformers):
# under two minutes.
test-fast: install-test
	$(VENV)/bin/ruff check tokenloom tests
	$(PY) -m pytest -q -m "not slow"

lint: install-test
	$(VENV)/bin/ruff check tokenloom tests

bench: install-test
	$(VENV)/bin/tokenloom bench

clean:
	rm -rf $(VENV) build *.egg-info
