# Two commands for a fresh machine: `make demo` runs the pipeline on the embedded default, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,download]'
	touch $(STAMP)

install: $(STAMP)

# stage=pipeline: synthesize -> prepare -> train_autoencoder -> encode_latents -> train_ldm -> sample -> evaluate
# -> export, on the embedded default. It prints where the samples are and how to open the MLflow UI.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python pipelines/run.py stage=pipeline

# Lint and format check first: they take seconds, the suite minutes.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs --durations=10

clean:
	rm -rf $(VENV) store outputs mlruns mlruns.db mlartifacts
