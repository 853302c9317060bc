# Two entry points, each self-installing into a local virtual environment:
#   make reproduce -> the paper's headline figure (Fig. 1 analogue) on CPU: PNG/PDF + JSON
#   make test      -> runs the default test tier (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: reproduce reproduce-all demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,notebooks]'
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m layerwise_optax.zoo reproduce linear-rep --out results/paper

reproduce-all: $(STAMP)
	$(PY) -m layerwise_optax.zoo reproduce all --out results/paper

demo: $(STAMP)
	$(PY) examples/demo.py --out results/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.step_time --out benchmarks/results

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check layerwise_optax tests benchmarks examples
	$(PY) -m ruff format --check layerwise_optax tests benchmarks examples

clean:
	rm -rf $(VENV) results
