"""Steepest descent under per-layer norms: dual maps vs float64 oracles, reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo

ALL_SIGN = {r: "sign" for r in lo.ROLES}


def _params():
    return {
        "embed": {"embedding": jnp.zeros((20, 6))},
        "hidden": {"kernel": jnp.zeros((6, 10)), "bias": jnp.zeros(10)},
        "head": {"kernel": jnp.zeros((10, 4))},
    }


def _grads(i):
    p = _params()
    keys = jax.random.split(jax.random.key(i), 4)
    leaves, treedef = jax.tree.flatten(p)
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_sign_everywhere_without_momentum_is_sign_descent():
    tx = lo.steepest_descent(0.1, norms=ALL_SIGN, scales={r: 1.0 for r in lo.ROLES}, beta=0.0)
    g = _grads(0)
    u, _ = tx.update(g, tx.init(_params()), _params())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, -0.1 * jnp.sign(b)), u, g)
    # ... and optax's own sign descent agrees.
    ref = optax.chain(optax.scale_by_sign(), optax.scale(-0.1))
    ur, _ = ref.update(g, ref.init(_params()))
    jax.tree.map(np.testing.assert_array_equal, u, ur)


@pytest.mark.parametrize("nesterov", [True, False])
def test_spectral_norm_on_hidden_matrices_is_muon(nesterov):
    params = {"a": jnp.zeros((6, 10)), "b": jnp.zeros((12, 5))}
    ours = lo.scale_by_steepest_descent(
        norms={"matrix": "spectral"}, beta=0.95, nesterov=nesterov, ns_coeffs="standard"
    )
    # steepest descent runs the standard iteration (Muon's 'auto' would take the
    # Gram one on the 12 x 5 leaf: the same result to float32 round-off, ~1e-6).
    muon = lo.scale_by_muon(beta=0.95, nesterov=nesterov, scaling="none", ns_method="standard")
    so, sm = ours.init(params), muon.init(params)
    for i in range(4):
        keys = jax.random.split(jax.random.key(i))
        g = {n: jax.random.normal(k, x.shape) for (n, x), k in zip(params.items(), keys)}
        uo, so = ours.update(g, so)
        um, sm = muon.update(g, sm)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), uo, um)
    # rms_spectral is Muon's 'width' scaling when fan_out >= fan_in.
    ours = lo.scale_by_steepest_descent(beta=0.0, ns_coeffs="standard")
    muon = lo.scale_by_muon(beta=0.0, nesterov=False, ns_method="standard")
    g = {"a": jax.random.normal(jax.random.key(7), (6, 10))}
    uo, _ = ours.update(g, ours.init({"a": g["a"]}))
    um, _ = muon.update(g, muon.init({"a": g["a"]}))
    np.testing.assert_allclose(uo["a"], um["a"], atol=1e-6)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e3])
def test_spectral_direction_is_the_polar_factor(cond):
    rng = np.random.default_rng(int(cond))
    u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((14, 8)))
    g = (u * np.logspace(0, -np.log10(cond), 8)) @ v.T
    tx = lo.scale_by_steepest_descent(norms={"matrix": "spectral"}, beta=0.0, ns_steps=10)
    upd, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": jnp.zeros((8, 14))}))
    np.testing.assert_allclose(upd["w"], u @ v.T, atol=2e-3)


def test_dual_maps_against_float64_oracles():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 7))
    g[2] = 0.0  # an all-zero row stays zero
    d, dual = lo._steepest.dual_map(jnp.asarray(g), "row_l2")
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(
        d, np.where(norms > 0, g / np.where(norms > 0, norms, 1), 0), atol=1e-6
    )
    np.testing.assert_allclose(dual, norms.sum(), rtol=1e-6)
    d, dual = lo._steepest.dual_map(jnp.asarray(g), "rms")
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(d) ** 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(dual, np.linalg.norm(g) * np.sqrt(g.size), rtol=1e-6)
    d, dual = lo._steepest.dual_map(jnp.zeros((3, 4)), "l2")
    np.testing.assert_array_equal(d, 0.0)
    # Each dual map attains its dual norm: <g, d> = ||g||_*.
    for norm in ("row_l2", "sign", "rms", "l2"):
        d, dual = lo._steepest.dual_map(jnp.asarray(g), norm)
        np.testing.assert_allclose(np.sum(g * np.asarray(d)), dual, rtol=1e-5, err_msg=norm)


def test_default_roles_norms_and_scales():
    tx = lo.scale_by_steepest_descent(beta=0.0)
    g = _grads(3)
    u, _ = tx.update(g, tx.init(_params()))
    emb = np.asarray(u["embed"]["embedding"])
    np.testing.assert_allclose(np.sqrt(np.mean(emb**2, axis=1)), 1.0, rtol=1e-5)  # rows RMS 1
    np.testing.assert_allclose(u["head"]["kernel"], jnp.sign(g["head"]["kernel"]) / 10, atol=0)
    np.testing.assert_allclose(
        np.sqrt(np.mean(np.asarray(u["hidden"]["bias"]) ** 2)), 1.0, rtol=1e-5
    )
    s = np.linalg.svd(np.asarray(u["hidden"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s, np.sqrt(10 / 6), rtol=0.15)  # 5 Polar-Express steps


def test_dual_scale_gives_the_unnormalized_step():
    tx = lo.scale_by_steepest_descent(
        norms=ALL_SIGN, scales={"matrix": 1.0}, beta=0.0, dual_scale=True
    )
    g = {"w": jnp.asarray([[1.0, -2.0], [3.0, 0.5]])}
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], 6.5 * jnp.sign(g["w"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norms={"matrix": "nuclear"}), r"Unknown norms\['matrix'\] 'nuclear'"),
        (dict(norms={"hidden": "spectral"}), "Unknown norms key 'hidden'"),
        (dict(scales={"head": -1.0}), r"scales\['head'\] must be >= 0"),
        (dict(ns_steps=0), "ns_steps must be >= 1"),
        (dict(ns_coeffs="quintic"), "Unknown ns_coeffs preset 'quintic'"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.steepest_descent(0.1, **kwargs)


def test_spectral_norm_on_a_vector_names_the_path():
    tx = lo.steepest_descent(0.1, norms={"vector": "spectral"})
    with pytest.raises(ValueError, match=r"param hidden/bias with shape \(10,\).*needs a matrix"):
        tx.init(_params())
