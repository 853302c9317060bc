"""Gram Newton-Schulz, AOL pre-scaling and the 'aol' preset: float64 SVD oracles.

Newton-Schulz acts on singular values only, so the float64 oracle is
``U p(S') V^T`` for the SVD ``X' = U S' V^T`` of the scaled input (Frobenius or
AOL scaling computed in float64) and ``p`` the composed step polynomials. The Gram
iteration is the standard one rearranged, so it has the same oracle.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import linalg

CONDS = [1.0, 1e2, 1e4, 1e6]
SHAPES = [(16, 64), (64, 16), (12, 12), (8, 40)]


def _matrix(rng, m, n, cond, rank=None):
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0]
    k = min(m, n) if rank is None else rank
    s = np.logspace(0, -np.log10(cond), k)
    return (u[:, :k] * s) @ v[:, :k].T


def _scaled(x, prescale, eps=1e-8):
    """The float64 scaled input ``X'`` (``'aol'``: ``D X`` on the smaller side)."""
    if prescale == "frobenius":
        return x / (np.linalg.norm(x) + eps)
    wide = x.shape[0] <= x.shape[1]
    y = x if wide else x.T
    d = 1.0 / (np.sqrt(np.abs(y @ y.T).sum(axis=1)) + eps)
    y = d[:, None] * y
    return y if wide else y.T


def _oracle(x, coeffs, prescale="frobenius"):
    u, s, vt = np.linalg.svd(_scaled(x, prescale), full_matrices=False)
    for a, b, c in np.asarray(coeffs, np.float64):
        s = a * s + b * s**3 + c * s**5
    return (u * s) @ vt


def _polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("preset, steps", [("standard", 5), ("polar_express", 5)])
def test_gram_matches_the_svd_oracle(cond, shape, preset, steps):
    rng = np.random.default_rng(int(cond) % 29 + shape[0])
    x = _matrix(rng, shape[0], shape[1], cond)
    coeffs = linalg.ns_coefficients(preset, steps)
    want = _oracle(x, coeffs)
    with jax.enable_x64(True):
        got = linalg.newton_schulz(jnp.asarray(x), jnp.asarray(coeffs, jnp.float64), method="gram")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-10)
    got32 = linalg.newton_schulz(jnp.asarray(x, jnp.float32), coeffs, method="gram")
    np.testing.assert_allclose(np.asarray(got32), want, atol=2e-4)


@pytest.mark.parametrize("restarts", [(), (1,), (2, 4), (1, 2, 3, 4)], ids=str)
def test_every_restart_schedule_is_the_same_iteration_in_float64(restarts):
    rng = np.random.default_rng(5)
    x = _matrix(rng, 10, 36, 1e3)
    coeffs = linalg.ns_coefficients("polar_express", 5)
    with jax.enable_x64(True):
        got = linalg.newton_schulz(
            jnp.asarray(x), jnp.asarray(coeffs, jnp.float64), method="gram", gram_restarts=restarts
        )
    np.testing.assert_allclose(np.asarray(got), _oracle(x, coeffs), atol=1e-10)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (24, 40)], ids=str)
@pytest.mark.parametrize("cond, atol", [(1.0, 1e-5), (1e2, 3e-5)], ids=["cond1", "cond100"])
def test_gram_and_standard_agree_to_float32_round_off_when_well_conditioned(shape, cond, atol):
    rng = np.random.default_rng(11)
    x = jnp.asarray(_matrix(rng, shape[0], shape[1], cond), jnp.float32)
    for preset in ("standard", "polar_express"):
        coeffs = linalg.ns_coefficients(preset, 5)
        gram = linalg.newton_schulz(x, coeffs, method="gram")
        std = linalg.newton_schulz(x, coeffs, method="standard")
        np.testing.assert_allclose(np.asarray(gram), np.asarray(std), atol=atol)


def test_restarts_keep_the_float32_gram_recurrence_near_the_standard_iteration():
    # Without restarts the small eigenvalues of R carry round-off amplified by
    # h(r)^2 each step; the default restarts bring the error back to the
    # standard iteration's level (both measured against the float64 oracle).
    rng = np.random.default_rng(0)
    x = _matrix(rng, 16, 64, 1e4)
    coeffs = linalg.ns_coefficients("polar_express", 8)
    want = _oracle(x, coeffs)
    x32 = jnp.asarray(x, jnp.float32)

    def err(**kw):
        return np.abs(np.asarray(linalg.newton_schulz(x32, coeffs, **kw)) - want).max()

    standard, never, default = err(), err(method="gram", gram_restarts=()), err(method="gram")
    assert default < 5 * standard + 1e-6, (default, standard)
    assert never > 10 * default, (never, default)


def test_bfloat16_gram_stays_finite_and_as_accurate_as_standard_bfloat16():
    # The m x m recurrence runs in float32 even for a bfloat16 iteration: in
    # bfloat16 its spurious negative eigenvalues are sent to -inf.
    rng = np.random.default_rng(0)
    x = _matrix(rng, 64, 256, 1e4)
    coeffs = linalg.ns_coefficients("polar_express", 8)
    want = _oracle(x, coeffs)
    x32 = jnp.asarray(x, jnp.float32)
    errs = {
        m: np.abs(
            np.asarray(
                linalg.newton_schulz(x32, coeffs, method=m, compute_dtype=jnp.bfloat16)
            ).astype(np.float64)
            - want
        ).max()
        for m in ("standard", "gram")
    }
    assert np.isfinite(errs["gram"]) and errs["gram"] <= 1.5 * errs["standard"], errs


@pytest.mark.parametrize("method", ["gram", "auto"])
@pytest.mark.parametrize("prescale", ["frobenius", "aol"])
def test_rank_deficient_inputs_match_the_oracle(method, prescale):
    rng = np.random.default_rng(2)
    x = _matrix(rng, 12, 40, 10.0, rank=5)
    coeffs = linalg.ns_coefficients("polar_express", 6)
    got = linalg.newton_schulz(
        jnp.asarray(x, jnp.float32), coeffs, method=method, prescale=prescale
    )
    np.testing.assert_allclose(np.asarray(got), _oracle(x, coeffs, prescale), atol=2e-4)
    # the null space stays null: the rank is kept
    assert np.linalg.matrix_rank(np.asarray(got, np.float64), tol=1e-3) == 5


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("prescale", ["frobenius", "aol"])
def test_zero_gives_zero_and_non_finite_gives_zeros(method, prescale):
    coeffs = linalg.ns_coefficients("standard", 5)
    kw = dict(method=method, prescale=prescale)
    np.testing.assert_array_equal(linalg.newton_schulz(jnp.zeros((2, 4, 10)), coeffs, **kw), 0.0)
    bad = jnp.ones((4, 10)).at[1, 2].set(jnp.inf)
    nan = jnp.ones((4, 10)).at[0, 0].set(jnp.nan)
    out = linalg.newton_schulz(jnp.stack([bad, nan, jnp.eye(4, 10)]), coeffs, **kw)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:2], 0.0)
    assert float(jnp.abs(out[2]).max()) > 0.5


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)], ids=str)
@pytest.mark.parametrize("prescale", ["frobenius", "aol"])
def test_leading_axes_are_a_batch(shape, prescale):
    x = jax.random.normal(jax.random.key(1), (3, 2, *shape))
    coeffs = linalg.ns_coefficients("standard", 5)
    got = linalg.newton_schulz(x, coeffs, method="gram", prescale=prescale)
    assert got.shape == x.shape
    for i in range(3):
        for j in range(2):
            one = linalg.newton_schulz(x[i, j], coeffs, method="gram", prescale=prescale)
            np.testing.assert_allclose(got[i, j], one, atol=1e-6)


def _dot_count(fn, x):
    return str(jax.make_jaxpr(fn)(x)).count("dot_general")


def test_auto_picks_gram_exactly_where_it_has_fewer_flops():
    coeffs = linalg.ns_coefficients("standard", 5)
    for shape in [(16, 16), (16, 20), (16, 32), (16, 64), (64, 16), (8, 128)]:
        x = jnp.ones(shape)
        m, n = shape
        gram_cheaper = linalg.newton_schulz_flops(m, n, 5, "gram") < linalg.newton_schulz_flops(
            m, n, 5, "standard"
        )
        want = "gram" if gram_cheaper else "standard"
        auto = _dot_count(lambda y: linalg.newton_schulz(y, coeffs, method="auto"), x)
        chosen = _dot_count(lambda y, w=want: linalg.newton_schulz(y, coeffs, method=w), x)
        other = _dot_count(
            lambda y, w=want: linalg.newton_schulz(
                y, coeffs, method="standard" if w == "gram" else "gram"
            ),
            x,
        )
        assert auto == chosen != other, (shape, auto, chosen, other)
        assert gram_cheaper == (max(m, n) >= 2 * min(m, n)), shape  # ratio 2: 0.88x


def test_flop_formula_matches_xla_cost_analysis():
    # XLA's own count of the compiled iteration (deterministic): the formula counts
    # every matmul; XLA adds the elementwise work on top.
    coeffs = linalg.ns_coefficients("standard", 5)
    x = jnp.ones((32, 256))
    for method in ("standard", "gram"):
        compiled = jax.jit(lambda y, w=method: linalg.newton_schulz(y, coeffs, method=w))
        cost = compiled.lower(x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert cost is not None
        formula = linalg.newton_schulz_flops(32, 256, 5, method)
        assert formula <= cost["flops"] <= 1.1 * formula, (method, cost["flops"], formula)
    assert linalg.newton_schulz_flops(512, 2048, 5, "gram") < 0.7 * linalg.newton_schulz_flops(
        512, 2048, 5, "standard"
    )


# ------------------------------------------------------------------------ AOL pre-scaling


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_aol_matches_its_svd_oracle(cond, shape, method):
    rng = np.random.default_rng(int(cond) % 23 + shape[1])
    x = _matrix(rng, shape[0], shape[1], cond) * rng.uniform(0.2, 3.0, size=(shape[0], 1))
    coeffs = linalg.ns_coefficients("aol", 4)
    want = _oracle(x, coeffs, "aol")
    with jax.enable_x64(True):
        got = linalg.newton_schulz(
            jnp.asarray(x), jnp.asarray(coeffs, jnp.float64), method=method, prescale="aol"
        )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-10)
    got32 = linalg.newton_schulz(jnp.asarray(x, jnp.float32), coeffs, method=method, prescale="aol")
    np.testing.assert_allclose(np.asarray(got32), want, atol=2e-4)


def test_aol_scaling_bounds_the_spectral_norm_more_tightly_than_frobenius():
    rng = np.random.default_rng(4)
    for shape in [(8, 8), (16, 64), (64, 16), (5, 200)]:
        for _ in range(5):
            x = rng.standard_normal(shape) * rng.uniform(0.1, 10.0, size=(shape[0], 1))
            aol = np.linalg.norm(_scaled(x, "aol"), 2)
            assert aol <= 1 + 1e-12  # Prach and Lampert 2022, Theorem 1
            assert aol > np.linalg.norm(_scaled(x, "frobenius"), 2)


def test_aol_preset_scalar_map_stays_in_its_documented_band():
    s = np.logspace(-2, 0, 4001)
    for a, b, c in np.asarray(linalg.ns_coefficients("aol", 4), np.float64):
        s = a * s + b * s**3 + c * s**5
    assert 0.985 <= s.min() and s.max() <= 1.015, (s.min(), s.max())


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32), (64, 256)], ids=str)
def test_aol_four_steps_beat_standard_five_steps_against_the_true_polar_factor(shape):
    # Against U V^T of the input itself (not of the rescaled matrix): on Gaussian
    # matrices (balanced rows, like gradients) 4 AOL steps are closer to the polar
    # factor than the default 5 Frobenius-scaled steps (measured 0.01-0.04 vs ~0.2
    # relative Frobenius error).
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    pol = _polar(x)
    x32 = jnp.asarray(x, jnp.float32)

    def rel(coeffs, prescale):
        got = np.asarray(linalg.newton_schulz(x32, coeffs, prescale=prescale), np.float64)
        return np.linalg.norm(got - pol) / np.linalg.norm(pol)

    aol4 = rel(linalg.ns_coefficients("aol", 4), "aol")
    std5 = rel(linalg.ns_coefficients("standard", 5), "frobenius")
    assert aol4 < 0.06 and aol4 < 0.5 * std5, (aol4, std5)


def test_aol_approximates_the_polar_factor_of_the_rescaled_matrix():
    # The documented bias: D is not a multiple of the identity, so the iteration
    # converges to the polar factor of D X, which differs from that of X when the
    # rows' absolute Gram sums are unbalanced.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 32)) * np.logspace(0, -3, 8)[:, None]
    coeffs = linalg.ns_coefficients("polar_express", 10)
    for method in ("standard", "gram"):
        got = linalg.newton_schulz(
            jnp.asarray(x, jnp.float32), coeffs, prescale="aol", method=method
        )
        np.testing.assert_allclose(np.asarray(got), _polar(_scaled(x, "aol")), atol=1e-4)
        assert np.abs(np.asarray(got) - _polar(x)).max() > 1e-2


def test_bad_method_and_prescale_are_refused():
    coeffs = linalg.ns_coefficients("standard", 5)
    with pytest.raises(ValueError, match="method"):
        linalg.newton_schulz(jnp.ones((2, 3)), coeffs, method="fast")
    with pytest.raises(ValueError, match="prescale"):
        linalg.newton_schulz(jnp.ones((2, 3)), coeffs, prescale="spectral")
    with pytest.raises(ValueError, match="method"):
        linalg.newton_schulz_flops(2, 3, 5, "fast")
    with pytest.raises(ValueError, match="ns_method"):
        lo.muon(1e-2, ns_method="fast")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="ns_prescale"):
        lo.normuon(1e-2, ns_prescale="spectral")  # pyright: ignore[reportArgumentType]


# ---------------------------------------------------------------------------- muon/normuon


def _params():
    return {
        "w1": jnp.ones((8, 32)),
        "w2": jnp.ones((32, 8)),
        "w3": jnp.ones((16, 16)),
        "b": jnp.zeros(32),
    }


def _grads(params):
    keys = jax.random.split(jax.random.key(0), len(params))
    return {
        k: jax.random.normal(key, p.shape)
        for (k, p), key in zip(sorted(params.items()), keys, strict=True)
    }


@pytest.mark.parametrize("alias", [lo.muon, lo.normuon], ids=["muon", "normuon"])
def test_muon_gram_equals_standard_to_round_off(alias):
    params = _params()
    grads = _grads(params)
    out = {}
    for method in ("standard", "gram"):
        tx = alias(1e-2, ns_method=method)
        out[method], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for k in params:
        np.testing.assert_allclose(out["gram"][k], out["standard"][k], atol=1e-6)


def test_muon_aol_uses_four_steps_and_the_aol_scaling():
    params = _params()
    grads = _grads(params)
    tx = lo.scale_by_muon(ns_coeffs="aol", ns_prescale="aol", scaling="none", nesterov=False)
    out, _ = tx.update(grads, tx.init(params), params)
    upd: Any = out
    coeffs = linalg.ns_coefficients("aol", 4)
    for k in ("w1", "w2"):  # hidden matrices (w3 is the head by the default roles)
        want = _oracle(np.asarray(grads[k] * 0.05, np.float64), coeffs, "aol")
        np.testing.assert_allclose(upd[k], want, atol=2e-4)
    for k in ("w3", "b"):
        np.testing.assert_array_equal(upd[k], grads[k])


def test_muon_gram_on_an_nnx_state_tree():
    nnx = pytest.importorskip("flax.nnx")

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 32, rngs=rngs)
            self.b = nnx.Linear(32, 32, rngs=rngs)
            self.c = nnx.Linear(32, 4, rngs=rngs)

    params = nnx.state(Mlp(nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape) * 0.37), params)
    outs = []
    for method in ("standard", "gram"):
        tx = lo.muon(1e-2, ns_method=method, ns_prescale="aol", ns_coeffs="aol")
        upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        outs.append(upd)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), *outs)
    assert isinstance(outs[1], nnx.State)


# ------------------------------------------------------------------- batched matrices


def _grad_of(shape):
    return jnp.full(shape, 0.5) + jnp.eye(shape[0], shape[1])


def _update_dots(shapes) -> tuple[int, Any]:
    params = {f"w{i}": jnp.ones(s) for i, s in enumerate(shapes)}
    grads = {k: _grad_of(p.shape) for k, p in params.items()}
    tx = lo.scale_by_muon(roles=lambda p: jax.tree.map(lambda _: "matrix", p))
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params)
    return str(jaxpr).count("dot_general"), tx.update(grads, tx.init(params), params)[0]


def test_same_shaped_and_transposed_leaves_are_orthogonalized_in_one_batched_call():
    # The number of matmuls in the traced update does not grow with the number of
    # same-shaped leaves, and a tall (32, 8) leaf joins the wide (8, 32) batch.
    one, _ = _update_dots([(8, 32)])
    many, _ = _update_dots([(8, 32)] * 4)
    mixed, upd = _update_dots([(8, 32), (32, 8), (8, 32), (32, 8)])
    assert one == many == mixed > 0, (one, many, mixed)
    coeffs = linalg.ns_coefficients("standard", 5)
    for i, shape in enumerate([(8, 32), (32, 8), (8, 32), (32, 8)]):
        g = _grad_of(shape)
        want = linalg.newton_schulz(g, coeffs, method="auto") * max(1.0, shape[1] / shape[0]) ** 0.5
        np.testing.assert_allclose(upd[f"w{i}"], want, atol=1e-5)
    # two distinct shapes: two batches
    two, _ = _update_dots([(8, 32), (16, 16)])
    assert two > one
