"""K-FAC against a dense float64 Kronecker reference, the paper's updates, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import DimensionNumbers as DN
from tests._helpers import assert_recovers, random_psd


def _stats_seq(rng, d_in, d_out, n, batch=()):
    a = [random_psd(rng, d_in, 30.0) + 0.1 * np.eye(d_in) for _ in range(n)]
    g = [random_psd(rng, d_out, 10.0) + 0.1 * np.eye(d_out) for _ in range(n)]
    if batch:
        a = [np.stack([x * (1 + i) for i in range(batch[0])]) for x in a]
        g = [np.stack([x for _ in range(batch[0])]) for x in g]
    return a, g


def kfac_reference(grads, a_seq, g_seq, *, momentum, decay, damping, mode, freq, sides="both"):
    """Naive float64 K-FAC on one (in, out) kernel: explicit np.kron and solves."""
    d_in, d_out = grads[0].shape
    a_ema, g_ema = np.zeros((d_in, d_in)), np.zeros((d_out, d_out))
    mu = np.zeros((d_in, d_out))
    out = []
    inv = None
    for t, (gr, a, g) in enumerate(zip(grads, a_seq, g_seq), start=1):
        a_ema = decay * a_ema + (1 - decay) * a
        g_ema = decay * g_ema + (1 - decay) * g
        if (t - 1) % freq == 0:
            ah, gh = a_ema / (1 - decay**t), g_ema / (1 - decay**t)
            if mode == "pi" and sides == "both":
                # One-sided: A ⊗ I + damping I = (A + damping I) ⊗ I, no pi split.
                pi = np.sqrt((np.trace(ah) / d_in) / (np.trace(gh) / d_out))
                da, dg = pi * np.sqrt(damping), np.sqrt(damping) / pi
            else:
                da = dg = damping
            left = ah + da * np.eye(d_in) if sides != "output" else np.eye(d_in)
            right = gh + dg * np.eye(d_out) if sides != "input" else np.eye(d_out)
            inv = np.linalg.inv(np.kron(left, right))
        u = (inv @ np.asarray(gr, np.float64).reshape(-1)).reshape(d_in, d_out)
        mu = momentum * mu + (1 - momentum) * u  # EMA momentum, not bias-corrected
        out.append(mu)
    return out


@pytest.mark.parametrize(
    "mode,freq,sides",
    [
        ("absolute", 1, "both"),
        ("pi", 1, "both"),
        ("pi", 3, "both"),
        ("absolute", 2, "input"),
        ("pi", 1, "output"),
    ],
)
def test_matches_dense_kron_reference(mode, freq, sides):
    rng = np.random.default_rng(0)
    d_in, d_out, n = 4, 3, 6
    a_seq, g_seq = _stats_seq(rng, d_in, d_out, n)
    grads = [rng.standard_normal((d_in, d_out)).astype(np.float32) for _ in range(n)]
    hp = dict(momentum=0.5, damping=1e-2)
    tx = lo.scale_by_kfac(
        **hp, factor_decay=0.8, damping_mode=mode, precondition_frequency=freq, sides=sides
    )
    params = {"w": jnp.zeros((d_in, d_out))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    want = kfac_reference(grads, a_seq, g_seq, **hp, decay=0.8, mode=mode, freq=freq, sides=sides)
    for t, (gr, a, g) in enumerate(zip(grads, a_seq, g_seq)):
        stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32))}
        u, state = update({"w": jnp.asarray(gr)}, state, params, kfac_stats=stats)
        np.testing.assert_allclose(
            np.asarray(u["w"]), want[t], rtol=2e-4, atol=1e-5, err_msg=f"step {t}"
        )


def test_stacked_layers_and_conv_kernels():
    rng = np.random.default_rng(1)
    # Stacked (L, in, out) kernels: each layer slice has its own factors.
    a = np.stack([random_psd(rng, 3, 10.0) + np.eye(3) for _ in range(2)])
    g = np.stack([random_psd(rng, 2, 10.0) + np.eye(2) for _ in range(2)])
    grad = rng.standard_normal((2, 3, 2)).astype(np.float32)
    # A 2x2 conv from 3 to 2 channels: the input factor is over (kh, kw, c_in) = 12.
    ac = random_psd(rng, 12, 10.0) + np.eye(12)
    gc = random_psd(rng, 2, 10.0) + np.eye(2)
    gradc = rng.standard_normal((2, 2, 3, 2)).astype(np.float32)
    params = {"stack": jnp.zeros((2, 3, 2)), "conv": jnp.zeros((2, 2, 3, 2))}
    spec = {"stack": DN(((1,), (2,)), batch_axes=(0,)), "conv": DN(((0, 1, 2), (3,)))}
    tx = lo.scale_by_kfac(
        momentum=0.0, factor_decay=1.0, damping=0.0, damping_mode="absolute", dimension_numbers=spec
    )
    stats = {
        "stack": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)),
        "conv": lo.KfacFactors(jnp.asarray(ac, jnp.float32), jnp.asarray(gc, jnp.float32)),
    }
    u, _ = tx.update(
        {"stack": jnp.asarray(grad), "conv": jnp.asarray(gradc)},
        tx.init(params),
        params,
        kfac_stats=stats,
    )
    for i in range(2):
        want = np.linalg.solve(a[i], grad[i]) @ np.linalg.inv(g[i])
        np.testing.assert_allclose(np.asarray(u["stack"][i]), want, rtol=1e-3, atol=1e-5)
    want = (np.linalg.solve(ac, gradc.reshape(12, 2)) @ np.linalg.inv(gc)).reshape(2, 2, 3, 2)
    np.testing.assert_allclose(np.asarray(u["conv"]), want, rtol=1e-3, atol=1e-5)


def test_one_step_with_unit_output_factor_is_least_squares():
    # Linear regression y = x W (Flax layout). With A = Sigma_x, B = I (the Gauss-Newton
    # factor of a unit-variance Gaussian output), lr = 1 and no damping, one K-FAC step
    # from W = 0 lands on the least-squares solution: the paper's K-FAC step with
    # eta_G = 1 is exactly least squares.
    rng = np.random.default_rng(2)
    n, d_in, d_out = 200, 5, 3
    x = rng.standard_normal((n, d_in)) @ np.diag(np.logspace(0, 2, d_in))
    y = x @ rng.standard_normal((d_in, d_out)) + 0.1 * rng.standard_normal((n, d_out))
    params = {"w": jnp.zeros((d_in, d_out), jnp.float32)}
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((jnp.asarray(x, jnp.float32) @ p["w"] - y) ** 2, -1))
    stats = {"w": lo.KfacFactors(jnp.asarray(x.T @ x / n, jnp.float32), jnp.eye(d_out))}
    tx = lo.kfac(1.0, momentum=0.0, damping=0.0, damping_mode="absolute")
    u, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, kfac_stats=stats)
    w_ls = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(u["w"]), w_ls, rtol=2e-3, atol=2e-4)


def test_leaves_without_stats_use_the_damped_diagonal_fisher():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = lo.scale_by_kfac(momentum=0.0, b2=0.9, damping=1e-2)
    g = {"w": jnp.ones((3, 2)), "b": jnp.asarray([0.5, -2.0])}
    u, _ = tx.update(g, tx.init(params), params, kfac_stats={"w": None, "b": None})
    for k in g:
        gk = np.asarray(g[k])
        np.testing.assert_allclose(np.asarray(u[k]), gk / (gk**2 + 1e-2), rtol=1e-5)


def test_missing_stats_is_a_clear_error():
    tx = lo.kfac(0.1)
    params = {"w": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="kfac_stats=stats"):
        tx.update(params, tx.init(params), params)


def test_stats_of_the_wrong_shape_name_the_path():
    tx = lo.kfac(0.1)
    params = {"dense": {"kernel": jnp.zeros((3, 2))}}
    bad = {"dense": {"kernel": lo.KfacFactors(jnp.eye(4), jnp.eye(2))}}
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]: factor a has shape \(4, 4\)"):
        tx.update(params, tx.init(params), params, kfac_stats=bad)


def test_spec_must_have_two_groups():
    tx = lo.kfac(0.1, dimension_numbers={"w": DN(((0,), (1,), (2,)))})
    with pytest.raises(ValueError, match=r"\['w'\].*exactly two factor groups"):
        tx.init({"w": jnp.zeros((2, 3, 4))})


def test_non_finite_stats_or_gradients_are_skipped_and_counted():
    params = {"w": jnp.zeros((3, 2))}
    tx = lo.kfac(0.1)
    update = jax.jit(tx.update)
    state = tx.init(params)
    good = {"w": lo.KfacFactors(jnp.eye(3), jnp.eye(2))}
    g = lambda i: {"w": jax.random.normal(jax.random.key(i), (3, 2))}
    _, state = update(g(0), state, params, kfac_stats=good)
    before = state[0]
    bad_stats = {"w": lo.KfacFactors(jnp.full((3, 3), jnp.nan), jnp.eye(2))}
    u, state = update(g(1), state, params, kfac_stats=bad_stats)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    np.testing.assert_array_equal(
        np.asarray(state[0].factors["w"][0]), np.asarray(before.factors["w"][0])
    )
    bad_grad = {"w": g(2)["w"].at[0, 0].set(jnp.inf)}
    _, state = update(bad_grad, state, params, kfac_stats=good)
    assert int(state[0].failures.skipped) == 2
    stats_update = lambda g_, s, p: update(g_, s, p, kfac_stats=good)
    assert_recovers(stats_update, state, params, g)


INVALID = [
    (dict(momentum=1.0), "momentum must be in"),
    (dict(damping=-1.0), "damping must be >= 0"),
    (dict(factor_decay=1.5), "factor_decay must be in"),
    (dict(precondition_frequency=0), "precondition_frequency must be >= 1"),
    (dict(damping_mode="relative"), "Unknown damping_mode 'relative'"),
    (dict(sides="left"), "Unknown sides 'left'"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
]


@pytest.mark.parametrize("kwargs,match", INVALID, ids=[next(iter(k)) for k, _ in INVALID])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.kfac(0.1, **kwargs)
    with pytest.raises(ValueError, match="learning_rate"):
        lo.kfac(-0.1)


def test_momentum_is_named_momentum_not_b1():
    # K-FAC's momentum is an EMA of preconditioned steps without bias correction, not
    # Adam's/optax's bias-corrected b1 (issue 14): the old name is gone, not aliased.
    for factory, args in ((lo.kfac, (0.1,)), (lo.scale_by_kfac, ())):
        with pytest.raises(TypeError, match="b1"):
            factory(*args, b1=0.9)
    params, stats = {"w": jnp.zeros((3, 2))}, {"w": lo.KfacFactors(jnp.eye(3), jnp.eye(2))}
    tx = lo.scale_by_kfac(momentum=0.75, damping=0.0, damping_mode="absolute")
    state = tx.init(params)
    for t in range(2):
        u, state = tx.update({"w": jnp.ones((3, 2))}, state, params, kfac_stats=stats)
        # m_t = 1 - 0.75^t for constant unit steps: no 1 / (1 - 0.75^t) correction.
        np.testing.assert_allclose(np.asarray(u["w"]), 1 - 0.75 ** (t + 1), rtol=1e-6)


# ----------------------------------------------------------------------------- biases and paths


def test_user_built_folded_bias_on_stacked_layers_matches_float64():
    # Plain dicts, no flax: a stacked (L, in, out) kernel with its (L, out) bias folded.
    # Per slice: [U_W; u_b] = (A_hat + lam)^-1 [G_W; g_b] (B + lam)^-1 on the
    # homogeneous (in + 1) input factor.
    rng = np.random.default_rng(3)
    lam = 1e-3
    a = np.stack([random_psd(rng, 4, 10.0) + np.eye(4) for _ in range(2)])
    g = np.stack([random_psd(rng, 3, 10.0) + np.eye(3) for _ in range(2)])
    gw = rng.standard_normal((2, 3, 3)).astype(np.float32)
    gb = rng.standard_normal((2, 3)).astype(np.float32)
    params = {"stack": {"w": jnp.zeros((2, 3, 3)), "b": jnp.zeros((2, 3))}}
    dims = {"stack": {"w": DN(((1,), (2,)), batch_axes=(0,)), "b": lo.FoldedBias("stack/w")}}
    tx = lo.scale_by_kfac(
        momentum=0.0, factor_decay=0.0, damping=lam, damping_mode="absolute", dimension_numbers=dims
    )
    stats = {
        "stack": {
            "w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)),
            "b": lo.FoldedBias("stack/w"),
        }
    }
    grads = {"stack": {"w": jnp.asarray(gw), "b": jnp.asarray(gb)}}
    u, state = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    for i in range(2):
        hom = np.vstack([gw[i], gb[i][None]]).astype(np.float64)
        want = np.linalg.solve(a[i] + lam * np.eye(4), hom) @ np.linalg.inv(g[i] + lam * np.eye(3))
        np.testing.assert_allclose(u["stack"]["w"][i], want[:3], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(u["stack"]["b"][i], want[3], rtol=1e-3, atol=1e-5)
    assert state.factors["stack"]["w"][0].shape == (2, 4, 4)


def test_flax_named_biases_are_folded_by_default():
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    a = np.array([[2.0, 0.3, 0.1, 0.5], [0.3, 1.0, 0.0, 0.2], [0.1, 0.0, 1.5, 0.1]])
    a = np.vstack([a, [0.5, 0.2, 0.1, 1.0]])
    stats = {
        "dense": {
            "kernel": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.eye(2)),
            "bias": lo.FoldedBias("dense/kernel"),
        }
    }
    grads = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.asarray([1.0, -1.0])}}
    tx = lo.scale_by_kfac(momentum=0.0, factor_decay=0.0, damping=0.0, damping_mode="absolute")
    u, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    want = np.linalg.solve(a, np.vstack([np.ones((3, 2)), [1.0, -1.0]]))
    np.testing.assert_allclose(u["dense"]["kernel"], want[:3], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u["dense"]["bias"], want[3], rtol=1e-4, atol=1e-6)


def _dense_layer():
    params = {
        "l": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
        "norm": {"scale": jnp.ones(2)},
    }
    return params, jax.tree.map(jnp.ones_like, params)


SEPARATE = {
    "l": {"kernel": DN(((0,), (1,))), "bias": DN(((), (0,)))},
    "norm": {"scale": None},
}

BAD_STATS = [
    # Statistics that match no leaf (e.g. `.value`-suffixed or misspelled paths).
    (
        None,
        {"l": {"kernel": None, "bias": None}, "lin": {"kernel": "KF3"}},
        r"\['lin'\]\['kernel'\] match no parameter",
    ),
    # The old (unfolded) form against the default, folded layout.
    (None, {"l": {"kernel": "KF3", "bias": None}}, r"folds this bias into kernel 'l/kernel'"),
    (
        None,
        {"l": {"kernel": "KF3", "bias": lo.FoldedBias("l/kernel")}},
        r"homogeneous coordinates, \(4, 4\)",
    ),
    (
        None,
        {"l": {"kernel": "KF4", "bias": lo.FoldedBias("x/kernel")}},
        r"folds this bias into 'l/kernel'",
    ),
    (
        None,
        {"l": {"kernel": None, "bias": lo.FoldedBias("l/kernel")}},
        r"the kernel has no KfacFactors",
    ),
    # A forgotten leaf of a layer that has statistics.
    (SEPARATE, {"l": {"kernel": "KF3"}}, r"layer of param \['l'\]\['bias'\] but no entry"),
    (
        SEPARATE,
        {"l": {"kernel": "KF3", "bias": lo.FoldedBias("l/kernel")}},
        r"does not fold this leaf",
    ),
    (
        SEPARATE,
        {"l": {"kernel": "KF3", "bias": None}, "norm": {"scale": "KF3"}},
        r"has no K-FAC layout",
    ),
    (
        None,
        {"l": {"kernel": jnp.eye(3), "bias": None}},
        r"must be a KfacFactors\(a, g\), a KfacDiagonal, a FoldedBias or None",
    ),
]


@pytest.mark.parametrize("dims,stats,match", BAD_STATS)
def test_statistics_that_do_not_fit_the_layout_name_the_path(dims, stats, match):
    kf = {
        "KF3": lo.KfacFactors(jnp.eye(3), jnp.eye(2)),
        "KF4": lo.KfacFactors(jnp.eye(4), jnp.eye(2)),
    }
    stats = jax.tree.map(
        lambda s: kf.get(s, s) if isinstance(s, str) else s,
        stats,
        is_leaf=lambda s: isinstance(s, (str, lo.FoldedBias)),
    )
    params, grads = _dense_layer()
    tx = lo.kfac(0.1, dimension_numbers=dims)
    with pytest.raises(ValueError, match=match):
        tx.update(grads, tx.init(params), params, kfac_stats=stats)


def test_deliberate_none_and_unseen_layers_keep_the_diagonal_fallback():
    # None on purpose (here a whole folded pair) and layers the statistics do not
    # mention at all (the norm) take g / (g^2 + damping); the separate bias block
    # with its own factors is preconditioned by them.
    params, grads = _dense_layer()
    grads = jax.tree.map(lambda g: 0.5 * g, grads)
    tx = lo.scale_by_kfac(momentum=0.0, b2=0.0, damping=1e-2)
    u, _ = tx.update(
        grads, tx.init(params), params, kfac_stats={"l": {"kernel": None, "bias": None}}
    )
    for v in jax.tree.leaves(u):
        np.testing.assert_allclose(v, 0.5 / (0.25 + 1e-2), rtol=1e-5)
    tx = lo.scale_by_kfac(
        momentum=0.0,
        factor_decay=0.0,
        damping=0.0,
        damping_mode="absolute",
        dimension_numbers=SEPARATE,
    )
    stats = {
        "l": {
            "kernel": lo.KfacFactors(jnp.eye(3), jnp.eye(2)),
            "bias": lo.KfacFactors(jnp.full((1, 1), 4.0), 2 * jnp.eye(2)),
        }
    }
    u, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(u["l"]["bias"], 0.5 / 8.0, rtol=1e-6)
    np.testing.assert_allclose(u["l"]["kernel"], 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "bias_spec,match",
    [
        (
            lo.FoldedBias("l/w"),
            r"\['l'\]\['bias'\]: dimension_numbers fold it into kernel 'l/w', which is not a leaf",
        ),
        (lo.FoldedBias("norm/scale"), r"which has no K-FAC layout"),
    ],
)
def test_bad_folds_in_the_layout_raise_at_init(bias_spec, match):
    params, _ = _dense_layer()
    dims = {"l": {"kernel": DN(((0,), (1,))), "bias": bias_spec}, "norm": {"scale": None}}
    with pytest.raises(ValueError, match=match):
        lo.kfac(0.1, dimension_numbers=dims).init(params)
    params["l"]["bias"] = jnp.zeros(3)
    dims["l"]["bias"] = lo.FoldedBias("l/kernel")
    with pytest.raises(
        ValueError, match=r"must have the kernel's batch and output axes' shape \(2,\)"
    ):
        lo.kfac(0.1, dimension_numbers=dims).init(params)


def test_folded_bias_marker_is_a_static_pytree():
    marker = lo.FoldedBias("l/kernel")
    assert jax.tree.leaves({"b": marker}) == []
    assert jax.jit(lambda t: t)({"b": marker, "x": jnp.ones(1)})["b"] == marker
    with pytest.raises(TypeError, match="FoldedBias.kernel must be"):
        lo.FoldedBias(("l", "kernel"))


def test_statistics_of_masked_leaves_are_not_stray():
    # Inside optax.masked the other leaves are MaskedNode: their statistics belong to
    # another transform and are neither an error nor used here.
    import optax

    params = {"w": jnp.zeros((3, 2)), "v": jnp.zeros((3, 2))}
    stats = {
        "w": lo.KfacFactors(2 * jnp.eye(3), jnp.eye(2)),
        "v": lo.KfacFactors(jnp.eye(3), jnp.eye(2)),
    }
    tx = optax.masked(
        lo.scale_by_kfac(momentum=0.0, factor_decay=0.0, damping=0.0, damping_mode="absolute"),
        {"w": True, "v": False},
    )
    grads = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    np.testing.assert_allclose(u["w"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(u["v"], 1.0)


@pytest.mark.parametrize("cond", [1e3, 1e4, 3e4], ids=lambda c: f"cond{c:g}")
def test_small_damping_step_matches_float64_for_the_same_float32_factors(cond):
    # Issue 20 item 4: statistics of ill-conditioned inputs and output gradients
    # (condition numbers `cond`, rotated), the gradient X^T D / n in their span.
    # At damping 1e-8..1e-10 the float32 step (Cholesky factors applied by
    # triangular solves) stays within 1e-3 of the float64 solve with the same
    # float32 factors and gradient.
    rng = np.random.default_rng(int(np.log10(cond)))
    n, d_in, d_out = 512, 48, 24

    def data(d):
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        return (rng.standard_normal((n, d)) * np.logspace(0, -np.log10(cond) / 2, d)) @ q

    x, dl = data(d_in), data(d_out)
    a, b = (x.T @ x / n).astype(np.float32), (dl.T @ dl / n).astype(np.float32)
    g = (x.T @ dl / n).astype(np.float32)
    tx = lo.inject_hyperparams(lo.scale_by_kfac)(
        momentum=0.0, factor_decay=0.0, damping=1.0, damping_mode="absolute"
    )
    params = {"w": jnp.zeros((d_in, d_out))}
    stats = {"w": lo.KfacFactors(jnp.asarray(a), jnp.asarray(b))}
    update = jax.jit(tx.update)
    for damping in (1e-8, 1e-9, 1e-10):
        state = tx.init(params)
        state.hyperparams["damping"] = jnp.asarray(damping, jnp.float32)
        u, state = update({"w": jnp.asarray(g)}, state, params, kfac_stats=stats)
        a64 = a.astype(np.float64) + damping * np.eye(d_in)
        b64 = b.astype(np.float64) + damping * np.eye(d_out)
        want = np.linalg.solve(b64, np.linalg.solve(a64, g.astype(np.float64)).T).T
        err = np.linalg.norm(np.asarray(u["w"], np.float64) - want) / np.linalg.norm(want)
        assert err < 1e-3, (damping, err)
        assert int(state.inner_state.failures.failed) == 0


def test_multi_steps_accumulates_the_statistics_of_every_mini_step():
    # Issue 20 item 3: optax.MultiSteps passes each mini-step's kfac_stats through
    # and keeps the inner state of the last one only, so the emitted update used
    # s2 alone (0.5-1.5 away from the accumulated batch's). lo.multi_steps emits
    # K-FAC's update for the mean gradient and the mean statistics, over several
    # emitted updates (factor EMA, momentum and refreshes carry over).
    rng = np.random.default_rng(5)
    d_in, d_out, k, rounds = 4, 3, 2, 2
    a_seq, g_seq = _stats_seq(rng, d_in, d_out, k * rounds)
    grads = [rng.standard_normal((d_in, d_out)).astype(np.float32) for _ in range(k * rounds)]
    hp = dict(momentum=0.5, factor_decay=0.8, damping=1e-2, damping_mode="pi")
    params = {"w": jnp.zeros((d_in, d_out))}
    as_stats = lambda a, g: {
        "w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32))
    }  # noqa: E731
    ref = lo.scale_by_kfac(**hp)
    ref_state = ref.init(params)
    tx = lo.multi_steps(lo.scale_by_kfac(**hp), k)
    naive = optax.MultiSteps(lo.scale_by_kfac(**hp), k)
    state, naive_state = tx.init(params), naive.init(params)
    update, ref_update, naive_update = (jax.jit(t.update) for t in (tx, ref, naive))
    for r in range(rounds):
        chunk = slice(r * k, (r + 1) * k)
        mean = lambda xs: np.mean(np.stack(xs), axis=0)  # noqa: E731
        want, ref_state = ref_update(
            {"w": jnp.asarray(mean(grads[chunk]))},
            ref_state,
            params,
            kfac_stats=as_stats(mean(a_seq[chunk]), mean(g_seq[chunk])),
        )
        for i in range(r * k, (r + 1) * k):
            g, s = {"w": jnp.asarray(grads[i])}, as_stats(a_seq[i], g_seq[i])
            u, state = update(g, state, params, kfac_stats=s)
            un, naive_state = naive_update(g, naive_state, params, kfac_stats=s)
            if i < (r + 1) * k - 1:
                np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
        np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(want["w"]), rtol=1e-4, atol=1e-6)
        if r == 0:
            assert float(jnp.max(jnp.abs(un["w"] - want["w"]))) > 0.1  # optax's drops s1, s2
    inner = state.inner_opt_state
    assert int(inner.pending_count) == 0
    np.testing.assert_array_equal(np.asarray(inner.pending["w"][0]), 0.0)


def test_multi_steps_is_optax_multi_steps_for_other_optimizers():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    ours, theirs = lo.multi_steps(optax.adam(0.1), 2), optax.MultiSteps(optax.adam(0.1), 2)
    s1, s2 = ours.init(params), theirs.init(params)
    up1, up2 = jax.jit(ours.update), jax.jit(theirs.update)
    for i in range(4):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
        u1, s1 = up1(g, s1, params)
        u2, s2 = up2(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u1, u2)


def test_failed_factorization_keeps_the_last_good_inverse_and_is_counted():
    # Failure policy with stored inverses (by Cholesky): a factor that is not
    # positive definite after damping (finite, so the statistics are accepted)
    # fails to factor; the previous inverse is kept per block and the failure counted.
    tx = lo.scale_by_kfac(momentum=0.0, factor_decay=0.0, damping=0.0, damping_mode="absolute")
    params = {"w": jnp.zeros((3, 2))}
    g = {"w": jnp.asarray(np.arange(6.0).reshape(3, 2), jnp.float32)}
    a1, b1 = np.diag([1.0, 2.0, 4.0]), np.array([[2.0, 0.5], [0.5, 1.0]])
    update = jax.jit(tx.update)
    _, state = update(g, tx.init(params), params, kfac_stats={"w": lo.KfacFactors(a1, b1)})
    good = [np.asarray(x) for x in state.inverses["w"]]
    np.testing.assert_allclose(good[0][0], np.linalg.inv(a1), rtol=1e-6)
    np.testing.assert_allclose(good[1][0], np.linalg.inv(b1), rtol=1e-6)
    bad = {"w": lo.KfacFactors(jnp.diag(jnp.asarray([1.0, -1.0, 2.0])), b1)}
    u, state = update(g, state, params, kfac_stats=bad)
    assert int(state.failures.failed) == 1
    np.testing.assert_array_equal(np.asarray(state.inverses["w"][0]), good[0])
    want = np.linalg.solve(a1, np.asarray(g["w"])) @ np.linalg.inv(b1)
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-5)
