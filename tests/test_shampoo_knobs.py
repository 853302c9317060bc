"""Shampoo's AdaGrad grafting (issue 19, item 5) against the dense float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from tests._helpers import shampoo_reference

HP = dict(b1=0.9, b2=0.99, eps=1e-8, damping=1e-3)


def _grads(shape, n, seed=0, rank_one=False):
    rng = np.random.default_rng(seed)
    if not rank_one:
        return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    u, v = rng.standard_normal(shape[0]), rng.standard_normal(shape[1:])
    return [(np.multiply.outer(u, v) * (1 + 0.3 * k)).astype(np.float32) for k in range(n)]


def _run(tx, grads):
    params = {"w": jnp.zeros(grads[0].shape)}
    state, outs = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update({"w": jnp.asarray(g)}, state, params)
        outs.append(np.asarray(u["w"]))
    return outs, state


@pytest.mark.parametrize(
    "shape,freq,rank_one",
    [((4, 3), 1, False), ((3, 5), 2, False), ((2, 3, 4), 1, False), ((5, 3), 1, True)],
    ids=["matrix", "wide_stale_roots", "order3", "rank_one"],
)
def test_adagrad_grafting_matches_dense_reference(shape, freq, rank_one):
    grads = _grads(shape, 6, rank_one=rank_one)
    tx = lo.scale_by_shampoo(
        **HP,
        factor_decay=0.9,
        precondition_frequency=freq,
        merge_small_dims=False,
        start_preconditioning_step=0,
        relative_damping=False,
        grafting="adagrad",
    )
    got, state = _run(tx, grads)
    want = shampoo_reference(grads, **HP, factor_decay=0.9, freq=freq, grafting="adagrad")
    for t, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5, err_msg=f"step {t}")
    # The state holds the running sum of squared gradients (no decay).
    np.testing.assert_allclose(
        np.asarray(state.nu["w"]), sum(np.asarray(g, np.float64) ** 2 for g in grads), rtol=1e-6
    )
    # AdaGrad's graft norm differs from Adam's: the two options give different steps.
    adam = shampoo_reference(grads, **HP, factor_decay=0.9, freq=freq, grafting="adam")
    assert not np.allclose(want[-1], adam[-1], rtol=1e-2)


def test_adagrad_grafting_before_preconditioning_is_adagrad_with_momentum():
    # Before start_preconditioning_step the update is the graft's own:
    # m_hat / (sqrt(sum g^2) + eps).
    grads = _grads((4, 3), 4, seed=3)
    tx = lo.scale_by_shampoo(**HP, grafting="adagrad", start_preconditioning_step=100)
    got, _ = _run(tx, grads)
    mu, acc = np.zeros((4, 3)), np.zeros((4, 3))
    for t, (g, u) in enumerate(zip(grads, got), 1):
        g = np.asarray(g, np.float64)
        mu = HP["b1"] * mu + (1 - HP["b1"]) * g
        acc = acc + g**2
        want = mu / (1 - HP["b1"] ** t) / (np.sqrt(acc) + HP["eps"])
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-7)


def test_adagrad_grafting_keeps_a_nan_gradient_out_of_the_sum():
    tx = lo.shampoo(1e-2, grafting="adagrad", precondition_frequency=1)
    params = {"w": jnp.zeros((3, 2))}
    state = tx.init(params)
    g = {"w": jnp.ones((3, 2))}
    _, state = tx.update(g, state, params)
    _, state = tx.update({"w": jnp.full((3, 2), jnp.nan)}, state, params)
    inner = state[0]
    np.testing.assert_array_equal(np.asarray(inner.nu["w"]), np.ones((3, 2)))
    assert lo.failure_report(state).skipped == 1
