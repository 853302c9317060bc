"""Shared pytest configuration."""

import jax
import pytest

# Silent broadcasting bugs become errors. dtype promotion stays "standard"
# (optax itself is not strict-clean), and x64 stays off so float32 paths run.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
