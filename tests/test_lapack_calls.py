"""Every LAPACK call the library makes on CPU factors one matrix.

jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's intra-op thread
pool and block the calling pool thread until the parts finish. Two batched calls
running at once on a 2-core machine (Colab, this project's CI) then wait on each
other forever with the CPU idle: a K-FAC learning-rate grid under ``jax.vmap``
hung CI this way. ``linalg.one_at_a_time_on_cpu`` maps leading axes with
``lax.map`` and gives ``vmap`` a batching rule that does the same; these tests
read the compiled HLO (``num_batch_dims`` of each LAPACK custom call) for the
matrix functions, the optimizers and the zoo, and check values and derivatives
against the plain batched functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _linalg, zoo
from tests._helpers import assert_lapack_unbatched, lapack_calls


def _spd(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    eye = jnp.broadcast_to(jnp.eye(shape[-1]), shape)
    return x @ jnp.swapaxes(x, -1, -2) / shape[-1] + 0.5 * eye


def _upper(a):
    return jnp.triu(a) + 3.0 * jnp.broadcast_to(jnp.eye(a.shape[-1]), a.shape)


MATRIX_FUNCTIONS = {
    "inv_psd_cholesky": lambda a: _linalg.inv_psd_cholesky(a, damping=0.1),
    "cholesky_psd": _linalg.cholesky_psd,
    "cholesky_solve": lambda a: _linalg.cholesky_solve(_linalg.cholesky_psd(a), a[..., :3]),
    "eigh_psd": lambda a: _linalg.eigh_psd(a)[0],
    "inv_root_eigh": lambda a: _linalg.inv_root_eigh(a, 4, damping=1e-3),
    "eigenbasis": _linalg.eigenbasis,
    "refresh_eigenbasis": lambda a: _linalg.refresh_eigenbasis(a, _linalg.eigenbasis(a))[0],
    "solve_upper_transposed": lambda a: _linalg.solve_upper_transposed(_upper(a), a),
}


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_matrix_functions_call_lapack_one_matrix_at_a_time(name):
    fn = MATRIX_FUNCTIONS[name]
    a = _spd((2, 3, 5, 5))
    per_matrix = np.stack([np.stack([np.asarray(fn(a[i, j])) for j in range(3)]) for i in range(2)])
    cases = {
        "leading axes": fn,
        "vmap": jax.vmap(fn),
        "vmap over the second axis": jax.vmap(fn, in_axes=1, out_axes=1),
        "nested vmap": jax.vmap(jax.vmap(fn)),
    }
    for case, f in cases.items():
        assert_lapack_unbatched(f, a)
        got = np.asarray(jax.jit(f)(a))
        np.testing.assert_allclose(got, per_matrix, rtol=2e-5, atol=2e-6, err_msg=case)


def test_a_batched_call_is_what_the_check_detects():
    # The check is not vacuous: plain jnp.linalg under vmap is batched.
    calls = lapack_calls(jax.vmap(jnp.linalg.cholesky), _spd((3, 4, 4)))
    assert calls and all(b == 1 for _, b in calls), calls


def test_derivatives_are_those_of_the_plain_functions():
    a = _spd((4, 4))
    eye = jnp.eye(4)
    pairs = {
        "inv_psd_cholesky": lambda m: jnp.linalg.inv(0.5 * (m + m.T) + 0.1 * eye),
        "solve_upper_transposed": lambda m: jax.scipy.linalg.solve_triangular(
            _upper(m), m, trans="T", lower=False
        ),
    }
    for name, plain in pairs.items():
        ours = MATRIX_FUNCTIONS[name]
        for loss in (lambda f: lambda m: jnp.sum(f(m) ** 2), lambda f: lambda m: jnp.sum(f(m))):
            np.testing.assert_allclose(
                jax.grad(loss(ours))(a), jax.grad(loss(plain))(a), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                jax.jacfwd(ours)(a), jax.jacfwd(plain)(a), rtol=1e-4, atol=1e-5
            )
    # vmap of a derivative goes through LAPACK's own batching (documented limit).
    ours = jax.vmap(jax.grad(lambda m: jnp.sum(MATRIX_FUNCTIONS["inv_psd_cholesky"](m) ** 2)))
    plain = jax.vmap(jax.grad(lambda m: jnp.sum(pairs["inv_psd_cholesky"](m) ** 2)))
    b = _spd((2, 4, 4))
    np.testing.assert_allclose(ours(b), plain(b), rtol=1e-4, atol=1e-5)


def _kfac_stats(params):
    return {
        "w": lo.KfacFactors(a=_spd((6, 6), 3), g=_spd((4, 4), 4)),
        "b": None,
    }


OPTIMIZERS = {
    "kfac": (lo.kfac, {}, True),
    "kfac_eigh": (lo.kfac, {"inverse": "eigh"}, True),
    "kfac_adaptive": (lo.kfac_adaptive, {}, True),
    "shampoo": (lo.shampoo, {"precondition_frequency": 1}, False),
    "shampoo_blocked": (lo.shampoo, {"precondition_frequency": 1, "block_size": 3}, False),
    "soap": (lo.soap, {"precondition_frequency": 1}, False),
    "psgd_kron": (lo.psgd_kron, {}, False),
    # Before the fix, a blocked PSGD step hung a 2-core CPU without any vmap (two
    # leaves' batched triangular solves at once).
    "psgd_kron_blocked": (lo.psgd_kron, {"block_size": 3, "precond_update_prob": 1.0}, False),
    # Dion's Cholesky QR: two Cholesky factors and triangular inverses per pass.
    "dion": (
        lo.dion,
        {"rank": 2, "dimension_numbers": {"w": lo.DimensionNumbers(((0,), (1,))), "b": None}},
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_under_vmap_over_learning_rates_call_lapack_unbatched(name):
    factory, kwargs, needs_stats = OPTIMIZERS[name]
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    grads = {"w": jax.random.normal(jax.random.key(0), (6, 4)), "b": jnp.ones(4)}
    extra = {"kfac_stats": _kfac_stats(params)} if needs_stats else {}
    if name == "kfac_adaptive":
        x = jax.random.normal(jax.random.key(5), (8, 6))
        curvature = lo.KfacCurvature(
            lambda p, x: x @ p["w"] + p["b"][None], lambda z, x: 0.5 * jnp.mean(z**2), x
        )
        extra = {**extra, "curvature": curvature}

    def step(lr):
        tx = lo.inject_hyperparams(factory)(learning_rate=lr, **kwargs)
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params, **extra)
        return updates

    assert_lapack_unbatched(jax.vmap(step), jnp.array([0.1, 0.01, 0.001]))


def test_zoo_metrics_under_vmap_call_lapack_unbatched():
    g = jax.random.normal(jax.random.key(0), (3, 2, 6))
    g_star = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (6, 2)))[0].T
    assert_lapack_unbatched(jax.vmap(lambda x: zoo.subspace_distance(x, g_star)), g)
    z = jax.random.normal(jax.random.key(2), (3, 10, 4))
    y = jax.random.normal(jax.random.key(3), (3, 10, 2))
    assert_lapack_unbatched(jax.vmap(zoo.least_squares_head), z, y)
    heads = jax.vmap(zoo.least_squares_head)(z, y)
    for i in range(3):
        np.testing.assert_allclose(heads[i], zoo.least_squares_head(z[i], y[i]), rtol=1e-5)

    tx = zoo.full_gauss_newton(0.1)
    p = {"w": jnp.ones(3)}

    def gn_step(m):
        return tx.update(p, tx.init(p), gauss_newton=m)[0]["w"]

    assert_lapack_unbatched(jax.vmap(gn_step), _spd((2, 3, 3)))
