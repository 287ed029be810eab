# loramux: two commands matter, `make demo` (the main job) and `make test` (what CI runs).
# Both create .venv when absent, install torch first (the CPU build where no GPU is present, so no multi-GB
# CUDA download), then this project with its dev extra, then fetch the model and BIG-bench assets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loramux-installed
# Where no NVIDIA GPU is present, torch 2.13.0 (the CPU build, where the registry offers it: set TORCH_INDEX to a
# CPU wheel index such as PyTorch's own if yours only has CUDA builds). With a GPU, any torch the range admits.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.5$(comma)<2.15,torch==2.13.0)
TORCH_INDEX ?=
comma := ,
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export WANDB_MODE ?= offline

.PHONY: install assets slurm-up slurm-down test test-fast demo demo-standin lint clean-venv

# torch through pip (it reads this machine's pip configuration: where the CPU build lies), the rest through uv:
# the same packages (checked), resolved and installed in parallel, ~10 s against pip's ~2 min on 2 cores. uv is held
# to the torch pip installed (never a CUDA build from the registry); where uv cannot run, pip does the rest.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --constraint $(VENV)/torch-pin.txt -e ".[dev]" \
	  || $(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Each part is one process, all at once: the SmolLM2 and Gemma conversions (transformers dequantizing a GGUF) and the
# BIG-bench extraction (one .tar.gz streamed) each keep one core busy, so on 2 cores they end with the slowest.
# `make test` adds Gemma-3-270M, the second backbone that tests/test_models_gemma.py runs.
# `make test` adds --skip-unavailable: an asset its source no longer offers (the bigbench==1.0.0 sdist left PyPI's
# index in 2026-12) is one line, and the tests that read it skip and say so (the summary counts them), so what does
# not need it still runs; `make assets` and `make demo` stop at it.
ASSET_PARTS ?= --model --bigbench
FETCH_FLAGS ?=
assets: $(STAMP)
	@pids=; for part in $(ASSET_PARTS); do echo "$(BIN)/python -m data.fetch $$part $(FETCH_FLAGS)"; \
	  $(BIN)/python -m data.fetch $$part $(FETCH_FLAGS) & pids="$$pids $$!"; done; \
	rc=0; for pid in $$pids; do wait $$pid || rc=$$?; done; exit $$rc

# The `slurm` tests submit real sweeps to a one-node SLURM cluster on this host (needs root to install and start
# it; elsewhere those tests skip and say why).
slurm-up:
	@if [ "$$(id -u)" = 0 ]; then scripts/slurm_localhost.sh; \
	else echo "slurm-up: not root, the local SLURM cluster is not started (slurm tests will skip)"; fi

slurm-down:
	scripts/slurm_stop.sh

# Test files run on every core (pytest-xdist; one file stays on one worker, so its module fixtures are built once).
test: ASSET_PARTS += --gemma
test: FETCH_FLAGS += --skip-unavailable
test: assets slurm-up
	$(BIN)/python -m pytest -m "not gpu" -n auto --dist loadfile --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow and not slurm" -n auto --dist loadfile $(PYTEST_ARGS)

demo: assets
	$(BIN)/python -m pipeline.reproduce experiment=demo

# Where BIG-bench cannot be had (its sdist left PyPI's index in 2026-12; `make demo` stops at it): the same chain on
# the generated stand-in task files (data/standin.py) beside the real models, into outputs/standin/ (never
# outputs/demo, which README Results read). Its numbers say whether the chain runs here, and its report says so.
demo-standin: ASSET_PARTS = --model
demo-standin: assets
	LORAMUX_CACHE=$$($(BIN)/python -m data.standin) && export LORAMUX_CACHE && \
	  $(BIN)/python -m pipeline.reproduce experiment=demo paths.output_root=outputs/standin

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
