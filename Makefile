# Two entry points, each self-installing into a local virtual environment:
#   make reproduce -> the paper's headline figure (Fig. 1 analogue) on CPU: PNG/PDF + JSON
#   make test      -> runs the default test tier (what CI runs)
#   make paper     -> both experiments, then the README's paper table and docs figure regenerated
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per set of extras, so each target installs only what it runs:
# the paper's figures and the demo need the zoo extra; the tests need test + notebooks.
STAMP_ZOO := $(VENV)/.installed-zoo
STAMP_TEST := $(VENV)/.installed-test
STAMP_DOCS := $(VENV)/.installed-docs

.PHONY: reproduce reproduce-all paper demo test test-slow bench bench-quick bench-deps lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_ZOO): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[zoo]'
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,notebooks]'
	touch $@

$(STAMP_DOCS): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

reproduce: $(STAMP_ZOO)
	$(PY) -m layerwise_optax.zoo reproduce linear-rep --out results/paper

reproduce-all: $(STAMP_ZOO)
	$(PY) -m layerwise_optax.zoo reproduce all --out results/paper

# Both experiments (full protocol), then docs/paper/*.json, docs/fig1_linear_rep.png and
# README's paper table regenerated from them (tests/test_zoo.py checks they agree).
paper: $(STAMP_ZOO)
	$(PY) -m layerwise_optax.zoo reproduce all --out results/paper
	$(PY) -m layerwise_optax.zoo publish results/paper

demo: $(STAMP_ZOO)
	$(PY) examples/demo.py --out results/demo

test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 -m slow

# Peers are benchmark-only. If one fails to install, the benchmarks still run and
# name the missing peer in their output; the data packages must install.
bench-deps: $(STAMP_TEST)
	$(PY) -m pip install -q -e '.[bench]' || { \
	  echo "bench-deps: some peer did not install; installing the rest one by one" >&2; \
	  $(PY) -m pip install -q scikit-learn mnist1d tqdm matplotlib; \
	  for p in precondition-opt kfac-jax==0.0.8 psgd-jax==0.2.9; do \
	    $(PY) -m pip install -q "$$p" || echo "bench-deps: peer $$p unavailable" >&2; done; }

# The full suite (~1 h on 2 CPU cores), then the README tables regenerated.
bench: bench-deps
	$(PY) -m benchmarks

# CI's smoke run of every benchmark script and peer (< 3 min); records go to a temp dir.
bench-quick: bench-deps
	$(PY) -m benchmarks --quick --out "$$(mktemp -d)"

lint: $(STAMP_TEST)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check layerwise_optax tests benchmarks examples docs
	$(PY) -m ruff format --check layerwise_optax tests benchmarks examples docs

# The API reference site (docs/_build/html/index.html), read afresh each time (-E: Sphinx
# does not notice edited docstrings, and would not repeat an old warning): every warning
# is an error, the notebooks are rendered as committed (never executed), nothing is
# fetched at build time; then every public name must be in the built site's inventory.
docs: $(STAMP_DOCS)
	$(PY) -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	$(PY) docs/coverage.py --inventory docs/_build/html/objects.inv

clean:
	rm -rf $(VENV) results docs/_build docs/notebooks
