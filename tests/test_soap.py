"""SOAP against a dense float64 reference, its reduction to Adam, and its failure policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from tests._helpers import assert_recovers, assert_trees_close, soap_reference


def _grads(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 2.0, shape[0])[:, None]
    return [(rng.standard_normal(shape) * scales).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("freq", [1, 2, 3])
@pytest.mark.parametrize("shape", [(4, 3), (3, 4)])
def test_matches_dense_reference(shape, freq):
    # Shapes whose first-gradient factors have at most a 1-D null space: with a
    # larger one (e.g. (3, 5)) the first eigenbasis is not unique, and SOAP's
    # coordinate-wise Adam legitimately depends on the basis LAPACK returns.
    hp = dict(b1=0.9, b2=0.95, eps=1e-8, factor_decay=0.9)
    grads = _grads(shape, 7)
    tx = lo.scale_by_soap(**hp, precondition_frequency=freq)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    want = soap_reference(grads, **hp, freq=freq)
    for t, g in enumerate(grads):
        u, state = update({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_allclose(
            np.asarray(u["w"]), want[t], rtol=2e-3, atol=2e-4, err_msg=f"step {t}"
        )
    assert int(state.failures.failed) == 0


@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.95, 0.95, 1e-6), (0.0, 0.9, 1e-8)])
def test_identity_basis_is_adam(b1, b2, eps):
    params = {
        "w": jnp.zeros((6, 5)),
        "conv": jnp.zeros((3, 3, 2, 4)),
        "b": jnp.zeros(5),
        "s": jnp.zeros(()),
    }
    ours = lo.soap(1e-2, b1=b1, b2=b2, eps=eps, max_precond_dim=1)  # every axis too large
    ref = optax.adam(1e-2, b1=b1, b2=b2, eps=eps)
    s1, s2 = ours.init(params), ref.init(params)
    step1, step2 = jax.jit(ours.update), jax.jit(ref.update)
    for i in range(8):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
        u1, s1 = step1(g, s1, params)
        u2, s2 = step2(g, s2, params)
        assert_trees_close(u1, u2, rtol=1e-6, atol=1e-7)


def test_block_size_larger_than_every_axis_is_unblocked():
    params = {"w": jnp.zeros((5, 6))}
    a, b = (
        lo.soap(1e-2, precondition_frequency=2),
        lo.soap(1e-2, precondition_frequency=2, block_size=100),
    )
    sa, sb = a.init(params), b.init(params)
    step_a, step_b = jax.jit(a.update), jax.jit(b.update)
    for i in range(5):
        g = {"w": jax.random.normal(jax.random.key(i), (5, 6))}
        ua, sa = step_a(g, sa, params)
        ub, sb = step_b(g, sb, params)
        np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))


def test_bases_stay_orthogonal_and_track_eigenvectors():
    params = {"w": jnp.zeros((6, 4))}
    tx = lo.scale_by_soap(factor_decay=0.99, precondition_frequency=1)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((6, 6))
    update = jax.jit(tx.update)
    for _ in range(60):
        g = {"w": jnp.asarray(mix @ rng.standard_normal((6, 4)), jnp.float32)}
        _, state = update(g, state, params)
    q = np.asarray(state.bases["w"][0][0])
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
    stat = np.asarray(state.stats["w"][0][0])
    d = q.T @ stat @ q
    off = np.abs(d - np.diag(np.diag(d))).max() / np.abs(np.diag(d)).max()
    assert off < 0.05, off


def test_non_finite_gradient_is_kept_out():
    params = {"w": jnp.zeros((4, 3)), "v": jnp.zeros(3)}
    tx = lo.soap(1e-2, precondition_frequency=2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = lambda i: jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    for i in range(3):
        _, state = update(g(i), state, params)
    before = state[0]
    bad = g(3)
    bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
    u, state = update(bad, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    assert_trees_close(state[0].stats["w"], before.stats["w"], rtol=0, atol=0)
    assert_trees_close(state[0].nu["w"], before.nu["w"], rtol=0, atol=0)
    assert int(state[0].failures.skipped) == 1
    assert_recovers(update, state, params, g)


def test_failed_refresh_keeps_previous_basis():
    params = {"w": jnp.zeros((4, 3))}
    tx = lo.scale_by_soap(precondition_frequency=1)
    state = tx.init(params)
    g = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
    _, state = tx.update(g, state, params)
    _, state = tx.update(g, state, params)
    good = state.bases["w"][0]
    stats = {"w": (jnp.full_like(state.stats["w"][0], jnp.inf), state.stats["w"][1])}
    u, state = tx.update(g, state._replace(stats=stats), params)
    assert int(state.failures.failed) == 1
    np.testing.assert_array_equal(np.asarray(state.bases["w"][0]), np.asarray(good))
    assert np.all(np.isfinite(np.asarray(u["w"])))


INVALID = [
    (dict(b1=1.0), "b1 must be in"),
    (dict(b2=-0.5), "b2 must be in"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(factor_decay=0.0), "factor_decay must be > 0"),
    (dict(precondition_frequency=0), "precondition_frequency must be >= 1"),
    (dict(max_precond_dim=0), "max_precond_dim must be >= 1"),
    (dict(block_size=-3), "block_size must be >= 1"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
]


@pytest.mark.parametrize("kwargs,match", INVALID, ids=[next(iter(k)) for k, _ in INVALID])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.soap(1e-3, **kwargs)
