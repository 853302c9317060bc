"""KL-SOAP (``soap(..., factor_estimation='kl')``) against a dense float64 reference.

The reference is written from the maths (:func:`kl_soap_reference`): SOAP's Adam
in the eigenbasis, with each factor's statistic ``G_(i) (⊗_{j≠i} L_j^{-1})
G_(i)^T / n_i`` and ``L_j^{-1} = Q_j diag(λ_j + δ_j)^{-1} Q_j^T``, ``λ_j =
diag(Q_j^T L_j Q_j)``, ``δ_j = damping * max λ_j``; an all-zero factor counts as
the identity. Where the first eigenbasis is not unique (a factor of rank below
its size after one gradient: every ``m x n`` leaf with ``m > n + 1``, and
rank-deficient gradients) the choice within the null space is LAPACK's; the
reference then takes the library's first bases, after checking that they
diagonalize its own float64 factors, and computes everything else itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _axes, _kron
from tests._helpers import assert_recovers, assert_trees_close


def _mode(x, m, axis):
    """``x ×_axis m``: ``m`` applied to axis ``axis`` of ``x``."""
    return np.moveaxis(np.tensordot(m, x, axes=(1, axis)), 0, axis)


def _unfold(x, axis):
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _inverse(stat, q, diag, damping):
    """The eigen-form inverse of one factor (identity while it is all zero)."""
    if not np.any(stat):
        return np.eye(len(stat))
    lam = np.maximum(stat if diag else np.diag(q.T @ stat @ q), 0.0)
    w = 1.0 / (lam + damping * lam.max())
    return np.diag(w) if diag else (q * w) @ q.T


def kl_soap_reference(
    grads, *, b1, b2, eps, factor_decay, damping, freq, diag_axes=(), first_bases=None
):
    """Dense KL-SOAP on one tensor in float64; returns the updates and the final factors.

    ``diag_axes``: axes with a diagonal factor and the identity basis (one-sided).
    ``first_bases``: the library's bases after the first step, used (after a check)
    in place of this function's own ``eigh`` there.
    """
    shape = grads[0].shape
    k = len(shape)
    full = [i not in diag_axes for i in range(k)]
    stats = [np.zeros((d, d)) if full[i] else np.zeros(d) for i, d in enumerate(shape)]
    qs = [np.eye(d) for d in shape]
    mu = np.zeros(shape)
    nu = np.zeros(shape)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        mu = b1 * mu + (1 - b1) * g
        rot, m_rot = g, mu
        for i in range(k):
            rot, m_rot = _mode(rot, qs[i].T, i), _mode(m_rot, qs[i].T, i)
        nu = b2 * nu + (1 - b2) * rot**2
        u = (m_rot / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        for i in range(k):
            u = _mode(u, qs[i], i)
        out.append(u)
        # KL statistics with the inverses of the factors before this step.
        invs = [_inverse(s, q, not f, damping) for s, q, f in zip(stats, qs, full)]
        for i in range(k):
            others = np.ones((1, 1))
            for j in range(k):
                if j != i:
                    others = np.kron(others, invs[j])
            gi = _unfold(g, i)
            cov = gi @ others @ gi.T / (g.size // shape[i])
            new = cov if full[i] else np.diag(cov)
            stats[i] = factor_decay * stats[i] + (1 - factor_decay) * new
        if t == 1:
            for i in range(k):
                if not full[i]:
                    continue
                if first_bases is None:
                    qs[i] = np.linalg.eigh(stats[i])[1][:, ::-1]
                else:
                    q = np.asarray(first_bases[i], np.float64)
                    d = q.T @ stats[i] @ q
                    off = np.abs(d - np.diag(np.diag(d))).max()
                    assert off < 1e-5 * np.abs(stats[i]).max(), off
                    assert np.all(np.diff(np.diag(d)) <= 1e-5 * np.abs(stats[i]).max())
                    qs[i] = q
        elif t % freq == 0:
            for i in range(k):
                if not full[i]:
                    continue
                est = np.diag(qs[i].T @ stats[i] @ qs[i])
                perm = np.argsort(-est, kind="stable")
                q = qs[i][:, perm]
                nu = np.take(nu, perm, axis=i)
                qn, r = np.linalg.qr(stats[i] @ q)
                qs[i] = qn * np.where(np.diag(r) < 0, -1.0, 1.0)
    return out, stats


def _grads(shape, n, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 2.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    if rank is None:
        return [(rng.standard_normal(shape) * scales).astype(np.float32) for _ in range(n)]
    mix = rng.standard_normal((shape[0], rank))  # every gradient's rows in one subspace
    return [(mix @ rng.standard_normal((rank,) + shape[1:])).astype(np.float32) for _ in range(n)]


def _run(tx, grads):
    params = {"w": jnp.zeros(grads[0].shape)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs, first = [], None
    for g in grads:
        u, state = update({"w": jnp.asarray(g)}, state, params)
        outs.append(np.asarray(u["w"]))
        if first is None:
            first = [np.asarray(q[0]) for q in state.bases["w"]]
    return outs, state, first


CASES = {
    # name: shape, freq, extra options, whether the first bases are LAPACK's choice
    "matrix_4x3_every_step": ((4, 3), 1, {}, False),
    "matrix_3x4_stale": ((3, 4), 3, {}, False),
    "rectangular_5x3": ((5, 3), 2, {}, True),
    "rank_deficient_5x4_rank2": ((5, 4), 2, dict(rank=2), True),
    "order3_2x3x4": ((2, 3, 4), 2, {}, False),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_dense_reference(name):
    shape, freq, extra, shared_basis = CASES[name]
    rank = extra.get("rank")
    # A rank-deficient gradient has no second moment in its null space: a larger
    # eps keeps Adam from dividing round-off by round-off there.
    hp = dict(b1=0.9, b2=0.95, eps=1e-3 if rank else 1e-8, factor_decay=0.9, damping=1e-3)
    grads = _grads(shape, 7, rank=rank)
    tx = lo.scale_by_soap(
        **hp, precondition_frequency=freq, factor_estimation="kl", merge_small_dims=False
    )
    got, state, first = _run(tx, grads)
    want, stats = kl_soap_reference(
        grads, **hp, freq=freq, first_bases=first if shared_basis else None
    )
    for t, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(
            a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max(), err_msg=f"step {t}"
        )
    for i, s in enumerate(stats):
        np.testing.assert_allclose(
            np.asarray(state.stats["w"][i][0]), s, rtol=2e-3, atol=1e-4 * np.abs(s).max()
        )
    assert int(state.failures.skipped) == 0 and int(state.failures.failed) == 0


def test_one_sided_factor_matches_reference():
    # Axis 0 (length 6) is longer than max_precond_dim: a diagonal factor (its own
    # diagonal as the eigenvalues, identity basis) that still enters the other
    # factor's KL statistics; axis 1 gets a full factor and a rotating basis.
    shape = (6, 3)
    hp = dict(b1=0.9, b2=0.95, eps=1e-8, factor_decay=0.9, damping=1e-3)
    grads = _grads(shape, 6)
    tx = lo.scale_by_soap(**hp, precondition_frequency=2, factor_estimation="kl", max_precond_dim=4)
    got, state, _ = _run(tx, grads)
    assert [f.shape for f in state.stats["w"]] == [(1, 6), (1, 3, 3)]
    want, stats = kl_soap_reference(grads, **hp, freq=2, diag_axes=(0,))
    for t, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(
            a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max(), err_msg=f"step {t}"
        )
    for i, s in enumerate(stats):
        np.testing.assert_allclose(np.asarray(state.stats["w"][i][0]), s, rtol=2e-3, atol=1e-6)


def test_shampoo_estimation_is_soap_bit_for_bit():
    params = {"w": jnp.zeros((5, 4)), "conv": jnp.zeros((3, 3, 2, 4)), "b": jnp.zeros(4)}
    a = lo.soap(1e-2, precondition_frequency=2)
    b = lo.soap(1e-2, precondition_frequency=2, factor_estimation="shampoo", damping=0.5)
    sa, sb = a.init(params), b.init(params)
    step_a, step_b = jax.jit(a.update), jax.jit(b.update)
    for i in range(5):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
        ua, sa = step_a(g, sa, params)
        ub, sb = step_b(g, sb, params)
        jax.tree.map(
            lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
            (ua, sa),
            (ub, sb),
        )


def test_kl_changes_the_statistics_but_not_the_state_layout():
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    a, b = lo.soap(1e-2), lo.soap(1e-2, factor_estimation="kl")
    sa, sb = a.init(params), b.init(params)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
    for _ in range(2):
        _, sa = a.update(g, sa, params)
        _, sb = b.update(g, sb, params)
    # The first statistics differ only by 1 / n_i; the second by the inverses too.
    assert not np.allclose(np.asarray(sa[0].stats["w"][0]) / 4, np.asarray(sb[0].stats["w"][0]))


def test_eigen_inverse_halves_give_the_damped_inverse():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 2))
    stat = a @ a.T  # rank 2
    q = np.linalg.eigh(stat)[1]
    lam = np.diag(q.T @ stat @ q)
    want = (q / (np.maximum(lam, 0) + 1e-2 * lam.max())) @ q.T
    plan = _axes.resolve(None, {"w": jnp.zeros((5, 3))}, max_precond_dim=4)["w"]
    # axis 0 is diagonal (5 > 4), axis 1 full: check both kinds and the zero factor.
    stats = (jnp.asarray(np.diag(stat)[None], jnp.float32), jnp.zeros((1, 3, 3)))
    bases = (jnp.ones((1, 5)), jnp.asarray(np.eye(3)[None], jnp.float32))
    halves = _kron.eigen_inverse_halves(stats, bases, plan, jnp.float32(1e-2), jnp.float32)
    d = np.diag(stat)
    np.testing.assert_allclose(np.asarray(halves[0][0]) ** 2, 1 / (d + 1e-2 * d.max()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(halves[1][0]), np.eye(3))  # zero factor: identity
    plan2 = _axes.resolve(
        None, {"w": jnp.zeros((5, 3))}, max_precond_dim=8, merge_small_dims=False
    )["w"]
    stats2 = (jnp.asarray(stat[None], jnp.float32), jnp.zeros((1, 3, 3)))
    bases2 = (jnp.asarray(q[None], jnp.float32), jnp.asarray(np.eye(3)[None], jnp.float32))
    m = np.asarray(_kron.eigen_inverse_halves(stats2, bases2, plan2, 1e-2, jnp.float32)[0][0])
    np.testing.assert_allclose(m.T @ m, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_recovers_the_kronecker_covariance():
    # Gradients A^{1/2} Z B^{1/2}: KL-SOAP's factors tend to A ⊗ B itself (the
    # KL-Shampoo fixed point), SOAP's only to a multiple (L ∝ A tr B).
    rng = np.random.default_rng(0)
    qa, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    qb, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    a = (qa * np.logspace(0, 1.5, 5)) @ qa.T
    b = (qb * np.logspace(0, 1, 4)) @ qb.T
    sa = jnp.asarray(np.linalg.cholesky(a), jnp.float32)
    sb = jnp.asarray(np.linalg.cholesky(b), jnp.float32)
    target = np.kron(a, b)
    errs = {}
    for fe in ("kl", "shampoo"):
        tx = lo.scale_by_soap(
            factor_decay=0.995, precondition_frequency=5, factor_estimation=fe, damping=1e-3
        )

        @jax.jit
        def run(state, tx=tx):
            def step(state, key):
                _, state = tx.update({"w": sa @ jax.random.normal(key, (5, 4)) @ sb.T}, state)
                return state, None

            return jax.lax.scan(step, state, jax.random.split(jax.random.key(1), 2000))[0]

        state = run(tx.init({"w": jnp.zeros((5, 4))}))
        fl, fr = (np.asarray(f[0], np.float64) for f in state.stats["w"])
        errs[fe] = np.linalg.norm(np.kron(fl, fr) - target) / np.linalg.norm(target)
    assert errs["kl"] < 0.2 and errs["shampoo"] > 10, errs  # measured 0.057 and ~970


def test_non_finite_gradient_keeps_the_state():
    params = {"w": jnp.zeros((4, 3)), "v": jnp.zeros(3)}
    tx = lo.soap(1e-2, precondition_frequency=2, factor_estimation="kl")
    update = jax.jit(tx.update)
    state = tx.init(params)
    g = lambda i: jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    for i in range(3):
        _, state = update(g(i), state, params)
    before = state[0]
    bad = g(3)
    bad["w"] = bad["w"].at[0, 0].set(jnp.inf)
    u, state = update(bad, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    assert_trees_close(state[0].stats["w"], before.stats["w"], rtol=0, atol=0)
    assert_trees_close(state[0].nu["w"], before.nu["w"], rtol=0, atol=0)
    assert int(state[0].failures.skipped) == 1
    assert_recovers(update, state, params, g)


@pytest.mark.parametrize("bad", ["kl-soap", "KL", 3, None])
def test_invalid_factor_estimation_raises_naming_it(bad):
    for factory in (
        lambda: lo.soap(1e-3, factor_estimation=bad),
        lambda: lo.scale_by_soap(factor_estimation=bad),
    ):
        with pytest.raises(ValueError, match="factor_estimation"):
            factory()


def test_negative_damping_raises():
    with pytest.raises(ValueError, match="damping must be >= 0"):
        lo.soap(1e-3, factor_estimation="kl", damping=-1.0)


def test_inject_hyperparams_damping():
    params = {"w": jnp.zeros((4, 3))}
    g = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
    plain = lo.soap(1e-2, factor_estimation="kl", damping=1e-2)
    inj = lo.inject_hyperparams(lo.soap)(learning_rate=1e-2, factor_estimation="kl", damping=1e-2)
    sp, si = plain.init(params), inj.init(params)
    for _ in range(3):
        up, sp = plain.update(g, sp, params)
        ui, si = inj.update(g, si, params)
    np.testing.assert_array_equal(np.asarray(up["w"]), np.asarray(ui["w"]))


def test_owner_layout_gives_the_replicated_updates():
    # Without a mesh the owner layout keeps each group's stack whole: same-shaped
    # blocks of several leaves (and padding) in one batch, so the eigen-form
    # inverses and their damping must stay per block.
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3)), "c": jnp.zeros((6, 5))}
    kw = dict(precondition_frequency=2, factor_estimation="kl", damping=1e-3)
    rep, own = lo.soap(1e-2, **kw), lo.soap(1e-2, **kw, state_layout="owner")
    sr, so = rep.init(params), own.init(params)
    step_r, step_o = jax.jit(rep.update), jax.jit(own.update)
    for i in range(5):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
        g["b"] = 3.0 * g["b"]
        ur, sr = step_r(g, sr, params)
        uo, so = step_o(g, so, params)
        assert_trees_close(ur, uo, rtol=1e-5, atol=1e-6)


def test_without_full_factors_it_is_adam():
    # Every axis longer than max_precond_dim: identity bases, so whatever the
    # (diagonal, KL-estimated) statistics, the update is Adam's.
    params = {"w": jnp.zeros((6, 5)), "conv": jnp.zeros((3, 3, 2, 4)), "b": jnp.zeros(5)}
    ours = lo.soap(1e-2, b1=0.9, b2=0.99, factor_estimation="kl", max_precond_dim=1)
    ref = optax.adam(1e-2, b1=0.9, b2=0.99)
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(4):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        assert_trees_close(u1, u2, rtol=1e-6, atol=1e-7)
    assert int(s1[0].failures.skipped) == 0
