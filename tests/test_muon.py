"""Muon and Newton-Schulz: float64 SVD oracles, optax.contrib.muon equivalence, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import linalg

CONDS = [1.0, 1e2, 1e4, 1e6]


def _matrix(rng, m, n, cond):
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    k = min(m, n)
    s = np.logspace(0, -np.log10(cond), k)
    return (u[:, :k] * s) @ v[:, :k].T


def _ns_oracle(x, coeffs):
    """U p(S / ||X||_F) V^T in float64: Newton-Schulz acts on singular values only."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    s = s / (np.linalg.norm(x) + 1e-8)  # the same eps as newton_schulz's default
    for a, b, c in np.asarray(coeffs, np.float64):
        s = a * s + b * s**3 + c * s**5
    return (u * s) @ vt


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (12, 12)])
@pytest.mark.parametrize("preset", ["standard", "dion", "polar_express"])
def test_newton_schulz_matches_the_svd_oracle(cond, shape, preset):
    rng = np.random.default_rng(int(cond) % 31 + shape[0])
    x = _matrix(rng, *shape, cond)
    coeffs = linalg.ns_coefficients(preset, 5)
    with jax.enable_x64(True):
        got = np.asarray(linalg.newton_schulz(jnp.asarray(x), jnp.asarray(coeffs, jnp.float64)))
    np.testing.assert_allclose(got, _ns_oracle(x, coeffs), atol=1e-10)
    got32 = np.asarray(linalg.newton_schulz(jnp.asarray(x, jnp.float32), coeffs))
    np.testing.assert_allclose(got32, _ns_oracle(x, coeffs), atol=2e-4)


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
def test_standard_newton_schulz_singular_values_lie_in_the_documented_band(cond):
    rng = np.random.default_rng(3)
    x = _matrix(rng, 16, 48, cond)
    out = np.asarray(
        linalg.newton_schulz(jnp.asarray(x, jnp.float32), linalg.ns_coefficients("standard", 5))
    )
    u, s_in, vt = np.linalg.svd(x, full_matrices=False)
    s_in = s_in / np.linalg.norm(x)
    # p is not monotone, so pair each input singular value with its own output value
    # (u_i^T out v_i) rather than sorting the output's singular values.
    s_out = np.einsum("mi,mn,in->i", u, out.astype(np.float64), vt)
    assert np.all(s_out <= 1.21)
    big = s_in >= 1e-2
    assert np.all((s_out[big] >= 0.68) & (s_out[big] <= 1.14)), s_out[big]
    mid = (s_in >= 1e-3) & ~big
    assert np.all(s_out[mid] >= 0.47)


@pytest.mark.parametrize(
    "preset, steps, lo, band",
    [
        ("standard", 5, 1e-2, (0.68, 1.14)),
        ("standard", 5, 1e-3, (0.47, 1.21)),
        ("polar_express", 5, 1e-3, (0.84, 1.13)),
        ("polar_express", 8, 1e-3, (1 - 1e-6, 1 + 1e-6)),
        ("polar_express", 12, 1e-3, (1 - 1e-6, 1 + 1e-6)),  # repeats the fixed-point step
        ("cubic", 30, 1e-1, (1 - 1e-6, 1 + 1e-6)),  # converges to the exact polar factor
    ],
)
def test_preset_scalar_maps_stay_in_their_documented_bands(preset, steps, lo, band):
    # Newton-Schulz acts on each normalized singular value by the composed polynomial.
    s = np.logspace(np.log10(lo), 0, 4001)
    for a, b, c in np.asarray(linalg.ns_coefficients(preset, steps), np.float64):
        s = a * s + b * s**3 + c * s**5
    assert band[0] <= s.min() and s.max() <= band[1], (s.min(), s.max())


def test_newton_schulz_zero_in_zero_out_and_nan_gives_finite():
    coeffs = linalg.ns_coefficients("standard", 5)
    z = linalg.newton_schulz(jnp.zeros((2, 4, 6)), coeffs)
    np.testing.assert_array_equal(z, 0.0)
    bad = jnp.ones((4, 6)).at[1, 2].set(jnp.nan)
    out = linalg.newton_schulz(jnp.stack([bad, jnp.eye(4, 6)]), coeffs)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0.0)


def test_enough_polar_express_steps_give_the_exact_polar_factor():
    # Spectral steepest descent: with no momentum the update is U V^T of the gradient.
    rng = np.random.default_rng(0)
    g = _matrix(rng, 6, 10, 30.0)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    tx = lo.scale_by_muon("polar_express", ns_steps=10, beta=0.0, nesterov=False, scaling="none")
    params = {"w": jnp.zeros((6, 10))}
    upd, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params))
    np.testing.assert_allclose(upd["w"], u @ vt, atol=1e-4)


def _mlp_params():
    return {
        "w1": jnp.ones((8, 16)),
        "b1": jnp.zeros(16),
        "w2": jnp.ones((16, 32)),
        "w3": jnp.ones((32, 4)),
        "s": jnp.zeros(()),
    }


def _grads(params, i):
    keys = jax.random.split(jax.random.key(i), len(params))
    return {k: jax.random.normal(kk, v.shape) for (k, v), kk in zip(params.items(), keys)}


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({}, {}),
        (dict(nesterov=False, beta=0.9), dict(nesterov=False, beta=0.9)),
        (
            dict(weight_decay=0.1, adam_learning_rate=3e-3),
            dict(weight_decay=0.1, adam_learning_rate=3e-3),
        ),
        (dict(scaling="rms", rms=0.2), dict(consistent_rms=0.2)),
        (dict(ns_coeffs="dion"), dict(ns_coeffs="dion")),
        (dict(ns_steps=3), dict(ns_steps=3)),
    ],
    ids=["default", "heavy_ball", "decay_adam_lr", "consistent_rms", "dion", "steps3"],
)
def test_muon_equals_optax_contrib_muon(ours, theirs):
    params = _mlp_params()
    # Matched settings: optax orthogonalizes every 2-D leaf, the head (w3) too.
    hidden = lambda p: lo.layer_roles(p, infer_head=False)  # noqa: E731
    a, b = lo.muon(0.02, roles=hidden, **ours), optax.contrib.muon(0.02, **theirs)
    sa, sb = a.init(params), b.init(params)
    pa = pb = params
    for i in range(6):
        g = _grads(params, i)
        ua, sa = jax.jit(a.update)(g, sa, pa)
        ub, sb = jax.jit(b.update)(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for k in params:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=2e-6, err_msg=k)


def test_batch_axes_orthogonalize_each_slice():
    # A conv kernel (kh, kw, in, out): each window position's in x out slice on its own.
    spec = lo.DimensionNumbers(((2,), (3,)), batch_axes=(0, 1))
    tx = lo.scale_by_muon(beta=0.0, nesterov=False, scaling="none", dimension_numbers={"k": spec})
    g = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))
    upd, _ = tx.update({"k": g}, tx.init({"k": g}))
    coeffs = linalg.ns_coefficients("standard", 5)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(
                upd["k"][i, j], _ns_oracle(np.asarray(g[i, j], np.float64), coeffs), atol=2e-4
            )


def test_non_finite_gradient_is_skipped_and_counted():
    tx = lo.scale_by_muon()
    params = {"w": jnp.zeros((4, 6)), "v": jnp.zeros((3, 3))}
    state = tx.init(params)
    g = _grads(params, 0)
    g["w"] = g["w"].at[0, 0].set(jnp.inf)
    u, state = tx.update(g, state)
    np.testing.assert_array_equal(u["w"], 0.0)
    np.testing.assert_array_equal(state.mu["w"], 0.0)
    assert np.all(np.isfinite(u["v"])) and int(state.failures.skipped) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ns_coeffs="polar"), "Unknown ns_coeffs preset 'polar'"),
        (dict(ns_coeffs=(1.0, 2.0)), r"ns_coeffs must have shape \(3,\) or \(n, 3\)"),
        (dict(ns_steps=0), "ns_steps must be >= 1"),
        (dict(beta=1.0), r"beta must be in \[0, 1\)"),
        (dict(scaling="spectral"), "Unknown scaling 'spectral'"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.muon(0.02, **kwargs)


def test_normuon_bad_b2_is_named_as_its_argument():
    with pytest.raises(ValueError, match=r"^b2 must be in \[0, 1\)"):
        lo.normuon(0.02, b2=1.5)


def test_bad_spec_names_the_path():
    tx = lo.scale_by_muon(dimension_numbers={"w": lo.DimensionNumbers(((0,), (1,), (2,)))})
    with pytest.raises(ValueError, match=r"param \['w'\].*exactly two factor groups"):
        tx.init({"w": jnp.zeros((2, 3, 4))})


def _normuon_reference(grads, lr, beta, b2, rms, eps=1e-8, steps=5):
    """NorMuon (Li et al. 2025, Alg. 1) for one Flax (in, out) matrix, float64, heavy ball."""
    coeffs = np.asarray(linalg.ns_coefficients("standard", steps), np.float64)
    m = np.zeros_like(grads[0])
    v = np.zeros(grads[0].shape[1])
    w = np.zeros_like(grads[0])
    for g in grads:
        m = beta * m + (1 - beta) * g
        o = _ns_oracle(m, coeffs)
        v = b2 * v + (1 - b2) * np.mean(o * o, axis=0)  # per output neuron (column)
        o = o / (np.sqrt(v) + eps)
        o = o * rms * np.sqrt(o.size) / np.linalg.norm(o)
        w = w - lr * o
    return w


def test_normuon_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    # Rows scaled very differently so the per-neuron normalization matters.
    grads = [rng.standard_normal((12, 7)) * np.logspace(0, 2, 7) for _ in range(5)]
    tx = lo.normuon(0.1, beta=0.9, b2=0.8, nesterov=False)
    params = {"hidden": jnp.zeros((12, 7))}
    state, p = tx.init(params), params
    for g in grads:
        u, state = jax.jit(tx.update)({"hidden": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, u)
    want = _normuon_reference(grads, 0.1, 0.9, 0.8, 0.2)
    # NS in float32 of momenta with ratios up to 100 across columns: ~1e-3 relative.
    np.testing.assert_allclose(p["hidden"], want, rtol=2e-3, atol=2e-4)
    # The per-neuron step sizes are equalized much more than Muon's.
    mu_upd = lo.muon(0.1, beta=0.9, nesterov=False, scaling="rms")
    s = mu_upd.init(params)
    u_mu, _ = mu_upd.update({"hidden": jnp.asarray(grads[0], jnp.float32)}, s, params)
    col = lambda a: np.sqrt(np.mean(np.asarray(a) ** 2, axis=0))  # noqa: E731
    st = tx.init(params)
    u_no, _ = tx.update({"hidden": jnp.asarray(grads[0], jnp.float32)}, st, params)
    spread = lambda a: col(a).max() / col(a).min()  # noqa: E731
    assert spread(u_no["hidden"]) < 1.01 < spread(u_mu["hidden"])


def test_normuon_state_is_one_float_per_output_neuron():
    params = {"w": jnp.zeros((3, 8, 5)), "b": jnp.zeros(5)}  # stacked layers
    inner = lo.normuon(0.01).init(params).inner_states["muon"].inner_state[0]
    assert inner.nu["w"].shape == (3, 5) and inner.nu["w"].dtype == jnp.float32


def test_muon_routes_leaves_by_role():
    params = {
        "embed": {"embedding": jnp.ones((50, 8))},
        "layers": [{"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}],
        "conv": {"kernel": jnp.ones((3, 3, 4, 8))},
        "lm_head": {"kernel": jnp.ones((8, 50))},
    }
    tx = lo.muon(0.02)
    state = tx.init(params)
    labels = jax.tree.map(
        lambda x: "muon" if not isinstance(x, optax.MaskedNode) else "",
        state.inner_states["muon"].inner_state[0].mu,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    assert labels["layers"][0]["kernel"] == "muon" and labels["conv"]["kernel"] == "muon"
    assert labels["embed"]["embedding"] == "" and labels["lm_head"]["kernel"] == ""
    assert labels["layers"][0]["bias"] == ""
    # The conv kernel is one (3*3*4) x 8 matrix: its update has orthonormal columns.
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
    inner = lo.scale_by_muon(ns_coeffs="polar_express", ns_steps=8, scaling="none")
    u, _ = inner.update(g, inner.init(params))
    k = np.asarray(u["conv"]["kernel"]).reshape(36, 8)
    np.testing.assert_allclose(k.T @ k, np.eye(8), atol=1e-3)
    # Overriding a role moves the head to the orthogonalized side.
    roles = lambda p: lo.layer_roles(p, overrides={"lm_head/kernel": "matrix"})  # noqa: E731
    st = lo.muon(0.02, roles=roles).init(params)
    assert not isinstance(
        st.inner_states["muon"].inner_state[0].mu["lm_head"]["kernel"], optax.MaskedNode
    )


def test_the_inferred_head_goes_to_adam():
    params = _mlp_params()
    assert lo.layer_roles(params)["w3"] == "head"  # 32 -> 4 feeds no other layer
    tx = lo.muon(0.02)
    state = tx.init(params)
    inner = state.inner_states["muon"].inner_state[0]
    assert isinstance(inner.mu["w3"], optax.MaskedNode)
    assert inner.mu["w2"].shape == (16, 32)
    # The matrices left in the muon partition are orthogonalized (the partition sees a
    # masked tree, where a head search would wrongly pick w2): as optax's muon does.
    ref = optax.contrib.muon(0.02)
    g = _grads(params, 0)
    u, _ = tx.update(g, state, params)
    v, _ = ref.update(g, ref.init(params), params)
    for k in ("w1", "w2"):
        np.testing.assert_allclose(u[k], v[k], rtol=1e-5, atol=1e-7, err_msg=k)
    adam = optax.adam(0.02, eps=1e-8, nesterov=True)
    np.testing.assert_allclose(u["w3"], adam.update(g, adam.init(params))[0]["w3"], rtol=2e-5)


def test_the_readme_head_override_works_inside_the_alias():
    # The override names a leaf that the muon partition sees masked: not a typo.
    params = {"layers": [{"kernel": jnp.zeros((8, 8))} for _ in range(3)]}
    roles = lambda p: lo.layer_roles(p, overrides={"layers/2/kernel": "head"})  # noqa: E731
    inner = lo.muon(0.02, roles=roles).init(params).inner_states["muon"].inner_state[0]
    assert isinstance(inner.mu["layers"][2]["kernel"], optax.MaskedNode)
    assert inner.mu["layers"][1]["kernel"].shape == (8, 8)


# Issue 20 item 6: lo.muon(0.1) on {'hidden': {'kernel': (8, 1, 6)}} orthogonalized
# each of the 8 rows alone (row norms 1.706 lr, singular values / lr 1.04-2.82 for
# this gradient); the right update is the (8, 6) matrix's (0.69-1.13).
def _unit_axis_case():
    g = jax.random.normal(jax.random.key(0), (8, 1, 6))
    return {"hidden": {"kernel": jnp.zeros((8, 1, 6))}}, {"hidden": {"kernel": g}}


def test_a_kernel_with_unit_axes_is_one_matrix():
    params, grads = _unit_axis_case()
    assert lo.layer_roles(params)["hidden"]["kernel"] == "matrix"
    tx = lo.muon(0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    got = np.asarray(u["hidden"]["kernel"], np.float64).reshape(8, 6) / -0.1
    g = np.asarray(grads["hidden"]["kernel"], np.float64).reshape(8, 6)
    # First Nesterov step: m_hat = (beta / (1 - beta^2) (1 - beta) + 1) g ~ 1.487 g; the
    # scale drops out of Newton-Schulz up to eps. Width scaling max(1, 6 / 8) = 1.
    want = _ns_oracle(g, np.asarray(linalg.ns_coefficients("standard", 5), np.float64))
    np.testing.assert_allclose(got, want, atol=2e-5)
    sv = np.linalg.svd(got, compute_uv=False)
    assert 0.68 <= sv.min() and sv.max() <= 1.14, sv  # the 0.69-1.13
    # Same singular vectors as the gradient's SVD: U^T got V is diagonal.
    uu, _, vt = np.linalg.svd(g, full_matrices=False)
    core = uu.T @ got @ vt.T
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=2e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: lo.muon(0.1, **kw),
        lambda **kw: lo.normuon(0.1, **kw),
        lambda **kw: lo.steepest_descent(0.1, norms={"matrix": "spectral"}, **kw),
    ],
    ids=["muon", "normuon", "steepest"],
)
def test_every_orthogonalizer_sees_the_same_matrix(make):
    # One decision for Muon, NorMuon and steepest descent: the (8, 1, 6) kernel's
    # update is the (8, 6) matrix's, reshaped; a 'matrix' role given to a 3-axis
    # leaf means its (inputs, output) matrix, never one matrix per row.
    params, grads = _unit_axis_case()
    cases = [
        (params, grads, None, (8, 6)),
        (
            {"hidden": {"kernel": jnp.zeros((4, 3, 5))}},
            {"hidden": {"kernel": jax.random.normal(jax.random.key(1), (4, 3, 5))}},
            {"hidden": {"kernel": "matrix"}},
            (12, 5),
        ),
    ]
    for p3, g3, roles, shape in cases:
        p2 = jax.tree.map(lambda x: x.reshape(shape), p3)
        g2 = jax.tree.map(lambda x: x.reshape(shape), g3)
        tx3, tx2 = make(roles=roles), make()
        u3, _ = tx3.update(g3, tx3.init(p3), p3)
        u2, _ = tx2.update(g2, tx2.init(p2), p2)
        np.testing.assert_allclose(
            np.asarray(u3["hidden"]["kernel"]).reshape(shape), u2["hidden"]["kernel"], atol=1e-6
        )
