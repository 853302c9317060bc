"""Shampoo's per-factor root orders (``factor_exponents``) and ``trace_normalize``.

Issue 19, item 5: against the dense float64 reference (``tests/_helpers.shampoo_reference``)
on rectangular, rank-one and order-3 leaves; equivalences (defaults bit for bit, blocking,
state layouts); the state of a dropped factor; configuration errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _axes, _linalg
from tests._helpers import shampoo_reference

HP = dict(b1=0.9, b2=0.99, eps=1e-8, damping=1e-3)


def _grads(shape, n, seed=0, rank_one=False, scale=1.0):
    rng = np.random.default_rng(seed)
    if not rank_one:
        return [(scale * rng.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    u, v = rng.standard_normal(shape[0]), rng.standard_normal(shape[1:])
    return [(scale * np.multiply.outer(u, v) * (1 + 0.3 * k)).astype(np.float32) for k in range(n)]


def _run(tx, grads, name="w"):
    params = {name: jnp.zeros(grads[0].shape)}
    state, outs = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update({name: jnp.asarray(g)}, state, params)
        outs.append(np.asarray(u[name]))
    return outs, state


def _exact(**kw):
    """The library's settings that the dense reference computes (absolute damping, no merging)."""
    return lo.scale_by_shampoo(
        **HP,
        factor_decay=0.9,
        merge_small_dims=False,
        start_preconditioning_step=0,
        relative_damping=False,
        **kw,
    )


def _close(got, want, rtol=2e-3, atol=2e-5):
    for t, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {t}")


def _order_3(dims):
    return (4, None, 2) if len(dims) == 3 else (2, None)


def _uneven(dims):
    return (2, 6)


def _defaults(dims):
    """The default orders, given explicitly: ``2k`` for each of the ``k`` factors."""
    k = sum(d > 1 for d in dims)
    return tuple(2 * k for _ in dims)


# ----------------------------------------------------------------------------- dense reference


@pytest.mark.parametrize(
    "shape,exponents,roots,freq,rank_one,grafting",
    [
        ((4, 3), "one_sided", [None, 2], 1, False, "adam"),
        ((3, 5), "one_sided", [2, None], 2, False, "none"),
        ((5, 3), "one_sided", [None, 2], 1, True, "adam"),
        ((4, 3), _uneven, [2, 6], 1, False, "none"),
        ((2, 3, 4), _order_3, [4, None, 2], 1, False, "adam"),
        ((2, 3, 4), "one_sided", [2, None, None], 2, False, "adagrad"),
    ],
    ids=["4x3_one_sided", "3x5_one_sided_stale", "rank_one", "uneven", "order3", "order3_adagrad"],
)
def test_factor_exponents_match_dense_reference(shape, exponents, roots, freq, rank_one, grafting):
    grads = _grads(shape, 6, rank_one=rank_one)
    tx = _exact(precondition_frequency=freq, grafting=grafting, factor_exponents=exponents)
    got, state = _run(tx, grads)
    want = shampoo_reference(
        grads, **HP, factor_decay=0.9, freq=freq, grafting=grafting, roots=roots
    )
    _close(got, want)
    # A dropped factor keeps no statistic and no root: an empty (stack, 0) placeholder.
    for i, r in enumerate(roots):
        for part in (state.stats["w"][i], state.roots["w"][i]):
            assert part.shape == ((1, 0) if r is None else (1, shape[i], shape[i]))
    # ... and the result differs from two-sided Shampoo (except for rank-one gradients,
    # whose preconditioned direction is u v^T either way once grafted).
    full = shampoo_reference(grads, **HP, factor_decay=0.9, freq=freq, grafting=grafting)
    assert np.allclose(want[-1], full[-1], rtol=1e-2) == (rank_one and grafting != "none")


def test_one_sided_preconditions_the_shorter_side_with_the_inverse_square_root():
    # One step, no momentum, no grafting: the update is (G G^T + d I)^{-1/2} G for a wide G.
    g = _grads((3, 5), 1, seed=4)[0]
    tx = lo.scale_by_shampoo(
        b1=0.0,
        grafting="none",
        relative_damping=False,
        damping=1e-4,
        factor_decay=1.0,
        start_preconditioning_step=0,
        factor_exponents="one_sided",
    )
    (got,), _ = _run(tx, [g])
    g64 = g.astype(np.float64)
    w, v = np.linalg.eigh(g64 @ g64.T + 1e-4 * np.eye(3))
    np.testing.assert_allclose(got, (v / np.sqrt(w)) @ v.T @ g64, rtol=1e-4, atol=1e-6)


def test_one_sided_with_blocking_is_one_sided_per_block():
    # block_size=3 splits the rows of a 6 x 3 leaf into two blocks, each with its own
    # right factor: the update is the reference on each 3 x 3 half (grafted per block).
    grads = _grads((6, 3), 5, seed=1)
    tx = _exact(precondition_frequency=1, factor_exponents="one_sided", block_size=3)
    got, state = _run(tx, grads)
    halves = [
        shampoo_reference(
            [g[r] for g in grads], **HP, factor_decay=0.9, freq=1, grafting="adam", roots=[None, 2]
        )
        for r in (slice(0, 3), slice(3, 6))
    ]
    _close(got, [np.concatenate([a, b]) for a, b in zip(*halves)])
    assert [s.shape for s in state.stats["w"]] == [(2, 0), (2, 3, 3)]


def test_one_sided_kl_holds_the_dropped_factor_at_the_identity():
    # KL-Shampoo's statistic of the kept side uses the other factors' inverses; a side
    # without a factor counts as L = I, so L_1 = EMA(G G^T / n_2).
    grads = _grads((3, 5), 6, seed=2)
    kw = dict(precondition_frequency=1, grafting="none", factor_estimation="kl")
    got, _ = _run(_exact(factor_exponents="one_sided", **kw), grads)
    want = shampoo_reference(
        grads, **HP, factor_decay=0.9, freq=1, grafting="none", kl=True, roots=[2, None]
    )
    _close(got, want)


# ----------------------------------------------------------------------------- equivalences


def _tree():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "a": jax.random.normal(k[0], (6, 4)),
        "b": jax.random.normal(k[1], (3, 5)),
        "c": jax.random.normal(k[2], (2, 3, 4)),
        "d": jax.random.normal(k[3], (7,)),
    }


def _steps(tx, n=5):
    params = _tree()
    state = tx.init(params)
    update, outs = jax.jit(tx.update), []
    for t in range(n):
        g = jax.tree.map(lambda x: x * (1.0 + 0.5 * t) + 0.1 * t, params)
        u, state = update(g, state, params)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block_size": 3},
        {"merge_small_dims": False, "grafting": "adagrad"},
        {"factor_estimation": "kl", "damping": 1e-3, "grafting": "none"},
        {"state_layout": "owner"},
    ],
    ids=["default", "blocked", "unmerged_adagrad", "kl", "owner"],
)
def test_default_orders_given_explicitly_are_bit_identical(kw):
    kl = kw.get("factor_estimation") == "kl"
    explicit = (lambda dims: (2,) * len(dims)) if kl else _defaults
    base, s0 = _steps(lo.shampoo(1e-2, precondition_frequency=2, **kw))
    over, s1 = _steps(lo.shampoo(1e-2, precondition_frequency=2, factor_exponents=explicit, **kw))
    for a, b in zip(base, over):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # (An owner layout's groups carry their orders, so compare the state's arrays.)
    for x, y in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "options",
    [
        dict(factor_exponents="one_sided"),
        dict(factor_exponents=_order_3, block_size=3),
        dict(trace_normalize=True, grafting="none"),
    ],
    ids=["one_sided", "callable_blocked", "trace_normalize"],
)
def test_owner_and_replicated_layouts_agree(options):
    kw = dict(precondition_frequency=2, merge_small_dims=False, **options)
    rep, _ = _steps(lo.shampoo(1e-2, state_layout="replicated", **kw))
    own, state = _steps(lo.shampoo(1e-2, state_layout="owner", **kw))
    for a, b in zip(rep, own):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), a, b)
    assert "Grouped" in type(state[0].stats).__name__


def test_dropped_factors_shrink_the_state():
    params = {"w": jnp.zeros((64, 16))}
    sizes = {}
    for exponents in (None, "one_sided"):
        state = lo.scale_by_shampoo(factor_exponents=exponents).init(params)
        sizes[exponents] = sum(x.size for x in jax.tree.leaves((state.stats, state.roots)))
    assert sizes[None] == 2 * (64 * 64 + 16 * 16)
    assert sizes["one_sided"] == 2 * 16 * 16
    plan = _axes.resolve(None, params, max_precond_dim=1024)["w"]
    assert plan.with_exponents((None, 2)).state_floats() == 16 * 16


def test_a_leaf_with_every_factor_dropped_takes_the_graft_update():
    grads = _grads((4, 3), 3, seed=5)
    got, state = _run(_exact(factor_exponents=lambda dims: (None, None)), grads)
    want, _ = _run(_exact(dimension_numbers={"w": None}), grads)
    _close(got, want, rtol=1e-6, atol=1e-8)
    assert [s.shape for s in state.stats["w"]] == [(1, 0), (1, 0)]


def test_factor_exponents_survive_inject_hyperparams():
    grads = _grads((4, 3), 3, seed=6)
    kw = dict(learning_rate=1e-2, precondition_frequency=1, factor_exponents="one_sided")
    plain, _ = _run(lo.shampoo(**kw), grads)
    injected, _ = _run(lo.inject_hyperparams(lo.shampoo)(**kw), grads)
    _close(injected, plain, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- trace_normalize


@pytest.mark.parametrize(
    "shape,freq,rank_one,roots",
    [
        ((4, 3), 1, False, None),
        ((3, 5), 2, False, None),
        ((5, 3), 1, True, None),
        ((2, 3, 4), 1, False, None),
        ((4, 3), 1, False, [None, 2]),
    ],
    ids=["4x3", "3x5_stale", "rank_one", "order3", "one_sided"],
)
def test_trace_normalize_matches_dense_reference(shape, freq, rank_one, roots):
    grads = _grads(shape, 6, rank_one=rank_one, scale=3.0)
    exponents = "one_sided" if roots else None
    tx = _exact(
        precondition_frequency=freq,
        grafting="none",
        trace_normalize=True,
        factor_exponents=exponents,
    )
    got, _ = _run(tx, grads)
    kw = dict(factor_decay=0.9, freq=freq, grafting="none", roots=roots)
    want = shampoo_reference(grads, **HP, trace_normalize=True, **kw)
    _close(got, want)
    plain = shampoo_reference(grads, **HP, **kw)
    assert not np.allclose(want[-1], plain[-1], rtol=1e-2)


def test_trace_normalize_makes_the_root_scale_free():
    # Without grafting, scaling the gradients by c scales the update by c (a first
    # moment through a root of a scale-free factor); plain Shampoo's L^{-1/4} G R^{-1/4}
    # is invariant instead.
    grads = _grads((4, 3), 4, seed=7)
    kw = dict(precondition_frequency=1, grafting="none", start_preconditioning_step=0)
    for normalize, power in ((True, 1.0), (False, 0.0)):
        tx = lo.scale_by_shampoo(**kw, trace_normalize=normalize, damping=1e-6)
        small, _ = _run(tx, grads)
        big, _ = _run(tx, [100.0 * g for g in grads])
        np.testing.assert_allclose(big[-1], 100.0**power * small[-1], rtol=2e-3, atol=1e-6)


def test_trace_normalize_under_grafting_and_relative_damping_changes_nothing():
    # With relative damping the normalization scales each factor's root by a positive
    # number per block, which grafting divides out: the same update up to round-off.
    grads = _grads((4, 3), 5, seed=8)
    kw = dict(precondition_frequency=1, start_preconditioning_step=0)
    on, _ = _run(lo.scale_by_shampoo(**kw, trace_normalize=True), grads)
    off, _ = _run(lo.scale_by_shampoo(**kw), grads)
    _close(on, off, rtol=1e-4, atol=1e-7)


def test_trace_normalize_is_bit_identical_off():
    base, s0 = _steps(lo.shampoo(1e-2, precondition_frequency=2))
    off, s1 = _steps(lo.shampoo(1e-2, precondition_frequency=2, trace_normalize=False))
    for a, b in zip(base, off):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    jax.tree.map(np.testing.assert_array_equal, s0, s1)


def test_trace_normalize_oracle():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((3, 4, 4))
    s = np.einsum("nij,nkj->nik", a, a)
    s[2] = 0.0  # an empty statistic stays zero
    got = np.asarray(_linalg.trace_normalize(jnp.asarray(s, jnp.float32)))
    want = np.stack([x / (np.trace(x) / 4) if np.trace(x) > 0 else x for x in s])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    d = np.abs(rng.standard_normal((2, 5)))
    got_d = np.asarray(_linalg.trace_normalize(jnp.asarray(d, jnp.float32), diagonal=True))
    np.testing.assert_allclose(got_d, d / d.mean(axis=-1, keepdims=True), rtol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(factor_exponents="two_sided"), "factor_exponents must be None, 'one_sided'"),
        (dict(factor_exponents=3), "factor_exponents must be None, 'one_sided'"),
        (dict(factor_exponents=_uneven, root_exponent=4), "root_exponent=4 and a callable"),
        (dict(trace_normalize=True, factor_estimation="kl"), "trace_normalize=True with"),
    ],
    ids=["unknown_preset", "int", "both_orders", "trace_kl"],
)
def test_bad_configurations_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        lo.shampoo(1e-2, **kw)


@pytest.mark.parametrize(
    "exponents,kl,match",
    [
        (lambda dims: (2,), False, r"for each of its 2 factor dimensions, got \(2,\)"),
        (lambda dims: (0, 2), False, r"got \(0, 2\)"),
        (lambda dims: (True, 2), False, r"got \(True, 2\)"),
        (lambda dims: 2, False, r"got 2\."),
        (lambda dims: (3, None), True, "must be even"),
        (lambda dims: {4: (2, 2)}[dims[1]], False, r"factor_exponents\(4, 3\) raised KeyError: 3"),
    ],
    ids=["length", "zero", "bool", "not_a_tuple", "odd_kl", "callable_raises"],
)
def test_bad_orders_raise_at_init_naming_the_leaf(exponents, kl, match):
    kw = dict(factor_estimation="kl") if kl else {}
    tx = lo.shampoo(1e-2, factor_exponents=exponents, **kw)
    with pytest.raises(ValueError, match=r"param \['w'\] with shape \(4, 3\)") as e:
        tx.init({"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)})
    assert e.match(match)


def test_numpy_integer_orders_are_python_ints():
    """A callable may return NumPy integers (a user's ``np.where``/``np.full``)."""
    plain, _ = _steps(lo.shampoo(1e-2, precondition_frequency=2, factor_exponents=_defaults))
    numpy, _ = _steps(
        lo.shampoo(
            1e-2,
            precondition_frequency=2,
            factor_exponents=lambda dims: tuple(np.int64(e) for e in _defaults(dims)),
        )
    )
    for a, b in zip(plain, numpy):
        jax.tree.map(np.testing.assert_array_equal, a, b)
