"""K-FAC's ordinary step is matmuls only: the refresh stores inverses, the step multiplies.

XLA's CPU triangular solve is ~3x a matmul of the same shape (12.3 against 4.5 ms
for 785x785 by 785x512), so applying stored Cholesky factors by two triangular
solves made the ordinary step 2.7x slower (issue 18). The refresh (under
``lax.cond``) factors the damped factors by Cholesky and forms their inverses;
every step applies them with one product per side.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _linalg
from tests._helpers import random_psd

_REFRESH_PRIMITIVES = ("cholesky", "eigh")


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _primitives(jaxpr) -> set[str]:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in _subjaxprs(eqn):
            out |= _primitives(sub)
    return out


def _ordinary_primitives(jaxpr, refreshes: list) -> set[str]:
    """Primitives outside the refresh: a ``cond`` branch that factors is skipped (and counted)."""
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        if eqn.primitive.name == "cond":
            for branch in eqn.params["branches"]:
                inner = _primitives(branch.jaxpr)
                if any(p in inner for p in _REFRESH_PRIMITIVES):
                    refreshes.append(inner)
                else:
                    out |= _ordinary_primitives(branch.jaxpr, refreshes)
            continue
        for sub in _subjaxprs(eqn):
            out |= _ordinary_primitives(sub, refreshes)
    return out


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "l1": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)},
        "l2": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)},
        "norm": jnp.ones(3),
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)

    def factors(d_in, d_out):
        return lo.KfacFactors(
            jnp.asarray(random_psd(rng, d_in, 10.0), jnp.float32),
            jnp.asarray(random_psd(rng, d_out, 10.0), jnp.float32),
        )

    stats = {
        "l1": {"kernel": factors(7, 5), "bias": lo.FoldedBias("l1/kernel")},
        "l2": {"kernel": factors(6, 3), "bias": lo.FoldedBias("l2/kernel")},
    }
    return params, grads, stats


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"sides": "input"},
        {"inverse": "eigh"},
        {"state_layout": "owner"},
        {"inverse": "eigh", "state_layout": "owner"},
    ],
    ids=["cholesky", "input-side", "eigh", "owner", "eigh-owner"],
)
def test_ordinary_step_has_no_triangular_solve_and_the_refresh_is_apart(kw):
    params, grads, stats = _problem()
    tx = lo.kfac(1e-2, precondition_frequency=5, **kw)
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params, kfac_stats=stats))(grads, state)
    refreshes: list = []
    ordinary = _ordinary_primitives(jaxpr.jaxpr, refreshes)
    assert refreshes, "no refresh branch found"
    assert "triangular_solve" not in ordinary
    assert not any(p in ordinary for p in _REFRESH_PRIMITIVES)
    assert "dot_general" in ordinary  # the inverses are applied by products


@pytest.mark.parametrize("cond", [1e0, 1e2, 1e4, 1e6, 1e8], ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_stored_inverse_applied_by_a_product_is_accurate_to_eps_times_cond(cond, left):
    # The refresh's inverse (Cholesky, then its inverse) applied by one product, in
    # float32, against float64 NumPy with the same float32 inputs; right-hand sides
    # along the large eigenvalues (b = A h, the span of the inputs) and at small
    # damping, as in K-FAC. Within a few eps * cond, as the triangular solves were.
    rng = np.random.default_rng(int(np.log10(cond)) + 3)
    n, m, damping = 48, 6, 1e-9
    a = random_psd(rng, n, cond).astype(np.float32)
    b = (a.astype(np.float64) @ rng.standard_normal((n, m))).astype(np.float32)
    want = np.linalg.solve(a.astype(np.float64) + damping * np.eye(n), b.astype(np.float64))
    inv = _linalg.inv_psd_cholesky(jnp.asarray(a)[None], damping=damping)
    np.testing.assert_array_equal(np.asarray(inv), np.swapaxes(np.asarray(inv), 1, 2))
    hi = _linalg.HIGHEST
    if left:
        got = jnp.einsum("nij,njk->nik", inv, jnp.asarray(b)[None], precision=hi)[0]
    else:
        got = jnp.einsum("nkj,nij->nki", jnp.asarray(b.T)[None], inv, precision=hi)[0].T
    rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    eps = np.finfo(np.float32).eps
    assert rel < 8 * eps * cond + 1e-6 or cond >= 1e7, rel
    if cond >= 1e7:  # beyond 1/eps: no accuracy, but finite
        assert np.all(np.isfinite(np.asarray(got)))


def test_kfac_step_equals_the_dense_float64_inverse_product():
    # The whole ordinary step against float64 (A + d_A I)^{-1} G (B + d_B I)^{-1}
    # with the pi split, on a folded (homogeneous) kernel, after a refresh and on
    # a later step that only multiplies.
    rng = np.random.default_rng(7)
    d_in, d_out, damping = 4, 3, 1e-2
    params = {"w": jnp.zeros((d_in, d_out))}
    a = random_psd(rng, d_in, 1e3) + 1e-3 * np.eye(d_in)
    b = random_psd(rng, d_out, 1e2) + 1e-3 * np.eye(d_out)
    stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    tx = lo.scale_by_kfac(momentum=0.0, factor_decay=0.0, damping=damping, precondition_frequency=2)
    update = jax.jit(lambda g, s: tx.update(g, s, params, kfac_stats=stats))
    state = tx.init(params)
    pi = np.sqrt((np.trace(a) / d_in) / (np.trace(b) / d_out))
    da, db = pi * np.sqrt(damping), np.sqrt(damping) / pi
    for step in range(2):  # refresh, then an ordinary step with the stored inverses
        g = rng.standard_normal((d_in, d_out)).astype(np.float32)
        u, state = update({"w": jnp.asarray(g)}, state)
        want = np.linalg.solve(a + da * np.eye(d_in), g.astype(np.float64))
        want = np.linalg.solve(b + db * np.eye(d_out), want.T).T
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-4, atol=1e-6, err_msg=step)


# ----------------------------------------------------------------------------- state size


def test_state_holds_factors_and_inverses_only_and_multi_steps_adds_the_pending_buffers():
    # Issue 17 item 4: per kernel the factor EMAs and their inverses, plus the two
    # params-sized moments; the pending statistics (a third copy of the factors)
    # exist only under multi_steps, which keeps statistics between mini-steps.
    params, _, _ = _problem()
    tx = lo.scale_by_kfac()
    state = tx.init(params)

    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    # l1: A (6 + 1 folded bias)^2, B 5^2; l2: A 6^2, B 3^2; the vector
    # 'norm' (no statistics given here, but a layout): A 1^2, B 3^2 (float32).
    factor_bytes = 4 * (7 * 7 + 5 * 5 + 6 * 6 + 3 * 3 + 1 * 1 + 3 * 3)
    assert nbytes(state.factors) == nbytes(state.inverses) == factor_bytes
    assert nbytes(state.pending) == 0
    moments = 4 * sum(p.size for p in jax.tree.leaves(params))
    assert nbytes(state.mu) == nbytes(state.nu) == moments
    flags = len(jax.tree.leaves(params))  # one bool per leaf
    assert nbytes(state) == 2 * factor_bytes + 2 * moments + flags + 4 * 4  # 4 int32 scalars
    inner = lo.multi_steps(tx, 2).init(params).inner_opt_state
    assert nbytes(inner.pending) == factor_bytes
    for p, f in zip(jax.tree.leaves(inner.pending), jax.tree.leaves(inner.factors)):
        assert p.shape == f.shape and p.dtype == f.dtype and not np.any(np.asarray(p))


@pytest.mark.parametrize("layout", ["replicated", "owner"])
def test_multi_steps_of_one_matches_the_state_without_pending_buffers(layout):
    # With every_k = 1 multi_steps emits every step: the state with pending buffers
    # (multi_steps) and the one without (plain K-FAC) give the same steps (to the
    # last bits XLA's fusion of the two programs may round differently).
    params, _, stats = _problem()
    rng = np.random.default_rng(3)
    plain = lo.kfac(1e-2, precondition_frequency=2, state_layout=layout)
    wrapped = lo.multi_steps(plain, 1)
    sp, sw = plain.init(params), wrapped.init(params)
    up = jax.jit(lambda g, s: plain.update(g, s, params, kfac_stats=stats))
    uw = jax.jit(lambda g, s: wrapped.update(g, s, params, kfac_stats=stats))
    for _ in range(4):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        (a, sp), (b, sw) = up(g, sp), uw(g, sw)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-9)
    for x, y in zip(jax.tree.leaves(sp[0].factors), jax.tree.leaves(sw.inner_opt_state[0].factors)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-9)
    assert int(sp[0].pending_count) == int(sw.inner_opt_state[0].pending_count) == 0
