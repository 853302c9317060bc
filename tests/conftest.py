"""Shared pytest configuration."""

import os

# The tests compile far more than they compute (tiny shapes, a fresh closure per
# case): with XLA's CPU backend at its lowest optimization level the default
# tier runs ~2.4x faster on 2 cores (measured on PSGD-Kron's conformance cases,
# 103 s -> 43 s; the quick-mode notebooks also get faster, 116 s -> 93 s). The
# operations and their float32 semantics are the same; only the generated
# machine code is less optimized. Subprocesses started by the tests (workers,
# notebooks, the CLI) inherit the flags. Benchmarks never run under this file,
# and LWO_TEST_XLA_OPTIMIZE=1 runs the tests with XLA's defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("LWO_TEST_XLA_OPTIMIZE") != "1" and FAST_COMPILE_FLAGS not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import pytest  # noqa: E402

# Silent broadcasting bugs become errors. dtype promotion stays "standard"
# (optax itself is not strict-clean), and x64 stays off so float32 paths run.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


# The longest tests (each a minute or so on 2 cores) start first, so that with
# pytest-xdist they do not run alone at the end of the session while the other
# worker idles (longest-first scheduling; the default tier's wall time depends
# on it).
_LONG_FIRST = (
    "tests/test_sharding.py::test_every_alias_on_a_mesh",
    "tests/test_sharding.py::test_owner_layout_is_the_same",
    "tests/test_sharding.py::test_every_alias_with_a_plain_init",
    "tests/test_notebooks.py::test_notebook_runs_like_colab[01_linear_rep]",
    "tests/test_zoo.py::test_cli_reproduces_both_experiments",
    "tests/test_benchmarks.py::test_step_time_quick_writes_record",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, prefix in enumerate(_LONG_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(_LONG_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
