# Two commands for a fresh machine: `make demo` runs the pipeline on the embedded default, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The stages that exist so far, in order; issue 8 replaces this with stage=pipeline.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=synthesize
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=prepare
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=train_autoencoder
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=encode_latents
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=train_ldm
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=sample
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=evaluate
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=export

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=10

clean:
	rm -rf $(VENV) store outputs mlruns mlruns.db mlartifacts
