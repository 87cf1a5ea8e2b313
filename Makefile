# make demo | make test | make check-kernels | make bench — each bootstraps .venv idempotently from this
# repository's files.
#
# CPU machines: a fresh .venv with the pinned CPU build of torch (constraints-cpu.txt).
# GPU machines (nvidia-smi works): a .venv over the system's own torch/triton/transformers
# (--system-site-packages), installing only growlib itself, since such machines may reach no registry.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
STAMP := $(VENV)/.installed$(if $(HAS_GPU),-gpu,-cpu)

.PHONY: demo test check-kernels bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
ifeq ($(HAS_GPU),yes)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test,plots,images,distributed]"
endif
	touch $@

demo: $(STAMP)
	$(PY) -m growlib.cli demo
	$(PY) -m growlib.cli compare --steps 400 --seeds 0,1 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

# Every Triton kernel against its PyTorch reference: on the GPU if there is one, else through Triton's interpreter.
check-kernels: $(STAMP)
	$(PY) -m growlib.cli check-kernels

# Every GPU benchmark (each appends to perf/results/*.csv), then perf/results/PERFORMANCE.md from those CSVs.
# Without a CUDA GPU the first step says that kernel timings need one and exits 2: no number is printed.
bench: $(STAMP)
	$(PY) perf/common.py
	$(PY) -m growlib.cli check-kernels --quick
	$(PY) perf/bench_structured.py
	$(PY) perf/bench_kron.py
	$(PY) perf/bench_frozen.py
	$(PY) perf/report.py

clean:
	rm -rf $(VENV) build *.egg-info
