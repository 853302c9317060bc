"""Compressed (bfloat16) Kronecker state: float32 accumulation, one stochastically rounded store.

An EMA ``L <- b L + (1 - b) S`` stored in bfloat16 and rounded to nearest stops
moving once ``(1 - b) |S - L|`` is below half a unit in the last place of ``L``
(bfloat16 has 8 significant bits). The tests run a constant statistic for many
steps with float32 and bfloat16 storage and check that the bfloat16 state
follows the float32 one; each is also run with round-to-nearest storage
(``_kron.stochastic_round`` replaced by a plain cast) to show that it would
catch an EMA that is stuck.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _kron, _owner


def _nearest(monkeypatch):
    monkeypatch.setattr(_kron, "stochastic_round", lambda x, dtype, salt: x.astype(dtype))


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _rel(a, b):
    a, b = _f32(a), _f32(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------- the rounding itself


def test_stochastic_round_is_unbiased_and_picks_a_neighbour():
    # Values between two bfloat16 neighbours of 1: 1 + k/4 of the gap 2^-7.
    gap = 2.0**-7
    x = jnp.asarray([1.0 + gap / 4, 1.0 + gap / 2, 1.0 + 3 * gap / 4, -3.0 - 2.0**-6 / 8])
    salts = jnp.arange(4000)
    draws = _f32(jax.vmap(lambda s: _kron.stochastic_round(x, jnp.bfloat16, s))(salts))
    lo_ = _f32(jnp.asarray([1.0, 1.0, 1.0, -3.0]))
    hi = _f32(jnp.asarray([1 + gap, 1 + gap, 1 + gap, -3.0 - 2.0**-6]))
    assert np.all((draws == lo_) | (draws == hi))
    # Mean of 4000 draws: standard error <= gap / (2 sqrt(4000)) ~ 0.008 gap.
    np.testing.assert_allclose(draws.mean(0), _f32(x), atol=0.04 * gap)
    # Round to nearest would give 1.0 for the first entry every time.
    assert 0.15 < np.mean(draws[:, 0] == hi[0]) < 0.35


def test_stochastic_round_keeps_exact_and_non_finite_values_and_symmetry():
    x = jnp.asarray([0.0, 1.0, -2.5, jnp.inf, -jnp.inf, jnp.nan, 3e38, 1e-40])
    for s in range(5):
        y = _kron.stochastic_round(x, jnp.bfloat16, s)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_f32(y)[:6], _f32(x.astype(jnp.bfloat16))[:6])
        assert np.isfinite(_f32(y)[6])
    a = jax.random.normal(jax.random.key(0), (16, 16))
    a = a @ a.T
    y = _f32(_kron.stochastic_round(a, jnp.bfloat16, 7))
    np.testing.assert_array_equal(y, y.T)  # equal values round alike
    # float32 (or wider) storage is a plain cast.
    np.testing.assert_array_equal(np.asarray(_kron.stochastic_round(a, jnp.float32, 1)), a)


# ----------------------------------------------- EMAs of every optimizer in bfloat16


def _constant_grad(shape=(16, 8)):
    return {"w": jax.random.normal(jax.random.key(1), shape)}


def _run(tx, g, steps, **kw):
    """``steps`` updates with the same gradient (and statistics), in one compiled loop."""
    body = lambda i, s: tx.update(g, s, g, **kw)[1]  # noqa: E731
    return jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(tx.init(g))


def _check_ema(a, b, rounding, name):
    """Stochastic rounding: within its noise of float32; nearest: stuck far from it."""
    err, trace = _rel(a, b), float(np.trace(_f32(a)[0]) / np.trace(_f32(b)[0]))
    if rounding == "stochastic":
        assert err < 0.08 and abs(trace - 1) < 0.025, (name, err, trace)
    else:
        assert err > 0.2 and abs(trace - 1) > 0.2, (name, err, trace)


def _stats(state):
    return [x for x in jax.tree.leaves(state.stats) if x.ndim == 3]


_EMA_CASES = {
    # factor_decay 0.999: 1 - beta = 1e-3, far below bfloat16's resolution of 2^-8.
    "shampoo": lambda d: lo.scale_by_shampoo(
        factor_decay=0.999, precondition_frequency=50, precond_dtype=d
    ),
    "kl_shampoo": lambda d: lo.scale_by_shampoo(
        factor_decay=0.999,
        factor_estimation="kl",
        grafting="none",
        damping=1e-3,
        precondition_frequency=50,
        precond_dtype=d,
    ),
    "soap": lambda d: lo.scale_by_soap(
        factor_decay=0.999, precondition_frequency=50, precond_dtype=d
    ),
}


# The round-to-nearest runs show that each test catches a stuck EMA (slow tier).
_ROUNDINGS = ["stochastic", pytest.param("nearest", marks=pytest.mark.slow)]


@pytest.mark.parametrize("rounding", _ROUNDINGS)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.slow] if n == "kl_shampoo" else [])
        for n in sorted(_EMA_CASES)
    ],
)
def test_bfloat16_factor_ema_follows_the_float32_one(name, rounding, monkeypatch):
    # 700 steps of one gradient: the float32 EMA is (1 - 0.999^700) S = 0.50 S.
    # Rounded to nearest the bfloat16 EMA sticks near 0.2-0.35 S (an increment
    # 1e-3 S is below half an ulp once L > 0.13-0.26 S); stochastically rounded
    # it follows within its noise, ~2^-9 / sqrt(2e-3) = 4% per entry at most and
    # much less on the trace. KL-Shampoo's statistic goes through the stored
    # roots, so its float32 and bfloat16 runs also differ by their roots.
    g = _constant_grad()
    ref = _stats(_run(_EMA_CASES[name](jnp.float32), g, 700))
    if rounding == "nearest":
        _nearest(monkeypatch)
    low = _stats(_run(_EMA_CASES[name](jnp.bfloat16), g, 700))
    assert all(x.dtype == jnp.bfloat16 for x in low)
    for a, b in zip(low, ref):
        _check_ema(a, b, rounding, name)


@pytest.mark.parametrize("rounding", _ROUNDINGS)
def test_bfloat16_kfac_factor_ema_follows_the_float32_one(rounding, monkeypatch):
    x = jax.random.normal(jax.random.key(0), (32, 6))
    stats = {"w": lo.KfacFactors(a=x.T @ x / 32, g=jnp.diag(jnp.arange(1.0, 5.0)))}
    grads = {"w": jnp.ones((6, 4))}

    def run(dtype):
        tx = lo.scale_by_kfac(factor_decay=0.999, precondition_frequency=50, precond_dtype=dtype)
        return _run(tx, grads, 700, kfac_stats=stats)

    ref = run(jnp.float32)
    if rounding == "nearest":
        _nearest(monkeypatch)
    low = run(jnp.bfloat16)
    for field in ("factors", "inverses", "pending"):
        assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(getattr(low, field)))
    for a, b in zip(low.factors["w"], ref.factors["w"]):
        _check_ema(a, b, rounding, "kfac")


@pytest.mark.parametrize("rounding", _ROUNDINGS)
def test_bfloat16_psgd_factors_follow_the_float32_fit(rounding, monkeypatch):
    # precond_lr 0.01: the fit moves Q by ~1% per step, at bfloat16's resolution.
    # Rounded to nearest a third of the float32 fit's motion is lost (9% off
    # after 300 steps); stochastically rounded, ~2%.
    g = _constant_grad()

    def q(dtype):
        tx = lo.scale_by_psgd_kron(precond_lr=0.01, precond_update_prob=1.0, precond_dtype=dtype)
        return jax.tree.leaves(_run(tx, g, 300).q)

    ref = q(jnp.float32)
    if rounding == "nearest":
        _nearest(monkeypatch)
    low = q(jnp.bfloat16)
    errs = [_rel(a, b) for a, b in zip(low, ref)]
    assert all(a.dtype == jnp.bfloat16 for a in low)
    if rounding == "stochastic":
        assert max(errs) < 0.04, errs
    else:
        assert max(errs) > 0.06, errs


# ------------------------------------------------------ K-FAC precond_dtype elsewhere


def test_kfac_precond_dtype_in_the_owner_layout_and_under_multi_steps():
    # The rounding hashes values, not positions: the owner layout (stacked
    # groups) stores the same bfloat16 state as the replicated layout.
    params = {"a": jnp.zeros((8, 6)), "b": jnp.zeros((8, 6))}
    rng = np.random.default_rng(0)

    def cov(d):
        x = rng.standard_normal((20, d)).astype(np.float32)
        return jnp.asarray(x.T @ x / 20)

    stats = [{k: lo.KfacFactors(a=cov(8), g=cov(6)) for k in params} for _ in range(6)]
    grads = [{k: jnp.asarray(rng.standard_normal((8, 6)), jnp.float32) for k in params}] * 6
    out = {}
    for layout in ("replicated", "owner"):
        tx = lo.multi_steps(
            lo.kfac(1e-2, precondition_frequency=2, precond_dtype="bfloat16", state_layout=layout),
            every_k_schedule=2,
        )
        state, step = tx.init(params), jax.jit(tx.update)
        ups = []
        for g, s in zip(grads, stats):
            u, state = step(g, state, params, kfac_stats=s)
            ups.append(u)
        out[layout] = (ups, state)
    inner = out["owner"][1].inner_opt_state[0]
    assert _owner.layout_of(inner) is not None
    for field in ("factors", "inverses", "pending"):
        assert {v.dtype for v in jax.tree.leaves(getattr(inner, field))} == {jnp.dtype("bfloat16")}
    for u, r in zip(out["owner"][0], out["replicated"][0]):
        for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(r)):
            np.testing.assert_allclose(_f32(x), _f32(y), rtol=1e-5, atol=1e-7)
    rep = out["replicated"][1].inner_opt_state[0].factors
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(rep))


def test_kfac_precond_dtype_halves_the_factor_bytes():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}

    def nbytes(dtype, field, accumulate=False):
        tx = lo.kfac(1e-2, precond_dtype=dtype)
        if accumulate:  # the pending statistics are allocated by multi_steps only
            state = jax.eval_shape(lo.multi_steps(tx, 2).init, params).inner_opt_state
        else:
            state = jax.eval_shape(tx.init, params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(getattr(state[0], field)))

    for field in ("factors", "inverses"):
        assert nbytes(jnp.bfloat16, field) * 2 == nbytes(None, field) > 0
    assert nbytes(jnp.bfloat16, "pending", True) * 2 == nbytes(None, "pending", True) > 0
    assert nbytes(None, "pending", True) == nbytes(None, "factors")
    assert nbytes(None, "pending") == 0


def test_kfac_precond_dtype_is_validated():
    # As every optimizer's dtype arguments (_checks.canonicalize_dtype): TypeError.
    with pytest.raises(TypeError, match="precond_dtype"):
        lo.kfac(1e-2, precond_dtype="not-a-dtype")
    with pytest.raises(TypeError, match="precond_dtype"):
        lo.scale_by_kfac(precond_dtype=jnp.int32)
