# mamba-dist: the two commands.
#   make demo   venv + install + prepare the built-in corpus + train the tiny model on CPU (a few minutes)
#   make test   venv + test dependencies + pytest
#   make sweep-demo  a 12-run scaling sweep of tiny models on CPU (~10-15 min), then the fit and its plots
# The venv is .venv (created if missing). torch==2.13.0 is installed FIRST, on its own: the package's
# dependency range admits it, so nothing installed afterwards pulls a different (multi-GB CUDA) torch.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH      ?= torch==2.13.0
DEMO_DATA  ?= data/prepared/demo-byte-256
DEMO_RUN   ?= runs/demo
DEMO_ARGS  ?=
PYTEST_ARGS ?=

SWEEP_DEMO ?= runs/sweep-demo

.PHONY: demo test install install-test clean-demo sweep-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The `distributed` extra adds DeepSpeed (ZeRO); megatron-core is a core dependency.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) -e '.[distributed]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(DEMO_DATA)/manifest.json: | $(VENV)/.installed
	$(BIN)/mamba-dist prepare builtin --out $(DEMO_DATA) --tokenizer byte --seq-len 256 --val-fraction 0.02 --overwrite

demo: $(VENV)/.installed $(DEMO_DATA)/manifest.json
	rm -rf $(DEMO_RUN)
	$(BIN)/mamba-dist train --config configs/tiny.yaml data.path=$(DEMO_DATA) logging.run_dir=$(DEMO_RUN) $(DEMO_ARGS)

sweep-demo: $(VENV)/.installed $(DEMO_DATA)/manifest.json
	$(BIN)/mamba-dist sweep run configs/sweeps/demo.yaml --out $(SWEEP_DEMO)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)
