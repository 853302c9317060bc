"""PSGD-Kron: the factor fit against a float64 reference, whitening, schedule, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _axes, _owner, _psgd, linalg
from tests._helpers import random_spd, run_steps


def _lower_bound_ref(a):
    """PSGD's bound (Li 2024; psgd-jax ``_norm_lower_bound``): ``||A² x|| / ||A x||``.

    ``x`` is the row of largest norm; float64 NumPy.
    """
    a = np.asarray(a, np.float64)
    x = a[np.argmax(np.sum(a * a, axis=1))]
    return np.linalg.norm(a @ (a @ x)) / np.linalg.norm(a @ x)


def _old_lower_bound(a):
    """The bound used before: ``max(||x||, ||A x|| / ||x||)`` (one product)."""
    x = a[np.argmax(np.sum(a * a, axis=1))]
    return max(np.linalg.norm(x), np.linalg.norm(a @ x) / np.linalg.norm(x))


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e8])
def test_spectral_norm_lower_bound_against_numpy(cond):
    rng = np.random.default_rng(int(np.log10(cond)))
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    a = (q * np.logspace(0, -np.log10(cond), 9)) @ q.T
    got = float(linalg.spectral_norm_lower_bound(jnp.asarray(a, jnp.float32)))
    true = np.linalg.norm(a, 2)
    assert true / 3 - 1e-6 <= got <= true * (1 + 1e-5)
    np.testing.assert_allclose(got, _lower_bound_ref(a), rtol=1e-6)
    assert float(linalg.spectral_norm_lower_bound(jnp.zeros((3, 3)))) == 0.0


def test_spectral_norm_lower_bound_is_psgds_and_never_below_the_one_product_bound():
    # Fit-step normalizers T1 + T2 = A A^T + B B^T of random probes: the reference's
    # bound is up to a few percent larger than max(||x||, ||Ax||/||x||), which made
    # our fit steps that much longer; a stack of them is bounded one by one.
    rng = np.random.default_rng(3)
    mats = []
    for n, m in [(4, 6), (8, 3), (16, 16), (32, 8), (5, 40)]:
        a, b = rng.standard_normal((n, m)), rng.standard_normal((n, m)) * rng.uniform(0.1, 3)
        mats.append(a @ a.T + b @ b.T)
    mats.append(np.diag([1.0, 1.0, 1.0, 1.0]) + 0.5)  # row norms tie
    mats.append(-np.eye(3) + np.ones((3, 3)))  # symmetric, indefinite
    for m in mats:
        got = float(linalg.spectral_norm_lower_bound(jnp.asarray(m, jnp.float32)))
        np.testing.assert_allclose(got, _lower_bound_ref(m), rtol=1e-6)
        assert got >= _old_lower_bound(m) * (1 - 1e-6)
        assert got <= np.linalg.norm(m, 2) * (1 + 1e-6)
    stack = np.stack(mats[:1] + [mats[0] * 1e-20, mats[0] * 1e20, 0 * mats[0]])
    got = np.asarray(linalg.spectral_norm_lower_bound(jnp.asarray(stack, jnp.float32)))
    want = [_lower_bound_ref(mats[0]) * s for s in (1, 1e-20, 1e20)] + [0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _fit_reference(qs, kinds, g, v, lr):
    """The factor step of a 3-D leaf (Li 2024; psgd-jax 0.2.9 ``_update_precond``), float64."""
    qs = [np.asarray(q, np.float64) for q in qs]
    mats = [np.diag(q) if k == "diag" else q for q, k in zip(qs, kinds)]
    a = np.einsum("ia,jb,kc,abc->ijk", *mats, g)
    inv_t = [np.linalg.inv(m).T for m in mats]
    b = np.einsum("ia,jb,kc,abc->ijk", *inv_t, v)
    out = []
    for i, (q, k) in enumerate(zip(qs, kinds)):
        am, bm = (
            np.moveaxis(a, i, 0).reshape(a.shape[i], -1),
            np.moveaxis(b, i, 0).reshape(b.shape[i], -1),
        )
        t1, t2 = am @ am.T, bm @ bm.T
        if k == "full":
            out.append(q - lr * np.triu(t1 - t2) / _lower_bound_ref(t1 + t2) @ q)
        else:
            d1, d2 = np.diag(t1), np.diag(t2)
            out.append(q - lr * (d1 - d2) / np.max(np.abs(d1 + d2)) * q)
    return out


def test_factor_fit_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    shape = (4, 3, 5)
    plan = _axes.make_plan(
        shape, _axes.DimensionNumbers(((0,), (1,), (2,))), max_precond_dim=4, block_size=None
    )
    assert plan.kinds == ("full", "full", "diag")
    qs = [
        np.triu(rng.standard_normal((4, 4))) + 3 * np.eye(4),
        np.triu(rng.standard_normal((3, 3))) + 2 * np.eye(3),
    ]
    qs.append(rng.uniform(0.5, 2.0, 5))
    g, v = rng.standard_normal(shape), rng.standard_normal(shape)
    want = _fit_reference(qs, plan.kinds, g, v, 0.1)
    got = _psgd.fit_factors(
        tuple(jnp.asarray(q, jnp.float32)[None] for q in qs),
        plan.to_blocks(jnp.asarray(g, jnp.float32)),
        plan.to_blocks(jnp.asarray(v, jnp.float32)),
        plan,
        jnp.float32(0.1),
    )
    for w, gt in zip(want, got):
        np.testing.assert_allclose(gt[0], w, rtol=1e-6, atol=1e-6)


def test_learns_the_inverse_hessian_of_a_kronecker_quadratic():
    # Gradients of 0.5 tr(W^T H1 W H2) at random points are H1 W H2 = H vec(W):
    # the whitening fixed point P E[g g^T] P = I is P = H^{-1}.
    rng = np.random.default_rng(1)

    h1, h2 = random_spd(rng, 4, 10.0), random_spd(rng, 3, 10.0)
    h = np.kron(h1, h2)  # acts on row-major vec(W)
    tx = lo.scale_by_psgd_kron(b1=0.0, precond_lr=0.01, precond_update_prob=1.0, clip_rms=None)
    state = tx.init({"w": jnp.zeros((4, 3))})
    h1j, h2j = jnp.asarray(h1, jnp.float32), jnp.asarray(h2, jnp.float32)

    @jax.jit
    def step(state, key):
        w = jax.random.normal(key, (4, 3))
        _, state = tx.update({"w": h1j @ w @ h2j}, state)
        return state, None

    state, _ = jax.lax.scan(step, state, jax.random.split(jax.random.key(0), 20000))
    qa, qb = (np.asarray(f[0], np.float64) for f in state.q["w"])
    p = np.kron(qa.T @ qa, qb.T @ qb)
    m = p @ h
    c = np.trace(m) / m.shape[0]
    err = np.linalg.norm(m / c - np.eye(12), 2)
    assert np.linalg.cond(h) == pytest.approx(100.0, rel=1e-6)
    # A stochastic fit with a constant precond_lr keeps noise ~ precond_lr: measured
    # err 0.16 and cond(P H) 1.29 here (0.44 / 1.96 at precond_lr=0.05), against
    # cond(H) = 100. The scale is also right: P ~ H^{-1}, not just proportional.
    assert err < 0.25, err
    assert np.linalg.cond(m) < 1.45
    assert 0.9 < c < 1.1


def test_no_fit_means_identity_preconditioner_and_clipped_momentum():
    tx = lo.scale_by_psgd_kron(
        b1=0.0, precond_update_prob=0.0, clip_rms=1.0, precond_init_scale=1.0
    )
    g = {"w": 3.0 * jnp.ones((4, 3)), "b": 0.5 * jnp.ones(3), "s": jnp.asarray(2.0)}
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], 1.0)  # RMS 3 clipped to 1
    np.testing.assert_allclose(u["b"], 0.5)
    np.testing.assert_allclose(u["s"], 1.0)
    assert int(state.precond_updates) == 0


def test_deterministic_given_the_seed_and_different_across_seeds():
    params = {"w": jnp.zeros((5, 4))}
    g = {"w": jax.random.normal(jax.random.key(3), (5, 4))}

    def run(seed):
        tx = lo.psgd_kron(1e-2, seed=seed, precond_update_prob=0.5)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(5):
            u, state = update(g, state, params)
        return np.asarray(u["w"]), int(state[0].precond_updates)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def test_memory_save_modes_use_diagonal_factors():
    params = {"w": jnp.zeros((6, 3))}
    q = lo.scale_by_psgd_kron(memory_save_mode="one_diag").init(params).q["w"]
    assert q[0].shape == (1, 6) and q[1].shape == (1, 3, 3)
    q = lo.scale_by_psgd_kron(memory_save_mode="all_diag").init(params).q["w"]
    assert q[0].shape == (1, 6) and q[1].shape == (1, 3)
    q = lo.scale_by_psgd_kron(max_precond_dim=4).init(params).q["w"]
    assert q[0].shape == (1, 6) and q[1].shape == (1, 3, 3)


def test_update_probability_schedule():
    sched = lo.precond_update_prob_schedule(
        max_prob=1.0, min_prob=0.03, decay=0.001, flat_start=500
    )
    np.testing.assert_allclose(sched(0), 1.0)
    np.testing.assert_allclose(sched(500), 1.0)
    np.testing.assert_allclose(sched(1500), np.exp(-1.0), rtol=1e-6)
    np.testing.assert_allclose(sched(10_000), 0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precond_lr=0.0), "precond_lr must be > 0"),
        (dict(precond_lr=2.0), r"precond_lr must be in \[0, 1\]"),
        (dict(memory_save_mode="some_diag"), "Unknown memory_save_mode 'some_diag'"),
        (dict(precond_update_prob=1.5), r"precond_update_prob must be in \[0, 1\]"),
        (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(clip_rms=0.0), "clip_rms must be > 0"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.psgd_kron(1e-3, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_factor_storage_keeps_the_state_dtype(dtype):
    # init stored P's scaled identity factors in float32 whatever precond_dtype was,
    # so the first fit's lax.cond branches disagreed (bf16 vs f32) and update raised.
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}
    g = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(3, -0.2), "s": jnp.asarray(0.3)}
    tx = lo.psgd_kron(1e-2, precond_dtype=dtype, precond_update_prob=1.0, precond_init_scale=2.0)
    state = tx.init(params)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert {f.dtype for f in jax.tree.leaves(state[0].q)} == {jnp.dtype(dtype)}
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(g, state, params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
    assert int(state[0].precond_updates) == 3
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    # P = Q^T Q = precond_init_scale * I at init, to the storage precision.
    q = state[0].q["w"]
    assert q[0].dtype == jnp.dtype(dtype)
    q0 = tx.init(params)[0].q["w"]
    p = np.kron(*(np.asarray(f[0], np.float64).T @ np.asarray(f[0], np.float64) for f in q0))
    np.testing.assert_allclose(p, 2.0 * np.eye(12), rtol=1e-2, atol=1e-2)


def test_a_leaf_fits_alike_whatever_dtype_shares_its_layout():
    # Leaves with the same block layout are fitted in one batch; a float64 leaf
    # (x64) used to be concatenated with a float32 one, fitting the latter in float64.
    def fitted(b_shape):
        with jax.enable_x64(True):
            params = {"a": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros(b_shape, jnp.float64)}
            g = {
                "a": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32),
                "b": jnp.ones(b_shape, jnp.float64),
            }
            tx = lo.scale_by_psgd_kron(precond_update_prob=1.0)
            u, state = jax.jit(tx.update)(g, tx.init(params))
            return np.asarray(u["a"]), [np.asarray(f) for f in state.q["a"]]

    (u_same, q_same), (u_other, q_other) = fitted((4, 3)), fitted((3, 4))
    assert u_same.dtype == np.float32
    np.testing.assert_array_equal(u_same, u_other)
    for x, y in zip(q_same, q_other):
        np.testing.assert_array_equal(x, y)


def _owner_case():
    """Leaves sharing one layout (one a stack of 4 slices) and a vector.

    Step 2: a NaN in ``a`` and an Inf in ``b`` (skipped); step 3: slice 1 of ``s``
    and all of ``c`` 1e10 times larger, so their fits overflow (``P`` starts at
    1e20 I) there and at step 4: each of those leaves keeps all its factors and
    counts one failure per fit.
    """
    params = {
        "a": jnp.zeros((16, 8)),
        "c": jnp.zeros((16, 8)),
        "s": jnp.zeros((4, 16, 8)),
        "b": jnp.zeros((8,)),
    }
    dims = {n: lo.DimensionNumbers(((0,), (1,))) for n in ("a", "c")}
    dims["s"] = lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))
    dims["b"] = lo.DimensionNumbers(((0,),))
    grads = []
    for t in range(5):
        g = {
            n: jax.random.normal(jax.random.key(10 * t + i), p.shape)
            for i, (n, p) in enumerate(sorted(params.items()))
        }
        if t == 2:
            g["a"] = g["a"].at[3, 5].set(jnp.nan)
            g["b"] = g["b"].at[0].set(jnp.inf)
        if t == 3:
            g["s"] = g["s"].at[1].multiply(1e10)
            g["c"] = g["c"] * 1e10
        grads.append(g)

    def make(**kwargs):
        return lo.scale_by_psgd_kron(
            precond_update_prob=1.0,
            precond_init_scale=1e20,
            clip_rms=None,
            dimension_numbers=dims,
            **kwargs,
        )

    return params, grads, make


def _assert_same_updates(ref, out):
    for r, o in zip(ref, out):
        for name in r:
            x, y = np.asarray(r[name], np.float64), np.asarray(o[name], np.float64)
            assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(x)), name


def test_owner_layout_keeps_probes_fit_failures_and_counts_per_leaf(monkeypatch):
    # The owner layout stacks a, c and the 4 slices of s into one group; its
    # probes must be the replicated layout's numbers (drawn per leaf from the
    # leaf's key, perturbed by the leaf's mean), a leaf whose fit overflows in
    # one block keeps all its factors, and every count is per leaf. The groups
    # are padded as on a 4-device mesh (6 -> 8 and 1 -> 4 blocks): padding never
    # counts, never changes a real result, and its factors stay finite.
    params, grads, make = _owner_case()
    ref, ref_state = run_steps(make(state_layout="replicated"), params, grads)
    monkeypatch.setattr(
        _owner, "decide", lambda choice, axes, plans, p: _owner.build(plans, p, (), 4)
    )
    tx = make(state_layout="owner")
    init = tx.init(params)
    out, state = run_steps(tx, params, grads)
    layout = _owner.layout_of(state)
    sizes = sorted((g.size, g.padded) for g in layout.groups)
    assert sizes == [(1, 4), (6, 8)]
    _assert_same_updates(ref, out)
    # Skipped: a and b at step 2; failed: s and c at steps 3 and 4 (the momentum
    # still holds the large gradient).
    assert [int(n) for n in lo.failure_counts(ref_state)] == [2, 4]
    assert [int(n) for n in lo.failure_counts(state)] == [2, 4]
    assert int(state.precond_updates) == int(ref_state.precond_updates) == 5
    # The factors, back per leaf, equal the replicated layout's; padded blocks
    # still hold their initial (finite) factors.
    for g, q, q0 in zip(layout.groups, state.q.blocks, init.q.blocks):
        start = 0
        for i, n in g.members:
            name = sorted(params)[i]
            for f, r in zip(q, ref_state.q[name]):
                mine = np.asarray(f[start : start + n], np.float64)
                theirs = np.asarray(r, np.float64)
                assert np.max(np.abs(mine - theirs)) <= 1e-5 * np.max(np.abs(theirs)), name
            start += n
        for f, f0 in zip(q, q0):
            assert bool(jnp.all(jnp.isfinite(f)))
            np.testing.assert_array_equal(f[g.size :], f0[g.size :])


def _apply_axes(mats, x):
    """``x`` with axis ``i`` mapped through ``mats[i]`` (float64)."""
    for i, m in enumerate(mats):
        x = np.moveaxis(np.tensordot(m, x, axes=(1, i)), 0, i)
    return x


def _blocked_reference(shape, block, grads, probes, *, b1=0.9, lr=0.1, init_scale=2.0):
    """PSGD-Kron run independently on every ``block``-sized sub-array of a leaf, float64.

    Each sub-array ``G[j]`` (the last ones shorter: no padding) has its own
    triangular factors ``Q_i = c^{1/(2k)} I`` of its own lengths, fitted every step
    on ``m_hat[j] + tiny noise[j]`` and the probe ``v[j]`` (Li 2024's step, then
    max-abs balancing), and preconditions ``Q^T Q m_hat[j]``. ``probes`` gives per
    step ``(v, noise, tiny)`` with ``v``/``noise`` leaf-shaped.
    """
    counts = [-(-d // block) for d in shape]
    index = list(np.ndindex(*counts))
    slices = {
        j: tuple(slice(b * block, min((b + 1) * block, d)) for b, d in zip(j, shape)) for j in index
    }
    k = len(shape)
    qs = {j: [init_scale ** (0.5 / k) * np.eye(s.stop - s.start) for s in slices[j]] for j in index}
    m = np.zeros(shape)
    out = []
    for t, (g, (v_all, noise_all, tiny)) in enumerate(zip(grads, probes), start=1):
        m = b1 * m + (1 - b1) * np.asarray(g, np.float64)
        m_hat = m / (1 - b1**t)
        u = np.zeros(shape)
        for j in index:
            sl = slices[j]
            g_blk = m_hat[sl] + tiny * noise_all[sl]
            q = qs[j]
            a = _apply_axes(q, g_blk)
            b = _apply_axes([np.linalg.inv(f).T for f in q], v_all[sl])
            new = []
            for i, f in enumerate(q):
                am = np.moveaxis(a, i, 0).reshape(a.shape[i], -1)
                bm = np.moveaxis(b, i, 0).reshape(b.shape[i], -1)
                t1, t2 = am @ am.T, bm @ bm.T
                new.append(f - lr * np.triu(t1 - t2) / _lower_bound_ref(t1 + t2) @ f)
            logs = np.log([np.max(np.abs(f)) for f in new])
            new = [f * np.exp(np.mean(logs) - lg) for f, lg in zip(new, logs)]
            qs[j] = new
            u[sl] = _apply_axes([f.T for f in new], _apply_axes(new, m_hat[sl]))
        out.append(u)
    return out, qs


@pytest.mark.parametrize("shape", [(10, 7), (5, 6, 9)])
def test_blocked_psgd_is_psgd_kron_on_each_block_against_float64(shape):
    # block_size=4 cuts 10 x 7 into 3 x 2 blocks (the last row and column of
    # blocks padded: 2 and 3 real entries) and 5 x 6 x 9 into 2 x 2 x 3 blocks.
    # Every block is fitted and preconditioned as PSGD-Kron on its unpadded
    # sub-array would be: padding gets no probe and does not set the balance.
    params = {"w": jnp.zeros(shape)}
    grads = [
        {
            "w": jax.random.normal(jax.random.key(t), shape)
            * jnp.linspace(0.5, 2.0, shape[-1]).reshape((1,) * (len(shape) - 1) + (-1,))
        }
        for t in range(4)
    ]
    tx = lo.scale_by_psgd_kron(
        precond_update_prob=1.0, precond_init_scale=2.0, clip_rms=None, block_size=4
    )
    plans = _axes.resolve(None, params, max_precond_dim=8192, block_size=4, merge_small_dims=False)
    plan = plans["w"]
    assert plan.blocks == (4,) * len(shape) and plan.kinds == ("full",) * len(shape)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out, probes = [], []
    m = np.zeros(shape)
    for t, g in enumerate(grads, start=1):
        # The probe keys of this step (the state's key), drawn as the fit draws them.
        _, _, keys = _psgd._draw(state.key, state.count, plans, 1.0)
        k1, k2 = jax.random.split(keys["w"])
        v, noise = (
            np.asarray(plan.from_blocks(jax.random.normal(k, plan.block_shape)), np.float64)
            for k in (k1, k2)
        )
        m = 0.9 * m + 0.1 * np.asarray(g["w"], np.float64)
        padded = np.prod([n * b for n, b in zip(plan.num_blocks, plan.blocks)])
        tiny = np.sqrt(np.finfo(np.float32).eps) * np.sum(np.abs(m / (1 - 0.9**t))) / padded
        probes.append((v, noise, tiny))
        u, state = step(g, state)
        out.append(np.asarray(u["w"], np.float64))
    want, factors = _blocked_reference(shape, 4, [g["w"] for g in grads], probes)
    for t, (got, ref) in enumerate(zip(out, want)):
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, (t, err)
    # Each block's factors, cut to its real lengths, are the reference's: also
    # their balance (equal max-abs over the real entries only; the padded corner
    # does not change the preconditioner but must not set the scale).
    for s, j in enumerate(np.ndindex(*plan.num_blocks)):
        for f, ref in zip(state.q["w"], factors[j]):
            n = ref.shape[0]
            mine = np.asarray(f[s, :n, :n], np.float64)
            np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5 * np.max(np.abs(ref)))
    # The fit moved the factors: the reference is not the initial preconditioner.
    assert np.max(np.abs(want[-1] - 2.0 * m / (1 - 0.9**4))) > 0.1 * np.max(np.abs(want[-1]))


def test_block_size_larger_than_every_dimension_is_unblocked_psgd_bit_for_bit():
    # Same plans as block_size=None; the blocked fit's balancing mask (all true)
    # must not change a bit.
    params = {"w": jnp.zeros((6, 5)), "t": jnp.zeros((3, 4, 2))}
    grads = [
        {
            n: jax.random.normal(jax.random.key(10 * t + i), p.shape)
            for i, (n, p) in enumerate(params.items())
        }
        for t in range(2)
    ]
    ref, _ = run_steps(lo.scale_by_psgd_kron(precond_update_prob=1.0), params, grads)
    out, _ = run_steps(lo.scale_by_psgd_kron(precond_update_prob=1.0, block_size=6), params, grads)
    for r, o in zip(ref, out):
        for name in r:
            np.testing.assert_array_equal(r[name], o[name])


def test_block_size_with_memory_save_modes():
    # 'one_diag' picks the diagonal dimension on the unblocked lengths (the 40-long
    # one, unblocked); the other is blocked. 'all_diag': nothing is blocked.
    params = {"w": jnp.zeros((40, 10))}
    one = lo.scale_by_psgd_kron(block_size=4, memory_save_mode="one_diag").init(params)
    assert [f.shape for f in one.q["w"]] == [(3, 40), (3, 4, 4)]
    every = lo.scale_by_psgd_kron(block_size=4, memory_save_mode="all_diag").init(params)
    assert [f.shape for f in every.q["w"]] == [(1, 40), (1, 10)]
