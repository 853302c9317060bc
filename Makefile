# Two entry points, each self-installing into a local virtual environment:
#   make reproduce -> the paper's headline figure (Fig. 1 analogue) on CPU: PNG/PDF + JSON
#   make test      -> runs the default test tier (what CI runs)
#   make paper     -> both experiments, then the README's paper table and docs figure regenerated
# Checks CI runs besides the tests: make lint, make typecheck, make test-oldest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per set of extras, so each target installs only what it runs:
# the paper's figures and the demo need the zoo extra; the tests need test + notebooks.
STAMP_ZOO := $(VENV)/.installed-zoo
STAMP_TEST := $(VENV)/.installed-test
STAMP_DOCS := $(VENV)/.installed-docs

.PHONY: reproduce reproduce-all paper demo test test-slow test-oldest bench bench-quick bench-deps \
	lint typecheck typecheck-baseline hooks docs clean

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
	$(PY) -m pytest -q -n 2 --durations=40

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

# The type checker: basedpyright (pyright's checker; its wheel brings its own Node.js,
# so it installs from PyPI alone), basic mode, settings in pyproject.toml
# [tool.basedpyright]. It reads the .venv's packages (flax, matplotlib, ... for the zoo).
# .basedpyright/baseline.json holds errors accepted for now; fixed ones drop out of it.
BASEDPYRIGHT := basedpyright==1.40.2
typecheck: $(STAMP_TEST)
	$(PY) -m pip install -q '$(BASEDPYRIGHT)'
	$(VENV)/bin/basedpyright --pythonpath $(PY)

# Accept the current errors (rewrites .basedpyright/baseline.json; review its diff).
typecheck-baseline: $(STAMP_TEST)
	$(PY) -m pip install -q '$(BASEDPYRIGHT)'
	$(VENV)/bin/basedpyright --pythonpath $(PY) --writebaseline

# The oldest dependency versions pyproject.toml declares, in a venv of their own, on a
# smoke subset of the tests: the public API, every optimizer's float64/dense reference
# and non-finite-gradient tests, K-FAC capture and nnx.Optimizer round trips. Two steps,
# because flax's floor needs a newer jax than the core's: .ci/oldest-core.txt pins
# jax/jaxlib/optax/numpy at their floors, then .ci/oldest-flax.txt moves to flax's floor
# (and the jax it requires). Muon's parity test with optax.contrib.muon is not in it:
# it uses options optax 0.2.8 added (the test extra asks for that optax; the library
# does not).
OLDEST ?= .venv-oldest
OLDEST_PYTEST ?= -n 2
SMOKE_CORE := tests/test_public_api.py tests/test_shampoo.py tests/test_soap.py \
	tests/test_kfac.py tests/test_muon.py tests/test_psgd.py tests/test_steepest.py \
	-k 'test_public_api or reference or oracle or float64 or non_finite'
SMOKE_FLAX := tests/test_flax.py \
	-k 'hand_written or conv_input or float64 or pure_dict or round_trips_and_compiles_once and kfac'
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q -c .ci/oldest-core.txt -e . pytest pytest-xdist scipy
	$(OLDEST)/bin/python -m pytest -q -p no:randomly $(OLDEST_PYTEST) $(SMOKE_CORE)
	$(OLDEST)/bin/python -m pip install -q -c .ci/oldest-flax.txt -e '.[flax]'
	$(OLDEST)/bin/python -m pytest -q -p no:randomly $(OLDEST_PYTEST) $(SMOKE_FLAX)

# Git hooks (.pre-commit-config.yaml): ruff, the type checker and whitespace fixers,
# all run from the .venv (no hook repository is cloned).
hooks: $(STAMP_TEST)
	$(PY) -m pip install -q ruff '$(BASEDPYRIGHT)' pre-commit pre-commit-hooks
	$(VENV)/bin/pre-commit install

clean:
	rm -rf $(VENV) $(OLDEST) results docs/_build docs/notebooks
