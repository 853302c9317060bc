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


def _run(tx, params, grads):
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates = []
    for g in grads:
        u, state = step(g, state, params)
        updates.append(u)
    return updates, state


def _max_rel(a, b):
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30))
    return max(errs)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_owner_layout_gives_the_replicated_updates_and_counts(name):
    params = _params()
    grads = _grads(params, 5, nan_at=3)
    ref, ref_state = _run(CONFIGS[name](state_layout="replicated"), params, grads)
    out, state = _run(CONFIGS[name](state_layout="owner"), params, grads)
    assert _owner.layout_of(state) is not None
    assert _owner.layout_of(ref_state) is None
    # Same blocks, same operations: float32 round-off (bfloat16 leaf: its own rounding).
    for r, o in zip(ref, out):
        assert jax.tree.structure(r) == jax.tree.structure(o)
        for key in r:
            tol = 2e-2 if r[key].dtype == jnp.bfloat16 else 1e-5
            assert r[key].dtype == o[key].dtype
            assert _max_rel(r[key], o[key]) < tol, (name, key)
    # Skipped counts per (leaf, step) as in the replicated layout (w and b at
    # step 3), whatever the number of blocks; padded blocks never count.
    assert lo.failure_counts(state) == lo.failure_counts(ref_state)
    assert lo.failure_counts(state)[0] == 2


def test_owner_layout_groups_blocks_of_all_leaves_by_shape_and_dtype():
    params = _params()
    tx = lo.scale_by_shampoo(block_size=16, state_layout="owner")
    state = tx.init(params)
    layout = _owner.layout_of(state)
    # w (64 x 48) and the float32 block of conv share (16, 16) blocks; h is bfloat16:
    # its blocks compute in float32 too, so it joins them.
    by_shape = {(g.key.blocks, g.dtype): g.size for g in layout.groups}
    assert by_shape[((16, 16), "float32")] == 4 * 3 + 3 * 4 + 3 * 1
    assert by_shape[((3, 16), "float32")] == 13
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
