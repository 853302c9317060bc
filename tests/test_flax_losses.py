"""K-FAC capture's losses: sigmoid and Gaussian NLL, and exact Gauss-Newton for every loss.

References are dense NumPy float64: the output Fisher ``F_i`` of each example, the
Jacobian of the outputs in each layer's output, and ``B = (1/n) Σ_i J_i^T F_i J_i``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402

LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_cross_entropy", "gaussian_nll")


class MLP(nnx.Module):
    def __init__(self, rngs, d_in=3, d_h=5, d_out=4):
        self.l1 = nnx.Linear(d_in, d_h, rngs=rngs)
        self.l2 = nnx.Linear(d_h, d_out, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _targets(loss, outputs, key):
    """True targets of each loss's kind for outputs of shape (n, units)."""
    n, units = outputs.shape
    if loss == "mse":
        return jax.random.normal(key, (n, units))
    if loss == "softmax_cross_entropy":
        return jax.random.randint(key, (n,), 0, units)
    if loss == "sigmoid_cross_entropy":
        return jax.random.uniform(key, (n, units))  # soft labels in [0, 1]
    return jax.random.normal(key, (n, units // 2))


def _output_fisher(loss, z):
    """Per-example output Fisher ``F_i`` (n, units, units), float64, written out densely."""
    z = np.asarray(z, np.float64)
    n, u = z.shape
    if loss == "mse":
        return np.broadcast_to(np.eye(u), (n, u, u))
    if loss == "softmax_cross_entropy":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return np.stack([np.diag(q) - np.outer(q, q) for q in p])
    if loss == "sigmoid_cross_entropy":
        p = 1 / (1 + np.exp(-z))
        return np.stack([np.diag(q * (1 - q)) for q in p])
    d = u // 2
    return np.stack([np.diag(np.concatenate([np.exp(-r[d:]), np.full(d, 0.5)])) for r in z])


def _dense_reference(model, x, loss):
    """Float64 ``(A_l, B_l)`` of the exact per-layer Gauss-Newton blocks' factors."""
    w1, b1 = (np.asarray(v, np.float64) for v in (model.l1.kernel[...], model.l1.bias[...]))
    w2, b2 = (np.asarray(v, np.float64) for v in (model.l2.kernel[...], model.l2.bias[...]))
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    fis = _output_fisher(loss, z)
    # J_i of the outputs in layer 1's output: diag(1 - h_i^2) W2 (rows: layer units).
    j1 = (1 - h**2)[:, :, None] * w2[None]
    b_1 = np.einsum("iak,ikl,ibl->ab", j1, fis, j1) / n
    b_2 = fis.mean(0)
    xh = np.concatenate([x, np.ones((n, 1))], 1)
    hh = np.concatenate([h, np.ones((n, 1))], 1)
    return {"l1": (xh.T @ xh / n, b_1), "l2": (hh.T @ hh / n, b_2)}


@pytest.mark.parametrize("loss", LOSSES)
def test_gauss_newton_statistics_equal_the_dense_float64_blocks(loss):
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (7, 3))
    y = _targets(loss, model(x), jax.random.key(2))
    f = lof.kfac_value_and_grad(lambda m, x: m(x), loss, statistics="gauss_newton")
    value, grads, stats = f(model, x, y)
    want_value, want_grads = nnx.value_and_grad(lambda m: getattr(lof, loss)(m(x), y))(model)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    ref = _dense_reference(model, x, loss)
    for layer, (a, b) in ref.items():
        np.testing.assert_allclose(stats[layer]["kernel"].a, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[layer]["kernel"].g, b, rtol=1e-4, atol=1e-6)
        assert stats[layer]["bias"] == lo.FoldedBias(f"{layer}/kernel")


@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_mode_mean_over_keys_is_the_gauss_newton_statistic(loss):
    """The Monte-Carlo Fisher is unbiased for the exact block: the mean over many keys
    lies within 5 standard errors of it everywhere, and not of a block 20% off."""
    model = MLP(nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (6, 3))
    y = _targets(loss, model(x), jax.random.key(5))
    gn = lof.kfac_value_and_grad(lambda m, x: m(x), loss, statistics="gauss_newton")
    fisher = lof.kfac_value_and_grad(lambda m, x: m(x), loss, statistics="fisher")
    exact = gn(model, x, y)[2]
    keys = jax.random.split(jax.random.key(6), 2000)
    samples = jax.jit(jax.vmap(lambda k: fisher(model, x, y, k)[2]))(keys)
    for layer in ("l1", "l2"):
        g = np.asarray(samples[layer]["kernel"].g, np.float64)
        mean, se = g.mean(0), g.std(0) / np.sqrt(len(keys))
        want = np.asarray(exact[layer]["kernel"].g, np.float64)
        tol = 5 * se + 1e-6
        assert np.all(np.abs(mean - want) <= tol), (layer, np.max(np.abs(mean - want) / tol))
        assert np.any(np.abs(mean - 1.2 * want) > tol), layer  # the test can tell 20%
        # The input factor does not depend on the labels.
        np.testing.assert_allclose(
            samples[layer]["kernel"].a[0], exact[layer]["kernel"].a, rtol=1e-5, atol=1e-6
        )


def test_gauss_newton_softmax_over_positions_matches_the_fisher_expectation():
    """Outputs (n, T, classes): the loss averages over n T labels, so the statistics are
    scaled like its per-example gradient. A position-wise model has no cross terms."""
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 2, 3))
    y = jnp.zeros((5, 2), jnp.int32)
    gn = lof.kfac_value_and_grad(
        lambda m, x: m(x), "softmax_cross_entropy", statistics="gauss_newton"
    )
    g = np.asarray(gn(model, x, y)[2]["kernel"].g, np.float64)
    z = np.asarray(model(x), np.float64).reshape(10, 4)
    # delta = n dL/dz = (1/T) g per position; B = (1/(n T)) Σ_rows E[delta delta^T].
    want = _output_fisher("softmax_cross_entropy", z).sum(0) / 4 / 10
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_sigmoid_kfac_update_is_the_dense_kronecker_step():
    """One layer, sigmoid cross-entropy: kfac's step from the captured statistics is
    (A + λI)^{-1} Ĝ (B + λI)^{-1} with the dense float64 factors of the exact expectation."""
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (9, 3))
    y = (jax.random.uniform(jax.random.key(3), (9, 2)) > 0.5).astype(jnp.float32)
    f = lof.kfac_value_and_grad(
        lambda m, x: m(x), "sigmoid_cross_entropy", statistics="gauss_newton"
    )
    _, grads, stats = f(model, x, y)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.0, damping=0.01, damping_mode="absolute")
    u: Any = tx.update(nnx.as_pure(grads), tx.init(params), params, kfac_stats=stats)[0]
    xn, w, b = (np.asarray(v, np.float64) for v in (x, model.kernel[...], model.bias[...]))
    z = xn @ w + b
    p = 1 / (1 + np.exp(-z))
    xh = np.concatenate([xn, np.ones((9, 1))], 1)
    a = xh.T @ xh / 9
    bb = np.diag((p * (1 - p)).mean(0))
    grad = xh.T @ (p - np.asarray(y)) / 9  # [dW; db]
    step = -np.linalg.solve(a + 0.01 * np.eye(4), grad) @ np.linalg.inv(bb + 0.01 * np.eye(2))
    np.testing.assert_allclose(u["kernel"], step[:3], rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(u["bias"], step[3], rtol=2e-3, atol=1e-5)


def test_gaussian_nll_outputs_must_be_twice_the_targets():
    with pytest.raises(ValueError, match=r"outputs of shape \(2, 3\) must be \(\.\.\., 2 d\)"):
        lof.gaussian_nll(jnp.zeros((2, 3)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="got targets"):
        lof.gaussian_nll(jnp.zeros((2, 4)), jnp.zeros((2, 1)))


def test_losses_match_their_closed_forms():
    z = jnp.array([[0.3, -1.2], [2.0, 0.1]])
    y = jnp.array([[1.0, 0.0], [0.25, 1.0]])
    p = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
    want = -np.mean(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), 1))
    np.testing.assert_allclose(lof.sigmoid_cross_entropy(z, y), want, rtol=1e-6)
    t = jnp.array([[0.5], [-1.0]])
    mu, s = np.asarray(z[:, :1], np.float64), np.asarray(z[:, 1:], np.float64)
    want = np.mean(0.5 * (np.log(2 * np.pi) + s + (t - mu) ** 2 / np.exp(s)))
    np.testing.assert_allclose(lof.gaussian_nll(z, t), want, rtol=1e-6)


def test_callable_loss_is_empirical_only():
    for mode in ("fisher", "gauss_newton"):
        with pytest.raises(ValueError, match=f"statistics='{mode}' needs a built-in loss"):
            lof.kfac_value_and_grad(lambda m, x: m(x), lambda o, t: jnp.mean(o), statistics=mode)
