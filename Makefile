# `make demo` and `make test` each create .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOOKS := $(wildcard hooks/*/pyproject.toml)
# Editable installs leave the sources uncompiled, and with PYTHONDONTWRITEBYTECODE set
# every process would compile them again (about 40 ms of each start); an installed
# wheel has its bytecode from pip. Up-to-date files are skipped, so this costs nothing.
COMPILE = $(BIN)/python -m compileall -q -j 0 connhex_edge_ota hooks tests/plugins

.PHONY: demo test lint types unit bench reliability-report install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml tests/plugins/dummy/pyproject.toml $(HOOKS)
	$(BIN)/pip install --quiet -e '.[test]' -e ./tests/plugins/dummy $(foreach h,$(HOOKS),-e ./$(dir $(h)))
	touch $@

install: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed

demo: install
	$(COMPILE)
	$(BIN)/connhex-edge-ota demo

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: install-test
	$(BIN)/mypy

# The suite mostly waits on real agents, servers and scripts: workers overlap the waits
# (6 measured fastest on 2 cores: 58 to 62 s, against 63 to 65 s with 4, 75 s with 3).
# pytest may cache its rewritten test modules even where PYTHONDONTWRITEBYTECODE is set:
# each worker otherwise rewrites them all again (1.6 s of CPU each, 0.7 s cached).
PYTEST_WORKERS ?= 6
unit: install-test
	$(COMPILE)
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -n $(PYTEST_WORKERS)

test: lint types unit

# Every defence of the device, one row each: the kill-point matrix, download faults,
# hostile and corrupt releases, the journal's edges.
reliability-report: install-test
	$(COMPILE)
	$(BIN)/python tools/reliability_report.py

# Each script installs what it lacks (nginx, mender-client, mender-artifact, time: apt-get,
# as root) and prints its figures beside a baseline measured in the same run.
BENCH_RUNS ?= 3
bench: install-test
	$(COMPILE)
	$(BIN)/python bench/fleet.py
	BENCH_RUNS=$(BENCH_RUNS) $(BIN)/python bench/startup.py
	BENCH_RUNS=$(BENCH_RUNS) $(BIN)/python bench/download.py
	BENCH_RUNS=$(BENCH_RUNS) $(BIN)/python bench/update.py
	$(BIN)/python bench/resume.py
	$(BIN)/python bench/delta.py
	$(BIN)/python bench/footprint.py

clean:
	rm -rf $(VENV) build *.egg-info
