# The few verbs a newcomer needs. `make run` serves the demo; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
ENCODER := models/offline-mobilenetv2-160/saved_model.pb

.PHONY: run test lint bench encoder demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(ENCODER): $(VENV)/.installed service/offline_encoder.py
	$(PY) -m service build-encoder

encoder: $(ENCODER)

# Trains each endpoint on the demo images, unless it already serves a version.
demo: $(ENCODER)
	$(PY) -m service demo

run: demo
	HOST=$${HOST:-127.0.0.1} $(PY) -m service serve

test: $(ENCODER)
	$(PY) -m pytest $(PYTEST_ARGS)

# Writes docs/BENCHMARKS.md (needs the Debian package dataset-fashion-mnist).
bench: $(ENCODER)
	$(PY) -m bench $(BENCH)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) models cache data .pytest_cache .ruff_cache
