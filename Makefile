# Two commands on a fresh machine with only python3 and make:
#   make demo   set up .venv, then compare the baselines and OneRank on the built-in synthetic data
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is installed first, pinned to the release CI tests (the package accepts 2.13 to 2.15, any build). PyPI's Linux
# wheel is the CUDA build (about 0.5 GB plus ~19 nvidia / triton packages), so on a Linux machine without an NVIDIA
# GPU the CPU build is taken: torch==X+cpu from the indexes or wheel folders pip is configured with when they hold
# it (no download from elsewhere), else from PyTorch's CPU index (TORCH_CPU_INDEX). A torch X already in the venv
# is kept.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(BIN)/python -m pip install --quiet
# TorchRec for the sharded-table tests: it requires the distribution fbgemm-gpu (PyPI's is the 2.7 GB CUDA build), so it
# is installed without dependencies after dev, which brings PyPI's CPU build (fbgemm-gpu-cpu) and its other
# requirements (pyproject.toml, extra torchrec-cpu; about 50 MB; Linux only, elsewhere those tests skip)
TORCHREC_VERSION ?= 1.8.0

$(STAMP): pyproject.toml | $(BIN)/python
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; \
	then echo "torch $(TORCH_VERSION) already installed"; \
	elif [ "$$(uname -s)" != Linux ] || nvidia-smi -L >/dev/null 2>&1; then $(PIP) torch==$(TORCH_VERSION); \
	else $(PIP) torch==$(TORCH_VERSION)+cpu 2>/dev/null || \
		$(PIP) torch==$(TORCH_VERSION)+cpu --extra-index-url $(TORCH_CPU_INDEX); fi
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps torchrec==$(TORCHREC_VERSION)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/onerank compare --config configs/demo.yaml --models single_task,shared_bottom,mmoe,ple,onerank --no-progress

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks setup.py
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache
