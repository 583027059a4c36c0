# Two commands set up a fresh machine and do the work:
#   make bench   installs everything into .venv, runs the default benchmark set (table, JSON, PNG)
#   make test    installs everything into .venv, runs the test suite
# torch is installed first and pinned (2.13.0, the CPU build on this machine's disk); the package is then
# built against it with --no-build-isolation, so pip never pulls a multi-GB CUDA torch into a build env.
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
# BuildExtension finds ninja on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: install test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf build *.egg-info seqkern/*.so bench_results
