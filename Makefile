# The few verbs a newcomer needs. `make run` serves the demo; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
ENCODER := models/offline-mobilenetv2-160/saved_model.pb

.PHONY: run test test-fast test-tools lint fmt bench bench-tools screenshot encoder demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(ENCODER): $(VENV)/.installed service/encoders/offline.py
	$(PY) -m service build-encoder

encoder: $(ENCODER)

# Trains each endpoint on the demo images, unless it already serves a version.
demo: $(ENCODER)
	$(PY) -m bench.demo

run: demo
	HOST=$${HOST:-127.0.0.1} $(PY) -m service serve

# Two pytest workers (pytest-xdist), one per core: most tests wait on processes and sockets.
TEST_WORKERS ?= 2

test: $(ENCODER) test-tools
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The unit tests: everything but tests/system and the tests marked slow.
test-fast: $(ENCODER)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

# The page's browser tests (tests/system/test_page.py) drive Debian's Chromium, never a downloaded browser:
# installed here when missing, as root; otherwise say what is needed.
test-tools:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"; exit 1; \
	  fi; \
	fi

# docs/page.png: the web page with real results from the demo that `make run` serves.
screenshot: $(ENCODER) test-tools
	$(PY) -m bench.screenshot

# Writes docs/BENCHMARKS.md and docs/RELIABILITY.md; BENCH="lifecycle" runs one section.
bench: $(ENCODER) bench-tools
	$(PY) -m bench $(BENCH)

# What the benchmarks run besides Python: the wrk load generator and the Fashion-MNIST images,
# both Debian packages (installed here when missing, as root; otherwise say what is needed).
bench-tools:
	@if ! command -v wrk >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq wrk dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "make bench needs the Debian packages wrk and dataset-fashion-mnist (apt-get install)"; exit 1; \
	  fi; \
	fi

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) models cache data .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
