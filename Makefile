# make demo | make test | make check-kernels | make bench — each installs what it needs once, idempotently,
# from this repository's files.
#
# CPU machines (and CI): a fresh .venv with the pinned CPU build of torch (constraints-cpu.txt).
# GPU machines (nvidia-smi works): no venv.  Their Python is itself a virtualenv holding torch, triton and
#   transformers, and they may reach no registry; a venv made from it, even with --system-site-packages, sees
#   none of those packages.  So growlib alone is installed, editable and without dependencies, into
#   $(PYTHON) itself, and the targets run with that interpreter.
# make rehearse-gpu-image (by hand, on a CPU machine; not CI): .venv-gpu-image from a Python 3.12
#   ($(IMAGE_PYTHON)) with the GPU machine's versions (constraints-gpu-image.txt), growlib installed as on that
#   machine; then the kernel tests, the GPU script's smoke run and the whole suite, as that machine would run them.

PYTHON ?= python3
IMAGE_PYTHON ?= python3.12
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
INSTALL_GROWLIB_ONLY := -m pip install -q --no-deps --no-build-isolation --no-index -e .

ifeq ($(HAS_GPU),yes)
PY := $(PYTHON)
STAMP := .installed-gpu
else
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu
endif

IMAGE_VENV := .venv-gpu-image
IMAGE_PY := $(IMAGE_VENV)/bin/python

.PHONY: demo test test-quick check-kernels bench rehearse-gpu-image clean

.installed-gpu: pyproject.toml
	$(PYTHON) $(INSTALL_GROWLIB_ONLY)
	touch $@

$(VENV)/.installed-cpu: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test,plots,images,distributed]"
	touch $@

# The comparison under compare's protocol, shortened to fit ~10 minutes on 2 cores: 150 baseline steps, and each
# arm's learning-rate sweep on a quarter of its budget (the evidence table tunes on full budgets).  Run again,
# it reads the finished runs back instead of training them again.
demo: $(STAMP)
	$(PY) -m growlib.cli demo
	$(PY) -m growlib.cli compare --steps 150 --seeds 2,3,4 --tune-fraction 0.25 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

# The developer's quick lane: everything but the slow, subprocess and distributed tests (CI runs them all).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not subprocess and not distributed"

# Every Triton kernel against its PyTorch reference: on the GPU if there is one, else through Triton's interpreter.
check-kernels: $(STAMP)
	$(PY) -m growlib.cli check-kernels

# The whole GPU check (perf/gpu_run.sh: check-kernels and the kernel tests on CUDA, every benchmark, the end-to-end
# row, a summary table) into a new timestamped folder under out/; without a CUDA GPU it says so and exits 2.
# `python perf/report.py --results FOLDER` then writes PERFORMANCE.md from that run's CSVs.
bench: $(STAMP)
	PYTHON=$(PY) bash perf/gpu_run.sh out/gpu-run-$$(date -u +%Y%m%dT%H%M%SZ)

$(IMAGE_VENV)/.installed: pyproject.toml constraints-gpu-image.txt
	$(IMAGE_PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12) and "IMAGE_PYTHON must be a Python 3.12")'
	test -x $(IMAGE_PY) || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q -r constraints-gpu-image.txt
	$(IMAGE_PY) $(INSTALL_GROWLIB_ONLY)
	touch $@

rehearse-gpu-image: $(IMAGE_VENV)/.installed
	$(IMAGE_PY) -m pytest -q tests/kernels
	rm -rf out/gpu-image-smoke  # the rehearsal's own scratch folder: gpu_run.sh refuses a non-empty one
	PYTHON=$(abspath $(IMAGE_PY)) bash perf/gpu_run.sh --smoke out/gpu-image-smoke
	$(IMAGE_PY) -m pytest -q

clean:
	rm -rf $(VENV) $(IMAGE_VENV) .installed-gpu build *.egg-info
