"""Shared pytest configuration."""

import jax
import pytest

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
    "tests/test_notebooks.py::test_notebook_runs_in_quick_mode[01_linear_rep]",
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
