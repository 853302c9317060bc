"""The owner layout (layerwise_optax/_owner.py) on one device: same updates, same counts.

``state_layout='owner'`` stacks the blocks of all leaves with the same block
shape into groups; without a mesh the stacks are kept whole, so every step
exercises the grouped code path (guards per block, NaN padding of invalid
leaves, per-leaf skip counts, the way back to the params' shapes) without a
device mesh. The multi-device checks (1/2/4/8 devices, Auto and Explicit axes,
per-device bytes) run in ``tests/test_sharding.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _owner
from tests._helpers import run_steps

# Owner-layout transforms and configurations exercising their options: blocks,
# diagonal factors (max_precond_dim), KL statistics, Newton roots, Nesterov, SGD
# grafting. ``make(state_layout=...)`` builds one.
CONFIGS = {
    "shampoo_blocked": lambda **k: lo.shampoo(1e-2, block_size=16, precondition_frequency=2, **k),
    "shampoo_diag_newton": lambda **k: lo.shampoo(
        1e-2, max_precond_dim=40, root_method="newton", nesterov=True, precondition_frequency=2, **k
    ),
    "kl_shampoo": lambda **k: lo.shampoo(
        1e-2, factor_estimation="kl", damping=1e-3, grafting="none", precondition_frequency=2, **k
    ),
    "shampoo_sgd_graft": lambda **k: lo.shampoo(1e-2, grafting="sgd", block_size=32, **k),
    "soap_blocked": lambda **k: lo.soap(1e-2, block_size=16, precondition_frequency=2, **k),
    "soap": lambda **k: lo.soap(1e-2, max_precond_dim=40, **k),
    "psgd_bf16_q": lambda **k: lo.psgd_kron(
        1e-2, precond_update_prob=1.0, precond_dtype="bfloat16", **k
    ),
    # 16-blocks: v's 200-long axis ends in a padded block (8 real rows), and the
    # blocks of w, v and h share one group.
    "psgd_blocked": lambda **k: lo.psgd_kron(1e-2, precond_update_prob=1.0, block_size=16, **k),
    "psgd_one_diag_coin": lambda **k: lo.psgd_kron(
        1e-2, precond_update_prob=0.5, seed=3, memory_save_mode="one_diag", nesterov=True, **k
    ),
}


def _params():
    # Rectangular, rank-deficient (3 x 200: rank <= 3 per step), a conv kernel, a
    # vector (no factors: params-shaped state) and bfloat16 (its own group dtype).
    return {
        "w": jnp.zeros((64, 48)),
        "v": jnp.zeros((3, 200)),
        "conv": jnp.zeros((3, 3, 4, 8)),
        "b": jnp.zeros((48,)),
        "h": jnp.zeros((48, 64), jnp.bfloat16),
    }


def _grads(params, steps, *, nan_at=None):
    out = []
    for t in range(steps):
        leaves = {
            n: jax.random.normal(jax.random.key(10 * t + i), p.shape).astype(p.dtype)
            for i, (n, p) in enumerate(sorted(params.items()))
        }
        if t == nan_at:
            leaves["w"] = leaves["w"].at[3, 5].set(jnp.nan)
            leaves["b"] = leaves["b"].at[0].set(jnp.inf)
        out.append(leaves)
    return out


def _max_rel(a, b):
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30))
    return max(errs)


# The variants beyond one blocked configuration per family run in the slow tier
# (blocked PSGD also runs on 1-8 devices in tests/test_sharding.py, default tier).
SLOW = {"shampoo_diag_newton", "shampoo_sgd_graft", "soap", "psgd_blocked"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in sorted(CONFIGS)],
)
def test_owner_layout_gives_the_replicated_updates_and_counts(name):
    params = _params()
    grads = _grads(params, 5, nan_at=3)
    ref, ref_state = run_steps(CONFIGS[name](state_layout="replicated"), params, grads)
    out, state = run_steps(CONFIGS[name](state_layout="owner"), params, grads)
    assert _owner.layout_of(state) is not None
    assert _owner.layout_of(ref_state) is None
    # Same blocks, same operations: float32 round-off (bfloat16 leaf: its own rounding).
    for r, o in zip(ref, out):
        assert jax.tree.structure(r) == jax.tree.structure(o)
        for key in r:
            # bfloat16 updates: one ulp (2**-8). KL-Shampoo's statistics go through
            # the inverse roots, which amplify float32 round-off by ~1/damping
            # (measured 1.2e-5 on w at damping 1e-3; every other leaf bit-equal).
            tol = 2e-2 if r[key].dtype == jnp.bfloat16 else 3e-5 if name == "kl_shampoo" else 1e-5
            assert r[key].dtype == o[key].dtype
            assert _max_rel(r[key], o[key]) < tol, (name, key)
    # Skipped counts per (leaf, step) as in the replicated layout (w and b at
    # step 3), whatever the number of blocks; padded blocks never count.
    counts = [int(c) for c in lo.failure_counts(state)]
    assert counts == [int(c) for c in lo.failure_counts(ref_state)]
    assert counts[0] == 2


def test_owner_layout_groups_blocks_of_all_leaves_by_shape_and_dtype():
    params = _params()
    tx = lo.scale_by_shampoo(block_size=16, state_layout="owner")
    state = tx.init(params)
    layout = _owner.layout_of(state)
    # w (64 x 48) and h (48 x 64) share (16, 16) blocks (h is bfloat16: its blocks
    # compute in float32 too, so it joins them); conv is a 36 x 8 matrix.
    by_shape = {(g.key.blocks, g.dtype): g.size for g in layout.groups}
    assert by_shape == {
        ((16, 16), "float32"): 4 * 3 + 3 * 4,
        ((3, 16), "float32"): 13,
        ((16, 8), "float32"): 3,
    }
    assert layout.devices == 1 and layout.padding() == 0
    # The vector keeps params-shaped state.
    assert [np.shape(x) for x in state.mu.leaves] == [(48,)]
    # Statistics, roots and moments are stacks over the groups.
    for g, stats in zip(layout.groups, state.stats.blocks):
        assert all(s.shape[0] == g.padded for s in stats)


def test_owner_layout_pads_each_group_with_identity_statistics():
    params = {"w": jnp.zeros((5, 6)), "u": jnp.zeros((5, 6))}
    plans = lo.scale_by_shampoo()  # only for the plans' options
    del plans
    from layerwise_optax import _axes

    plans = _axes.resolve(None, params, max_precond_dim=1024)
    layout = _owner.build(plans, params, ("data",), 8)
    (group,) = layout.groups
    assert (group.size, group.padded, layout.padding()) == (2, 8, 6)
    zeros = _owner.zeros(layout, plans, params)
    assert zeros["blocks"][0].shape == (8, 5, 6)
    stats = ((jnp.zeros((8, 5, 5)), jnp.zeros((8, 6, 6))),)
    eyes = ((jnp.broadcast_to(jnp.eye(5), (8, 5, 5)), jnp.broadcast_to(jnp.eye(6), (8, 6, 6))),)
    (padded,) = _owner.pad_identity(layout, stats, eyes)
    np.testing.assert_array_equal(padded[0][:2], 0)
    np.testing.assert_array_equal(padded[0][2:], np.broadcast_to(np.eye(5), (6, 5, 5)))
    # Padded gradient blocks are NaN (kept out of every statistic); real ones exact.
    g = {"w": jnp.ones((5, 6)), "u": 2 * jnp.ones((5, 6))}
    grouped = _owner.to_groups(layout, plans, g)
    assert np.all(np.isnan(np.asarray(grouped["blocks"][0][2:])))
    back = _owner.from_groups(layout, plans, grouped, g)
    np.testing.assert_array_equal(back["u"], g["u"])
    # failure_report says when a group has fewer blocks than devices (padded).
    text = _owner.describe(layout)
    assert "1 groups have fewer blocks than devices" in text and "6 padded blocks" in text
    assert _owner.describe(None) == "replicated"


def test_failure_report_names_the_layout():
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
    report = lo.failure_report(lo.shampoo(1e-2, state_layout="owner").init(params))
    (entry,) = report.entries
    assert entry.layout.startswith("owner: 1 block groups over () (1 devices), 0 padded")
    assert entry.layout in str(report)
    report = lo.failure_report(lo.shampoo(1e-2).init(params))
    assert report.entries[0].layout == "replicated" and "owner" not in str(report)


def test_owner_layout_under_masked_and_with_nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    out = {}
    for layout in ("replicated", "owner"):
        tx = lo.shampoo(1e-2, state_layout=layout)
        state = tx.init(params)
        for _ in range(3):
            u, state = jax.jit(tx.update)(grads, state, params)
        out[layout] = u
    assert jax.tree.structure(out["owner"]) == jax.tree.structure(out["replicated"])
    assert _max_rel(out["owner"], out["replicated"]) < 1e-5
    # A masked transform keeps the masked leaf out of every group.
    mask = {"w": True, "b": False, "u": True}
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,)), "u": jnp.zeros((6, 4))}
    g = {
        k: jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape)
        for k, p in params.items()
    }
    res = {}
    for layout in ("replicated", "owner"):
        tx = optax.masked(lo.scale_by_soap(state_layout=layout), mask)
        state = tx.init(params)
        u, state = jax.jit(tx.update)(g, state, params)
        u, state = jax.jit(tx.update)(g, state, params)
        res[layout] = u
    assert _max_rel(res["owner"], res["replicated"]) < 1e-5
    np.testing.assert_array_equal(res["owner"]["b"], g["b"])


def test_owner_layout_rejects_bad_options_and_other_trees():
    with pytest.raises(ValueError, match="state_layout"):
        lo.shampoo(1e-2, state_layout="sharded")
    with pytest.raises(ValueError, match="owner_axes"):
        lo.soap(1e-2, owner_axes=())
    with pytest.raises(ValueError, match="owner_axes"):
        lo.scale_by_shampoo(owner_axes=("data", 3))
    mesh = jax.make_mesh((1,), ("data",))
    tx = lo.shampoo(1e-2, state_layout="owner", owner_axes=("model",))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="'model'.*axes are \\('data',\\)"):
        tx.init({"w": jnp.zeros((4, 3))})
    tx = lo.shampoo(1e-2, state_layout="owner")
    state = tx.init({"w": jnp.zeros((4, 3))})
    with pytest.raises(ValueError, match="do not match the params"):
        tx.update({"w": jnp.zeros((5, 3))}, state)


# K-FAC takes its factors from kfac_stats, not from the gradient: its own
# configurations, on a tree with every kind of leaf K-FAC has (see _kfac_problem).
KFAC_CONFIGS = {
    "kfac": lambda **k: lo.kfac(1e-2, precondition_frequency=2, **k),
    "kfac_absolute_input": lambda **k: lo.kfac(
        1e-2, damping=1e-3, damping_mode="absolute", sides="input", **k
    ),
    "kfac_output_diag_nesterov": lambda **k: lo.kfac(
        1e-2, sides="output", max_precond_dim=40, nesterov=True, factor_decay=0.8, **k
    ),
    "kfac_pi_diag_bf16_mu": lambda **k: lo.kfac(
        1e-2, max_precond_dim=50, mu_dtype=jnp.bfloat16, precondition_frequency=3, **k
    ),
}
# The default tier runs the default configuration; the others are slow.
_KFAC_PARAMS = [
    pytest.param(n, marks=() if n == "kfac" else pytest.mark.slow) for n in sorted(KFAC_CONFIGS)
]


def _kfac_problem(steps, *, nan_at=None, bad_stats_at=None):
    """Params, dimension numbers, gradients and statistics covering K-FAC's leaf kinds.

    ``l1``: a kernel with its bias folded (one homogeneous 65 x 48 slice); ``l3``:
    an unfolded 65 x 48 kernel with no statistics (same group as ``l1``: a group
    in which some blocks take the diagonal fallback); ``l2``: rank-deficient 3 x 200;
    ``stack``: two stacked layers (batch axis) with a separate bias block that
    shares its (1 x 6) group with the norm scale ``norm`` (no statistics);
    ``t``: a scalar (no factors at all).
    """
    dn = lo.DimensionNumbers
    params = {
        "l1": {"kernel": jnp.zeros((64, 48)), "bias": jnp.zeros((48,))},
        "l2": {"kernel": jnp.zeros((3, 200))},
        "l3": {"kernel": jnp.zeros((65, 48))},
        "stack": {"kernel": jnp.zeros((2, 8, 6)), "bias": jnp.zeros((2, 6))},
        "norm": {"scale": jnp.zeros((6,))},
        "t": jnp.zeros(()),
    }
    spec = {
        "l1": {"kernel": dn(((0,), (1,))), "bias": lo.FoldedBias("l1/kernel")},
        "l2": {"kernel": dn(((0,), (1,)))},
        "l3": {"kernel": dn(((0,), (1,)))},
        "stack": {
            "kernel": dn(((1,), (2,)), batch_axes=(0,)),
            "bias": dn(((), (1,)), batch_axes=(0,)),
        },
        "norm": {"scale": dn(((), (0,)))},
        "t": None,
    }

    def cov(key, batch, d, rows):
        x = jax.random.normal(key, batch + (rows, d))
        return jnp.einsum("...ri,...rj->...ij", x, x) / rows

    grads, stats = [], []
    for t in range(steps):
        k = jax.random.split(jax.random.key(t), 12)
        leaves, treedef = jax.tree.flatten(params)
        g = treedef.unflatten(
            [jax.random.normal(jax.random.fold_in(k[0], i), x.shape) for i, x in enumerate(leaves)]
        )
        s = {
            "l1": {
                "kernel": lo.KfacFactors(cov(k[6], (), 65, 80), cov(k[7], (), 48, 80)),
                "bias": lo.FoldedBias("l1/kernel"),
            },
            "l2": {"kernel": lo.KfacFactors(cov(k[8], (), 3, 10), cov(k[9], (), 200, 2))},
            "stack": {
                "kernel": lo.KfacFactors(cov(k[10], (2,), 8, 20), cov(k[11], (2,), 6, 20)),
                "bias": lo.KfacFactors(jnp.ones((2, 1, 1)), cov(k[5], (2,), 6, 20)),
            },
        }
        if t == nan_at:
            g["l1"]["bias"] = g["l1"]["bias"].at[2].set(jnp.nan)
            g["norm"]["scale"] = g["norm"]["scale"].at[0].set(jnp.inf)
        if t == bad_stats_at:
            a = s["stack"]["kernel"].a
            s["stack"]["kernel"] = lo.KfacFactors(
                a.at[1, 0, 0].set(jnp.nan), s["stack"]["kernel"].g
            )
        grads.append(g)
        stats.append(s)
    return params, spec, grads, stats


def _run_kfac(tx, params, grads, stats):
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates = []
    for g, s in zip(grads, stats):
        u, state = step(g, state, params, kfac_stats=s)
        updates.append(u)
    return updates, state


@pytest.mark.parametrize("name", _KFAC_PARAMS)
def test_kfac_owner_layout_gives_the_replicated_updates_and_counts(name):
    params, spec, grads, stats = _kfac_problem(5, nan_at=3, bad_stats_at=1)
    make = KFAC_CONFIGS[name]
    ref, ref_state = _run_kfac(
        make(state_layout="replicated", dimension_numbers=spec), params, grads, stats
    )
    out, state = _run_kfac(make(state_layout="owner", dimension_numbers=spec), params, grads, stats)
    assert _owner.layout_of(state) is not None and _owner.layout_of(ref_state) is None
    for r, o in zip(ref, out):
        assert jax.tree.structure(r) == jax.tree.structure(o)
        for path, x, y in zip(
            jax.tree_util.tree_leaves_with_path(r), jax.tree.leaves(r), jax.tree.leaves(o)
        ):
            assert x.dtype == y.dtype and x.shape == y.shape, path[0]
            tol = 1e-2 if name.endswith("bf16_mu") else 1e-5
            assert _max_rel(x, y) < tol, (name, path[0])
    # Skipped per (working leaf, step): stack at step 1 (its statistics), the
    # folded l1 pair and norm at step 3; the padded and statistics-less blocks
    # never count, and no factorization fails.
    assert lo.failure_counts(state) == lo.failure_counts(ref_state)
    assert tuple(int(x) for x in lo.failure_counts(state)) == (3, 0)
    # Only the factor state is grouped: the moments stay params trees (sharded like
    # their parameters under a mesh, never stacked or padded) and equal the
    # replicated layout's.
    kfac_state, ref_kfac_state = state[0], ref_state[0]  # lo.kfac chains scale_by_kfac first
    assert isinstance(kfac_state.factors, _owner.Grouped)
    for field in ("mu", "nu"):
        r, o = getattr(ref_kfac_state, field), getattr(kfac_state, field)
        assert jax.tree.structure(o) == jax.tree.structure(params), field
        for x, y in zip(jax.tree.leaves(r), jax.tree.leaves(o)):
            assert x.dtype == y.dtype and x.shape == y.shape, field
        assert _max_rel(r, o) < (1e-2 if name.endswith("bf16_mu") else 1e-5), field


def test_kfac_owner_layout_under_multi_steps_and_inject_hyperparams():
    # lo.multi_steps keeps the pending statistics (grouped) of the mini-steps and
    # optax.inject_hyperparams passes the static state_layout through; a traced
    # damping reaches the grouped refresh. Same updates as the replicated layout.
    params, spec, grads, stats = _kfac_problem(4)
    keep = lambda tree: {k: v for k, v in tree.items() if k in ("l1", "stack", "norm")}  # noqa: E731
    params, spec = keep(params), keep(spec)
    grads, stats = [keep(g) for g in grads], [keep(s) for s in stats]
    res, states = {}, {}
    for layout in ("replicated", "owner"):
        inner = optax.inject_hyperparams(lo.kfac, static_args=("dimension_numbers",))(
            learning_rate=1e-2, damping=3e-2, dimension_numbers=spec, state_layout=layout
        )
        tx = lo.multi_steps(inner, 2)
        res[layout], states[layout] = _run_kfac(tx, params, grads, stats)
    state = states["owner"].inner_opt_state
    kfac_state = state.inner_state[0]
    assert isinstance(kfac_state.pending, _owner.Grouped)
    assert _owner.layout_of(states["replicated"]) is None
    for r, o in zip(res["replicated"], res["owner"]):
        assert _max_rel(r, o) < 1e-5
    assert float(jnp.max(jnp.abs(res["owner"][1]["l1"]["kernel"]))) > 0  # emitted
    np.testing.assert_array_equal(res["owner"][2]["l1"]["kernel"], 0.0)  # a mini-step


def test_kfac_owner_layout_with_nnx_state_and_folded_bias():
    # nnx.State params: the default layout folds the bias into the kernel (one
    # 13 x 8 homogeneous slice, grouped); updates come back as nnx.State.
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    x = jnp.sin(jnp.arange(13.0 * 20).reshape(20, 13))
    d = jnp.cos(jnp.arange(8.0 * 20).reshape(20, 8))
    stats = {"kernel": lo.KfacFactors(x.T @ x / 20, d.T @ d / 20), "bias": lo.FoldedBias("kernel")}
    out = {}
    for layout in ("replicated", "owner"):
        tx = lo.kfac(1e-2, state_layout=layout)
        state = tx.init(params)
        for _ in range(3):
            u, state = jax.jit(tx.update)(grads, state, params, kfac_stats=stats)
        out[layout] = u
    assert isinstance(state[0].factors, _owner.Grouped)
    assert jax.tree.structure(out["owner"]) == jax.tree.structure(out["replicated"])
    assert _max_rel(out["owner"], out["replicated"]) < 1e-5


def test_restore_state_cuts_and_pads_group_stacks_for_another_device_count():
    from jax.sharding import AbstractMesh

    params = {"w": jnp.zeros((6, 4)), "u": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
    tx = lo.shampoo(1e-2)

    def like(devices):
        with jax.sharding.use_abstract_mesh(AbstractMesh((devices,), ("data",))):
            return jax.eval_shape(tx.init, params)

    like8, like4 = like(8), like(4)
    # Same layout identity (groups, axes), other stack lengths.
    assert jax.tree.structure(like8) == jax.tree.structure(like4)
    lengths = {x.shape[0] for x in jax.tree.leaves(like8[0].stats.blocks)}
    assert lengths == {8} and {x.shape[0] for x in jax.tree.leaves(like4[0].stats.blocks)} == {4}
    # A "saved" 8-device state: real blocks first, then padding.
    saved = jax.tree.map(
        lambda x: jnp.arange(np.prod(x.shape), dtype=x.dtype).reshape(x.shape), like8
    )
    restored = lo.restore_state(like4, lo.checkpointable(saved))
    for a, b in zip(
        jax.tree.leaves(restored[0].stats.blocks), jax.tree.leaves(saved[0].stats.blocks)
    ):
        np.testing.assert_array_equal(a, b[:4])
    # Back to 8: the new padded blocks copy the first block.
    grown = lo.restore_state(like8, lo.checkpointable(restored))
    for a, b in zip(
        jax.tree.leaves(grown[0].stats.blocks), jax.tree.leaves(restored[0].stats.blocks)
    ):
        np.testing.assert_array_equal(a[:4], b)
        np.testing.assert_array_equal(a[4:], np.broadcast_to(b[:1], a[4:].shape))
    # The params-shaped leaf (the vector's moments) is not resized.
    np.testing.assert_array_equal(grown[0].mu.leaves[0], saved[0].mu.leaves[0])


def test_restore_state_hints_at_a_layout_mismatch():
    params = {"w": jnp.zeros((6, 4))}
    owner = lo.shampoo(1e-2, state_layout="owner").init(params)
    like = jax.eval_shape(lo.shampoo(1e-2).init, params)
    with pytest.raises(ValueError, match="owner layout .* trace ``like`` under the mesh"):
        lo.restore_state(like, lo.checkpointable(owner))
    replicated = lo.shampoo(1e-2).init(params)
    like = jax.eval_shape(lo.shampoo(1e-2, state_layout="owner").init, params)
    with pytest.raises(ValueError, match="state_layout='replicated'"):
        lo.restore_state(like, lo.checkpointable(replicated))


# ----------------------------------------------------------------------------- K-FAC per factor
# K-FAC's owner layout stores single factors (issue 15: the layer-grouped
# layout left one padded layer of every group on every device, 1.75x at 8).


def test_factor_buckets_hold_nearby_lengths_once_each():
    from layerwise_optax._owner import BUCKET_RATIO, buckets

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = [int(x) for x in rng.integers(1, 2000, size=rng.integers(1, 12))]
        out = buckets(lengths)
        flat = [d for b in out for d in b]
        assert sorted(flat) == sorted(set(lengths))  # every length exactly once
        for b in out:
            assert max(b) <= min(b) * BUCKET_RATIO
        # Greedy from the top: the next bucket's largest does not fit the previous one.
        for prev, nxt in zip(out, out[1:]):
            assert nxt[0] * BUCKET_RATIO < prev[0]
    # The benchmark MLP (784-1024-1024-1024-10, folded biases): 785, 1024 and 1025 together.
    assert buckets([785, 1024, 1025, 1024, 1025, 1024, 1025, 10]) == [(1025, 1024, 785), (10,)]


def _kfac_plans(params, spec):
    from layerwise_optax import _kfac

    layout = _kfac._layout(spec, params, 4096)
    return layout.work_plans, _kfac._fold(layout, params)


@pytest.mark.parametrize("devices", [1, 3, 8])
def test_per_factor_layout_owns_every_factor_once_and_splits_evenly(devices):
    from layerwise_optax import _kfac

    params, spec, _, _ = _kfac_problem(1)
    plans, work = _kfac_plans(params, spec)
    layout = _owner.build_per_factor(plans, work, (), devices, _kfac._factor_kinds)
    assert layout.per_factor
    nodes = _owner.plan_nodes(plans)
    seen = []
    for g in layout.groups:
        assert g.padded % devices == 0 and g.size <= g.padded < g.size + devices
        # Each device holds padded / devices entries: at most one more than its share.
        assert g.padded // devices == -(-g.size // devices)
        lengths = g.lengths()
        assert lengths.shape == (g.padded,) and (lengths[g.size :] == 0).all()
        for pos, side, count, d in g.members:
            assert d <= g.dim and nodes[pos].dims[side] == d and nodes[pos].stack == count
            seen += [(pos, side, b) for b in range(count)]
    expected = [
        (i, side, b)
        for i, plan in enumerate(nodes)
        if not _axes_masked(plan) and plan.is_preconditioned
        for side in (0, 1)
        for b in range(plan.stack)
    ]
    assert sorted(seen) == sorted(expected)  # every factor of every block exactly once
    # Leaves without factors stay params-shaped.
    assert all(not nodes[i].is_preconditioned for i in layout.leaves)


def _axes_masked(plan):
    from layerwise_optax import _axes

    return _axes.is_masked(plan)


def test_per_factor_corner_padding_is_exact():
    """A factor in the corner of a larger entry, identity around it: its inverse is
    ``blockdiag(M^-1, I)`` and applying it to an operand zero outside the corner
    is the corner's solve (float64 NumPy reference) and zeros; a diagonal factor
    padded with its row's largest entry keeps inv_root_diag's floor."""
    from layerwise_optax import _axes, _kron, _linalg

    rng = np.random.default_rng(1)
    d, s, w, s_w = 5, 9, 3, 7
    x = rng.normal(size=(d, 2))  # rank-deficient: rank 2 of 5, damped below
    m = x @ x.T + 0.1 * np.eye(d)
    padded = np.eye(s)
    padded[:d, :d] = m
    inv = _linalg.inv_psd_cholesky(jnp.asarray(padded[None], jnp.float32))[0]
    np.testing.assert_array_equal(np.asarray(inv)[d:, :d], 0)
    np.testing.assert_array_equal(np.asarray(inv)[:d, d:], 0)
    np.testing.assert_array_equal(np.asarray(inv)[d:, d:], np.eye(s - d))
    np.testing.assert_allclose(np.asarray(inv)[:d, :d], np.linalg.inv(m), rtol=1e-4, atol=1e-5)
    g = rng.normal(size=(d, w))
    operand = np.zeros((1, s, s_w))
    operand[0, :d, :w] = g
    plan = _axes.LeafPlan(
        shape=(1, s, s_w),
        spec=None,
        perm=(0, 1, 2),
        batch=1,
        dims=(s, s_w),
        kinds=("full", "none"),
        blocks=(s, s_w),
        num_blocks=(1, 1),
    )
    out = np.asarray(
        _kron.apply_axis_matrices(
            jnp.asarray(operand, jnp.float32), (inv[None], jnp.zeros((1, 0))), plan
        )
    )[0]
    np.testing.assert_allclose(out[:d, :w], np.linalg.solve(m, g), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[d:], 0)
    np.testing.assert_array_equal(out[:, w:], 0)
    # Diagonal: the row's largest entry outside the corner leaves the corner's roots.
    diag = np.asarray([1e-9, 2.0, 0.5], np.float32)
    row = np.concatenate([diag, np.full(4, diag.max(), np.float32)])
    zero = jnp.zeros([], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(_linalg.inv_root_diag(jnp.asarray(row[None]), 1, zero, False))[0, :3],
        np.asarray(_linalg.inv_root_diag(jnp.asarray(diag[None]), 1, zero, False))[0],
    )


@pytest.mark.parametrize("name", ["kfac", "kfac_pi_diag_bf16_mu"])
def test_kfac_per_factor_layout_padded_for_8_devices_gives_the_replicated_updates(
    name, monkeypatch
):
    """The per-factor layout built for 8 devices (stacks padded to 8, factors in
    the corners of their buckets' entries), run on one device: the replicated
    updates, moments and failure counts (a NaN gradient, non-finite statistics, a
    group of layers partly without statistics, stacked layers, diagonal factors)."""

    params, spec, grads, stats = _kfac_problem(5, nan_at=3, bad_stats_at=1)
    make = KFAC_CONFIGS[name]
    ref, ref_state = _run_kfac(
        make(state_layout="replicated", dimension_numbers=spec), params, grads, stats
    )
    monkeypatch.setattr(
        _owner, "decide", lambda choice, axes, plans, params: _owner.build(plans, params, (), 8)
    )
    out, state = _run_kfac(make(state_layout="owner", dimension_numbers=spec), params, grads, stats)
    layout = _owner.layout_of(state)
    assert layout is not None and layout.per_factor and layout.devices == 8
    # Some factor sits in the corner of a larger entry, and stacks are padded.
    assert any(m[3] < g.dim for g in layout.groups for m in g.members)
    assert layout.padding() > 0
    if name.endswith("diag_bf16_mu"):
        assert any(g.kind == "diag" for g in layout.groups)
    tol = 1e-2 if name.endswith("bf16_mu") else 1e-5
    for r, o in zip(ref, out):
        assert jax.tree.structure(r) == jax.tree.structure(o)
        assert _max_rel(r, o) < tol, name
    assert lo.failure_counts(state) == lo.failure_counts(ref_state)
    kfac_state, ref_kfac_state = state[0], ref_state[0]
    for field in ("mu", "nu"):
        assert _max_rel(getattr(ref_kfac_state, field), getattr(kfac_state, field)) < tol
    assert isinstance(kfac_state.inverses, _owner.Grouped)
