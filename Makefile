# Two commands set up a fresh machine and do the work:
#   make bench   installs everything into .venv, runs the default benchmark set (table, JSON, PNG)
#   make test    installs everything into .venv, runs the test suite
# torch is installed first and pinned (2.13.0, the CPU build on this machine's disk). seqkern itself installs
# as pure Python with a plain `pip install` (no torch in its build env); `python -m seqkern.build --runnable`
# then compiles the C++ kernels for every CPU capability level this CPU runs into the cache, so that neither the
# tests (which run the core ops at each level) nor the benchmarks pay for a first-use build.
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
PY      := $(VENV)/bin/python
# BuildExtension finds ninja on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
SOURCES := setup.py pyproject.toml requirements-dev.txt seqkern/_extension.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: install test bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet -e .
	$(PY) -m seqkern.build --runnable
	touch $@

# Two pytest workers (pytest-xdist): the suite is mostly Python-bound (the Triton interpreter, torch.compile,
# exports), so two processes on two cores take it from ~10 to ~7 min on a Zen 4 (NOTES.md "Round 23").
test: install
	$(PY) -m pytest -q -n 2 tests

bench: install
	$(PY) -m benchmarks

# On a machine with a CUDA GPU: the Triton kernels checked on the device, then the GPU benchmark set (< 10 min);
# without one it says so and exits 0. Needs a CUDA build of torch in the venv (TORCH=torch==2.13.0 from the
# CUDA index), not the CPU build pinned above.
gpu-check: install
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf build *.egg-info seqkern/*.so bench_results
