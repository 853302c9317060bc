"""K-FAC's exact-eigh inverses (``inverse='eigh'``) and ``damping_mode='exact'``.

Dense float64 references: the factored damping ``(A + pi s I)^{-1} ⊗ (B + s/pi I)^{-1}``
and the Kronecker sum's inverse ``(A ⊗ B + lambda I)^{-1}`` applied to ``vec(G)``,
on rectangular and rank-deficient factors; agreement with the Cholesky path; the
damping read at preconditioning time; the failure policy; the owner layout.
"""

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from tests.test_owner import _kfac_problem, _max_rel, _run_kfac


def _cov(rng, d, rows):
    x = rng.normal(size=(rows, d))
    return x.T @ x / rows


def _pi(a, b):
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(b) / b.shape[0]))


def _dense(a, b, g, lam, mode):
    """The float64 dense reference: the damped Kronecker curvature's inverse on vec(G).

    ``G`` is ``(d_A, d_B)``; row-major ``vec(G)`` makes the curvature of ``A G B``
    the matrix ``A ⊗ B``.
    """
    da, db = a.shape[0], b.shape[0]
    if mode == "exact":
        c = np.kron(a, b) + lam * np.eye(da * db)
    else:
        s = np.sqrt(lam)
        pa, pb = (_pi(a, b) * s, s / _pi(a, b)) if mode == "pi" else (lam, lam)
        c = np.kron(a + pa * np.eye(da), b + pb * np.eye(db))
    return np.linalg.solve(c, g.reshape(-1)).reshape(da, db)


def _one_step(tx, params, grads, stats):
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    return updates, state


# (d_A, d_B, rows of A's samples, rows of B's samples): rectangular, and rank-deficient
# factors (fewer samples than dimensions) on either side.
SHAPES = [(5, 3, 40, 40), (6, 4, 2, 30), (3, 7, 30, 2)]


@pytest.mark.parametrize("mode", ["pi", "absolute", "exact"])
@pytest.mark.parametrize("shape", SHAPES)
def test_eigh_step_matches_the_dense_float64_reference(mode, shape):
    da, db, ra, rb = shape
    rng = np.random.default_rng(da * 10 + db)
    a, b = _cov(rng, da, ra), _cov(rng, db, rb)
    g = rng.normal(size=(da, db))
    lam = 0.05
    tx = lo.scale_by_kfac(
        momentum=0.0, factor_decay=0.0, damping=lam, damping_mode=mode, inverse="eigh"
    )
    params = {"w": jnp.zeros((da, db))}
    stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    u, _ = _one_step(tx, params, {"w": jnp.asarray(g, jnp.float32)}, stats)
    want = _dense(a, b, g, lam, mode)
    np.testing.assert_allclose(
        np.asarray(u["w"], np.float64), want, rtol=2e-4, atol=2e-4 * np.abs(want).max()
    )


def test_exact_damping_differs_from_the_factored_one():
    # The two formulations are different curvatures (the factored one adds the
    # cross terms delta_B A ⊗ I + delta_A I ⊗ B): the test above cannot pass by
    # both modes computing the same thing.
    rng = np.random.default_rng(1)
    a, b, g = _cov(rng, 4, 50), _cov(rng, 3, 50), rng.normal(size=(4, 3))
    assert np.abs(_dense(a, b, g, 0.1, "exact") - _dense(a, b, g, 0.1, "pi")).max() > 1e-2


def test_eigh_folded_bias_matches_the_dense_homogeneous_reference():
    # A Flax kernel/bias pair: the homogeneous [W; b] block with the (d_in + 1) factor.
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(12, 4)), np.ones((12, 1))], axis=1)
    a, b = x.T @ x / 12, _cov(rng, 3, 12)
    gk, gb = rng.normal(size=(4, 3)), rng.normal(size=3)
    params = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
    stats = {
        "kernel": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)),
        "bias": lo.FoldedBias("kernel"),
    }
    grads = {"kernel": jnp.asarray(gk, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}
    for mode in ("pi", "exact"):
        tx = lo.kfac(
            1.0, momentum=0.0, factor_decay=0.0, damping=0.02, damping_mode=mode, inverse="eigh"
        )
        u, _ = _one_step(tx, params, grads, stats)
        want = -_dense(a, b, np.concatenate([gk, gb[None]], axis=0), 0.02, mode)
        got = np.concatenate([np.asarray(u["kernel"]), np.asarray(u["bias"])[None]], axis=0)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("sides", ["input", "output"])
def test_one_sided_eigh_damps_the_applied_factor_by_lambda_in_every_mode(sides):
    # A ⊗ I + lambda I = (A + lambda I) ⊗ I: all three modes give the same step.
    rng = np.random.default_rng(3)
    a, b, g = _cov(rng, 4, 3), _cov(rng, 3, 30), rng.normal(size=(4, 3))
    params = {"w": jnp.zeros((4, 3))}
    stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    want = (
        np.linalg.solve(a + 0.1 * np.eye(4), g)
        if sides == "input"
        else g @ np.linalg.inv(b + 0.1 * np.eye(3))
    )
    for mode in ("pi", "absolute", "exact"):
        tx = lo.scale_by_kfac(
            momentum=0.0,
            factor_decay=0.0,
            damping=0.1,
            damping_mode=mode,
            sides=sides,
            inverse="eigh",
        )
        u, _ = _one_step(tx, params, {"w": jnp.asarray(g, jnp.float32)}, stats)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-4, atol=1e-5)


def test_eigh_diagonal_factor_matches_the_dense_reference():
    # A factor longer than max_precond_dim keeps its diagonal: its eigenbasis is I.
    rng = np.random.default_rng(4)
    a, b, g = _cov(rng, 6, 20), _cov(rng, 3, 20), rng.normal(size=(6, 3))
    params = {"w": jnp.zeros((6, 3))}
    stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    for mode in ("pi", "exact"):
        tx = lo.scale_by_kfac(
            momentum=0.0,
            factor_decay=0.0,
            damping=0.05,
            damping_mode=mode,
            max_precond_dim=5,
            inverse="eigh",
        )
        u, _ = _one_step(tx, params, {"w": jnp.asarray(g, jnp.float32)}, stats)
        want = _dense(np.diag(np.diag(a)), b, g, 0.05, mode)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["pi", "absolute"])
def test_eigh_equals_cholesky_over_steps_with_refreshes(mode):
    # Same damping mode, EMAs, bias correction, momentum and refresh period: the two
    # inverses agree to float32 round-off on every step.
    rng = np.random.default_rng(5)
    params = {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3), "conv": jnp.zeros((2, 2, 3, 4))}
    common: dict[str, Any] = dict(
        damping=0.01, damping_mode=mode, precondition_frequency=2, factor_decay=0.9
    )
    txc, txe = lo.kfac(0.1, **common), lo.kfac(0.1, inverse="eigh", **common)
    sc, se = txc.init(params), txe.init(params)
    upc, upe = jax.jit(txc.update), jax.jit(txe.update)
    for _ in range(6):
        x = np.concatenate([rng.normal(size=(16, 5)), np.ones((16, 1))], axis=1)
        stats = {
            "kernel": lo.KfacFactors(
                jnp.asarray(x.T @ x / 16, jnp.float32), jnp.asarray(_cov(rng, 3, 16), jnp.float32)
            ),
            "bias": lo.FoldedBias("kernel"),
            "conv": lo.KfacFactors(
                jnp.asarray(_cov(rng, 12, 30), jnp.float32),
                jnp.asarray(_cov(rng, 4, 30), jnp.float32),
            ),
        }
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        uc, sc = upc(grads, sc, params, kfac_stats=stats)
        ue, se = upe(grads, se, params, kfac_stats=stats)
        assert _max_rel(uc, ue) < 1e-4
    assert tuple(int(x) for x in lo.failure_counts(se)) == (0, 0)


def test_eigh_applies_the_damping_of_the_step_without_a_refresh():
    # The decomposition is of the undamped factors: a damping changed between
    # refreshes (inject_hyperparams) acts at once; Cholesky keeps the old one.
    rng = np.random.default_rng(6)
    a, b = _cov(rng, 4, 30), _cov(rng, 3, 30)
    g = rng.normal(size=(4, 3))
    params = {"w": jnp.zeros((4, 3))}
    stats = {"w": lo.KfacFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))}
    grads = {"w": jnp.asarray(g, jnp.float32)}
    outs = {}
    for inverse in ("eigh", "cholesky"):
        tx = optax.inject_hyperparams(lo.scale_by_kfac, static_args=("damping_mode", "inverse"))(
            momentum=0.0,
            factor_decay=0.0,
            damping=0.1,
            damping_mode="exact" if inverse == "eigh" else "pi",
            precondition_frequency=100,
            inverse=inverse,
        )
        update = jax.jit(tx.update)
        _, state = update(grads, tx.init(params), params, kfac_stats=stats)
        state.hyperparams["damping"] = jnp.asarray(0.5)
        u, _ = update(grads, state, params, kfac_stats=stats)
        outs[inverse] = np.asarray(u["w"])
    np.testing.assert_allclose(outs["eigh"], _dense(a, b, g, 0.5, "exact"), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(outs["cholesky"], _dense(a, b, g, 0.1, "pi"), rtol=1e-4, atol=1e-6)


def test_failed_eigh_keeps_the_last_good_decomposition_and_is_counted():
    # Finite statistics whose eigendecomposition overflows (entries near float32's
    # maximum, scaled by the EMA's bias correction) are accepted, the decomposition is
    # not finite: the previous one is kept and counted, and the step uses it.
    tx = lo.scale_by_kfac(momentum=0.0, factor_decay=0.5, damping=0.01, inverse="eigh")
    params = {"w": jnp.zeros((3, 2))}
    g = {"w": jnp.asarray(np.arange(6.0).reshape(3, 2), jnp.float32)}
    a1, b1 = np.diag([1.0, 2.0, 4.0]), np.array([[2.0, 0.5], [0.5, 1.0]])
    update = jax.jit(tx.update)
    _, state = update(
        g, tx.init(params), params, kfac_stats={"w": lo.KfacFactors(*map(jnp.asarray, (a1, b1)))}
    )
    good = [np.asarray(x) for x in state.inverses["w"]]
    np.testing.assert_allclose(good[0][0, -1], [1.0, 2.0, 4.0], rtol=1e-6)  # eigenvalues
    big = np.full((3, 3), 3e38)
    u, state = update(
        g, state, params, kfac_stats={"w": lo.KfacFactors(*map(jnp.asarray, (big, b1)))}
    )
    assert int(state.failures.failed) == 1 and int(state.failures.skipped) == 0
    np.testing.assert_array_equal(np.asarray(state.inverses["w"][0]), good[0])
    np.testing.assert_array_equal(np.asarray(state.inverses["w"][1]), good[1])
    assert np.all(np.isfinite(np.asarray(u["w"])))


def test_eigh_state_layout_and_memory():
    # Per full factor the packed (d + 1, d) eigenvectors-and-eigenvalues, in precond_dtype.
    tx = lo.scale_by_kfac(inverse="eigh", precond_dtype=jnp.bfloat16)
    state = cast(Any, tx.init({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}))
    a, b = state.inverses["kernel"]
    assert a.shape == (1, 6, 5) and b.shape == (1, 4, 3) and a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a[0, :5], np.float32), np.eye(5))
    np.testing.assert_array_equal(np.asarray(a[0, 5], np.float32), np.ones(5))


@pytest.mark.slow  # ~45 s on 2 cores: two layouts, four jitted steps
def test_eigh_owner_layout_gives_the_replicated_updates_and_counts():
    params, spec, grads, stats = _kfac_problem(4, nan_at=3, bad_stats_at=1)

    def make(layout):
        return lo.kfac(
            1e-2,
            precondition_frequency=2,
            inverse="eigh",
            damping_mode="exact",
            state_layout=layout,
            dimension_numbers=spec,
        )

    ref, ref_state = _run_kfac(make("replicated"), params, grads, stats)
    out, state = _run_kfac(make("owner"), params, grads, stats)
    for r, o in zip(ref, out):
        assert _max_rel(r, o) < 1e-5
    assert lo.failure_counts(state) == lo.failure_counts(ref_state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inverse="svd"), "inverse"),
        (dict(damping_mode="exact"), "damping_mode='exact'.*inverse='eigh'.*inverse='cholesky'"),
        (dict(damping_mode="exact", inverse="cholesky"), "inverse='cholesky'"),
    ],
)
def test_bad_inverse_configurations_raise_naming_the_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.kfac(1e-2, **kwargs)
    with pytest.raises(ValueError, match=match):
        lo.scale_by_kfac(**kwargs)


# ----------------------------------------------------------------------------- steps without statistics


def _dense_stats(rng, d_in, d_out, rows=10):
    x = np.concatenate([rng.normal(size=(rows, d_in)), np.ones((rows, 1))], axis=1)
    return x.T @ x / rows, _cov(rng, d_out, rows)


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_statistics_frequency_keeps_the_factors_on_steps_without_statistics(inverse):
    # Statistics on steps 0, 2, 4 and kfac_stats=None on 1, 3: the factors are the EMA
    # of the three captured ones (debiased by 3 updates, not 5 steps); on a step
    # without statistics the kernel is preconditioned by them (the float64 dense
    # reference), an uncaptured leaf keeps its diagonal fallback.
    rng = np.random.default_rng(7)
    beta, lam = 0.8, 0.05
    params = {"l": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, "s": jnp.zeros(4)}
    tx = lo.kfac(
        1.0,
        momentum=0.0,
        factor_decay=beta,
        damping=lam,
        damping_mode="absolute",
        statistics_frequency=2,
        inverse=inverse,
    )
    state, update = tx.init(params), jax.jit(tx.update)
    captured: list[Any] = []
    ema: Any = None
    for t in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        stats = None
        if t % 2 == 0:
            a, b = _dense_stats(rng, 3, 2)
            captured.append((a, b))
            stats = {
                "l": {
                    "kernel": lo.KfacFactors(
                        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
                    ),
                    "bias": lo.FoldedBias("l/kernel"),
                }
            }
        before = cast(Any, state)
        u, state = update(grads, state, params, kfac_stats=stats)
        kfac_state = cast(Any, state)[0]
        if stats is None:
            for x, y in zip(before[0].factors["l"]["kernel"], kfac_state.factors["l"]["kernel"]):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        ema = (
            [
                np.zeros_like(captured[0][0]) if ema is None else ema[0],
                np.zeros_like(captured[0][1]) if ema is None else ema[1],
            ]
            if stats is not None
            else ema
        )
        if stats is not None:
            ema = [beta * e + (1 - beta) * c for e, c in zip(ema, captured[-1])]
        stored = kfac_state.factors["l"]["kernel"]
        np.testing.assert_allclose(np.asarray(stored[0][0]), ema[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(stored[1][0]), ema[1], rtol=1e-5, atol=1e-7)
        c = 1.0 / (1.0 - beta ** len(captured))
        g = np.concatenate([np.asarray(grads["l"]["kernel"]), np.asarray(grads["l"]["bias"])[None]])
        want = -_dense(c * ema[0], c * ema[1], g, lam, "absolute")
        got = np.concatenate([np.asarray(u["l"]["kernel"]), np.asarray(u["l"]["bias"])[None]])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        # The leaf without statistics: the diagonal fallback every step (nu moves).
        assert not np.array_equal(np.asarray(before[0].nu["s"]), np.asarray(kfac_state.nu["s"]))
    assert tuple(int(x) for x in lo.failure_counts(state)) == (0, 0)


def test_statistics_frequency_one_still_requires_statistics():
    tx = lo.kfac(1e-2)
    params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
    with pytest.raises(ValueError, match="needs the layer statistics"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="needs the layer statistics"):
        tx.update(params, tx.init(params), params, kfac_stats=None)


def test_step_without_statistics_before_any_uses_the_diagonal_fallback():
    # A kernel that never had statistics (all-zero factors) is not preconditioned by
    # its identity inverses: it takes the diagonal fallback, as an uncaptured layer.
    params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
    grads = {"kernel": jnp.ones((3, 2)), "bias": jnp.full(2, 2.0)}
    tx = lo.scale_by_kfac(momentum=0.0, damping=0.0, statistics_frequency=3)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=None)
    # The damped diagonal empirical Fisher, nu_hat = g^2 after one step: g / g^2 = 1 / g.
    np.testing.assert_allclose(np.asarray(u["kernel"]), np.ones((3, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["bias"]), np.full(2, 0.5), rtol=1e-6)


def test_step_without_statistics_in_the_owner_layout_raises():
    params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
    tx = lo.scale_by_kfac(statistics_frequency=2, state_layout="owner")
    with pytest.raises(ValueError, match="state_layout='owner'"):
        tx.update(params, tx.init(params), params, kfac_stats=None)


# ----------------------------------------------------------------------------- sub-batch statistics


def _capture_model():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 5, rngs=rngs)
            self.conv = nnx.Conv(1, 2, (2,), rngs=rngs)
            self.l2 = nnx.Linear(5 * 2, 2, rngs=rngs)

        def __call__(self, x):
            h = jnp.tanh(self.l1(x))
            h = jnp.tanh(self.conv(h[..., None]))
            return self.l2(jnp.reshape(h, (h.shape[0], -1)))

    return Net(nnx.Rngs(0))


@pytest.mark.parametrize("statistics", ["empirical", "gauss_newton"])
def test_statistics_batch_size_gives_the_sub_batch_statistics_and_full_batch_gradients(
    statistics,
):
    lof = pytest.importorskip("layerwise_optax.flax")
    model = _capture_model()
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(12, 2)), jnp.float32)
    full = lof.kfac_value_and_grad(lambda m, v: m(v), "mse", statistics=statistics)
    sub = lof.kfac_value_and_grad(
        lambda m, v: m(v), "mse", statistics=statistics, statistics_batch_size=5
    )
    loss, grads, stats = sub(model, x, y)
    loss_full, grads_full, stats_full = full(model, x, y)
    _, _, stats_first = full(model, x[:5], y[:5])
    # The loss and gradient of the whole batch, bit for bit.
    assert float(loss) == float(loss_full)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The statistics of the first five examples (their own pass), not the batch's.
    assert jax.tree.structure(stats) == jax.tree.structure(stats_first)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_first)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Every input factor differs from the whole batch's (an output factor may not:
    # Gauss-Newton's last layer has B = I on any batch).
    for name in ("l1", "conv", "l2"):
        diff = np.asarray(stats[name]["kernel"].a) - np.asarray(stats_full[name]["kernel"].a)
        assert np.abs(diff).max() > 1e-4, name
    # The whole batch as the sub-batch: the default's statistics, bit for bit.
    whole = lof.kfac_value_and_grad(
        lambda m, v: m(v), "mse", statistics=statistics, statistics_batch_size=12
    )
    for a, b in zip(jax.tree.leaves(whole(model, x, y)[2]), jax.tree.leaves(stats_full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_statistics_batch_size_is_checked():
    lof = pytest.importorskip("layerwise_optax.flax")
    with pytest.raises(ValueError, match="statistics_batch_size must be >= 1"):
        lof.kfac_value_and_grad(lambda m, v: m(v), statistics_batch_size=0)
    with pytest.raises(TypeError, match="statistics_batch_size"):
        lof.kfac_value_and_grad(lambda m, v: m(v), statistics_batch_size=2.5)
    fn = lof.kfac_value_and_grad(lambda m, v: m(v), statistics_batch_size=13)
    with pytest.raises(ValueError, match=r"statistics_batch_size=13 is larger than the batch \(12"):
        fn(_capture_model(), jnp.zeros((12, 3)), jnp.zeros((12, 2)))


def test_steps_without_statistics_refresh_only_what_changed():
    # A factor that fails to factor (indefinite, undamped) is counted at each refresh
    # that sees it. statistics_frequency=2, precondition_frequency=1: statistics on
    # steps 0 and 2 refresh; steps 1 and 3 have nothing new and skip the refresh.
    # precondition_frequency=3: step 2 brings the bad factor without a refresh, step 3
    # (no statistics, but the last refresh predates them) refreshes and counts it.
    params = {"w": jnp.zeros((3, 2))}
    g = {"w": jnp.ones((3, 2))}
    good = lo.KfacFactors(jnp.eye(3), jnp.eye(2))
    bad = lo.KfacFactors(jnp.diag(jnp.asarray([1.0, -1.0, 2.0])), jnp.eye(2))

    def failed_after(frequency, schedule):
        tx = lo.scale_by_kfac(
            momentum=0.0,
            factor_decay=0.0,
            damping=0.0,
            damping_mode="absolute",
            precondition_frequency=frequency,
            statistics_frequency=2,
        )
        state, update, out = tx.init(params), jax.jit(tx.update), []
        for s in schedule:
            _, state = update(g, state, params, kfac_stats=None if s is None else {"w": s})
            out.append(int(cast(Any, state).failures.failed))
        return out

    assert failed_after(1, [bad, None, bad, None]) == [1, 1, 2, 2]
    assert failed_after(3, [good, None, bad, None]) == [0, 0, 0, 1]
