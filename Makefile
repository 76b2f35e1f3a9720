# Two commands do everything on a fresh machine:
#   make run    set up .venv (once) and build the whole tiny family on the embedded default
#   make test   set up .venv (once) and run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RECIPE  ?= tiny
ARGS    ?=
JOBS    ?= 2

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

# torch first, pinned: a machine without an NVIDIA driver gets the CPU build from the PyTorch CPU
# index (or a local wheel pip already knows about), so the editable install below finds it satisfied
# and never pulls a multi-GB CUDA build. Re-runs reuse the venv until pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then \
	  echo "torch 2.13.0 already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	else \
	  $(BIN)/python -m pip install -q --timeout 20 --retries 1 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/family run --recipe $(RECIPE) $(ARGS)

# two pytest-xdist workers (JOBS=0: one process); worksteal hands a free worker the queued tests of a busy one
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.overhead

clean-venv:
	rm -rf $(VENV)
