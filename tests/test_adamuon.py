"""AdaMuon's element-wise second moment (``element_b2``) against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import linalg
from tests.test_muon import _ns_oracle


def _adamuon_reference(grads, lr, beta, b2, *, scaling, rms=0.2, eps=1e-8, steps=5):
    """Muon with AdaMuon's element-wise second moment (Si et al. 2025), float64.

    One Flax ``(in, out)`` matrix, heavy-ball momentum. ``V`` is the EMA of ``O * O``;
    ``O / (sqrt(V / (1 - b2^t)) + eps)`` is brought back to ``||O||_F`` and then
    scaled as Muon scales: ``'rms'`` to RMS ``rms`` by its measured norm (the paper's
    ``0.2 sqrt(mn) / ||O'||_F``), ``'width'`` by ``sqrt(max(1, out / in))``.
    """
    coeffs = np.asarray(linalg.ns_coefficients("standard", steps), np.float64)
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    w = np.zeros_like(grads[0])
    for t, g in enumerate(grads, 1):
        m = beta * m + (1 - beta) * g
        o = _ns_oracle(m, coeffs)
        v = b2 * v + (1 - b2) * o * o
        a = o / (np.sqrt(v / (1 - b2**t)) + eps)
        a = a * np.linalg.norm(o) / np.linalg.norm(a)
        if scaling == "rms":
            a = a * rms * np.sqrt(a.size) / np.linalg.norm(a)
        else:
            a = a * np.sqrt(max(1.0, a.shape[1] / a.shape[0]))
        w = w - lr * a
    return w


def _run(tx, params, grads):
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for g in grads:
        u, state = step({"hidden": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, u)
    return p, state


@pytest.mark.parametrize("scaling", ["rms", "width"])
@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_adamuon_matches_a_float64_reference(scaling, shape):
    rng = np.random.default_rng(0)
    # Columns scaled very differently, so the element-wise normalization matters.
    grads = [rng.standard_normal(shape) * np.logspace(0, 2, shape[1]) for _ in range(5)]
    tx = lo.muon(0.1, beta=0.9, nesterov=False, element_b2=0.8, scaling=scaling)
    p, state = _run(tx, {"hidden": jnp.zeros(shape)}, grads)
    want = _adamuon_reference(grads, 0.1, 0.9, 0.8, scaling=scaling)
    # Newton-Schulz in float32 of momenta with column ratios up to 100: ~1e-3 relative.
    np.testing.assert_allclose(p["hidden"], want, rtol=2e-3, atol=2e-4)
    inner = state.inner_states["muon"].inner_state[0]
    assert inner.nu["hidden"].shape == (1, *shape) and inner.nu["hidden"].dtype == jnp.float32


def test_adamuon_rank_deficient_leaf():
    # A rank-one gradient: the polar factor is rank one, and so is everything after.
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal(6), rng.standard_normal(4)
    grads = [np.outer(u, v) * (1 + 0.1 * k) for k in range(4)]
    tx = lo.muon(0.1, beta=0.9, nesterov=False, element_b2=0.9, scaling="rms")
    p, _ = _run(tx, {"hidden": jnp.zeros((6, 4))}, grads)
    want = _adamuon_reference(grads, 0.1, 0.9, 0.9, scaling="rms")
    np.testing.assert_allclose(p["hidden"], want, rtol=2e-3, atol=2e-4)


def test_first_step_is_the_sign_of_the_polar_factor():
    # At t = 1, V / (1 - b2) = O * O, so the direction is sign(O), rescaled to ||O||_F.
    rng = np.random.default_rng(2)
    g = rng.standard_normal((8, 5))
    tx = lo.scale_by_muon(beta=0.9, nesterov=False, element_b2=0.95, scaling="none")
    params = {"hidden": jnp.zeros((8, 5))}
    u, _ = tx.update({"hidden": jnp.asarray(g, jnp.float32)}, tx.init(params), params)
    plain = lo.scale_by_muon(beta=0.9, nesterov=False, scaling="none")
    o, _ = plain.update({"hidden": jnp.asarray(g, jnp.float32)}, plain.init(params), params)
    o = np.asarray(o["hidden"], np.float64)
    want = np.sign(o) * np.linalg.norm(o) / np.sqrt(o.size)
    np.testing.assert_allclose(np.asarray(u["hidden"]), want, rtol=1e-5, atol=1e-6)


def test_stacked_leaf_and_nnx_state():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, rngs=rngs)
            self.l2 = nnx.Linear(6, 6, rngs=rngs)
            self.out = nnx.Linear(6, 1, rngs=rngs)

    params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) + jnp.arange(x.size).reshape(x.shape), params)
    tx = lo.muon(0.01, element_b2=0.9)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(grads, state, params)
    inner = state.inner_states["muon"].inner_state[0]
    shapes = [x.shape for x in jax.tree.leaves(inner.nu) if x.ndim]
    assert (1, 6, 6) in shapes  # the hidden l2 kernel: one moment per entry
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_element_and_neuron_second_moments_exclude_each_other():
    with pytest.raises(ValueError, match="element_b2"):
        lo.muon(0.02, element_b2=0.9, neuron_b2=0.9)
    with pytest.raises(ValueError, match="element_b2"):
        lo.scale_by_muon(element_b2=1.0)
