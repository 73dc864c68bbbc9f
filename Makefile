# Entry points. Every target sets up what it needs: `install` builds .venv in the repo root once
# (re-run only when setup.cfg or pyproject.toml change).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: install test lint bench demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check src tests $(wildcard data_recipes)

bench: install
	$(PY) -m llava_lightning.bench

demo: install
	$(PY) -m llava_lightning.demo
