"""Axis bookkeeping (_axes) and per-axis statistics (_kron)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layerwise_optax import _axes, _kron
from layerwise_optax._axes import DimensionNumbers as DN
from tests._helpers import unfold_cov

DEFAULT_CASES = {
    "scalar": ((), None),
    "vector": ((7,), None),
    "row_vector": ((1, 7), None),
    "matrix": ((6, 5), DN(((0,), (1,)))),
    "conv": ((3, 3, 64, 128), DN(((0, 1, 2), (3,)))),
    "conv_small": ((3, 3, 4, 8), DN(((0, 1, 2), (3,)))),
    "order3_small": ((2, 3, 4), DN(((0, 1), (2,)))),
    "unit_dims": ((1, 6, 1, 5), DN(((0, 1, 2), (3,)))),
    "long_axis": ((5000, 3), DN(((0,), (1,)))),
}


@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_default_policy(name):
    shape, want = DEFAULT_CASES[name]
    assert _axes.default_dimension_numbers(shape, max_precond_dim=1024) == want


def test_default_policy_without_merging_is_one_group_per_axis():
    got = _axes.default_dimension_numbers((3, 3, 4), merge_small_dims=False)
    assert got == DN(((0,), (1,), (2,)))


ROUNDTRIP_CASES = {
    "matrix": ((6, 5), DN(((0,), (1,))), None),
    "matrix_blocked_exact": ((6, 4), DN(((0,), (1,))), 2),
    "matrix_blocked_padded": ((7, 5), DN(((0,), (1,))), 3),
    "conv_merged_blocked": ((3, 3, 4, 8), DN(((0, 1, 2), (3,))), 5),
    "order3_permuted": ((2, 3, 4), DN(((2,), (0,), (1,))), None),
    "stacked_layers": ((4, 6, 5), DN(((1,), (2,)), batch_axes=(0,)), 4),
    "heads_one_sided": ((3, 2, 5, 4), DN(((2,),), batch_axes=(1,), identity_axes=(0, 3)), 2),
    "none_spec": ((3, 4), None, None),
    "scalar": ((), None, None),
    "long_diag": ((50, 3), DN(((0,), (1,))), None),
}


@pytest.mark.parametrize("name", ROUNDTRIP_CASES)
def test_block_view_round_trips(name):
    shape, spec, block = ROUNDTRIP_CASES[name]
    plan = _axes.make_plan(shape, spec, max_precond_dim=20, block_size=block)
    x = jnp.arange(int(np.prod(shape)), dtype=jnp.float32).reshape(shape) + 1.0
    blocks = plan.to_blocks(x)
    assert blocks.shape == plan.block_shape
    np.testing.assert_array_equal(np.asarray(plan.from_blocks(blocks)), np.asarray(x))
    # Padding only adds zeros: the view holds every entry exactly once.
    assert float(jnp.sum(blocks)) == float(jnp.sum(x))


def test_merge_is_a_pure_reshape():
    x = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    plan = _axes.make_plan(x.shape, DN(((0, 1, 2), (3,))), max_precond_dim=100, block_size=None)
    view = plan.to_blocks(x)
    np.testing.assert_array_equal(np.asarray(view[0]), np.asarray(x.reshape(36, 8)))


def test_blocks_are_the_submatrices():
    x = jnp.arange(7 * 5, dtype=jnp.float32).reshape(7, 5)
    plan = _axes.make_plan((7, 5), DN(((0,), (1,))), max_precond_dim=100, block_size=3)
    assert plan.num_blocks == (3, 2) and plan.blocks == (3, 3)
    view = np.asarray(plan.to_blocks(x))
    padded = np.zeros((9, 6))
    padded[:7, :5] = np.asarray(x)
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(
                view[i * 2 + j], padded[3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
            )


def test_kinds():
    plan = _axes.make_plan(
        (5000, 1, 6), DN(((0,), (1,), (2,))), max_precond_dim=1024, block_size=None
    )
    assert plan.kinds == ("diag", "none", "full")
    assert plan.num_factors == 2
    blocked = _axes.make_plan((5000, 6), DN(((0,), (1,))), max_precond_dim=1024, block_size=512)
    assert blocked.kinds == ("full", "full") and blocked.num_blocks == (10, 1)


@pytest.mark.parametrize(
    "spec,match",
    [
        (DN(((0,), (1,))), r"do not cover axis 2"),
        (DN(((0,), (1,), (3,))), r"name axis 3, which does not exist"),
        (DN(((0, 1), (1, 2))), r"more than once"),
        ("bad", r"must be a DimensionNumbers"),
    ],
)
def test_bad_specs_name_the_path(spec, match):
    params = {"layer": {"kernel": jnp.zeros((3, 5, 7))}}
    specs = {"layer": {"kernel": spec}}
    with pytest.raises(ValueError, match=match) as e:
        _axes.resolve(specs, params, max_precond_dim=100)
    assert "['layer']['kernel']" in str(e.value) and "(3, 5, 7)" in str(e.value)


def test_spec_tree_structure_mismatch_is_value_error():
    with pytest.raises(ValueError, match="same tree structure"):
        _axes.resolve({"a": None}, {"a": jnp.zeros(3), "b": jnp.zeros(3)}, max_precond_dim=10)


def test_resolve_callable_and_masked_nodes():
    tree = {"a": jnp.zeros((3, 4)), "b": optax.MaskedNode()}
    plans = _axes.resolve(
        lambda t: jax.tree.map(lambda _: DN(((1,), (0,))), t), tree, max_precond_dim=10
    )
    assert isinstance(plans["b"], optax.MaskedNode)
    assert plans["a"].perm == (1, 0)


def test_axis_stats_match_unfoldings():
    g = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    plan = _axes.make_plan(g.shape, DN(((0,), (1,), (2,))), max_precond_dim=4, block_size=None)
    assert plan.kinds == ("full", "full", "diag")
    stats = _kron.axis_stats(plan.to_blocks(jnp.asarray(g)), plan)
    np.testing.assert_allclose(np.asarray(stats[0][0]), unfold_cov(g, 0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats[1][0]), unfold_cov(g, 1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats[2][0]), np.diag(unfold_cov(g, 2)), rtol=1e-5)


def test_apply_axis_matrices_matches_kron():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((2, 3, 4))
    mats = [rng.standard_normal((d, d)) for d in g.shape]
    plan = _axes.make_plan(g.shape, DN(((0,), (1,), (2,))), max_precond_dim=10, block_size=None)
    got = _kron.apply_axis_matrices(
        plan.to_blocks(jnp.asarray(g, jnp.float32)),
        tuple(jnp.asarray(m, jnp.float32)[None] for m in mats),
        plan,
    )
    want = (np.kron(np.kron(mats[0], mats[1]), mats[2]) @ g.reshape(-1)).reshape(g.shape)
    np.testing.assert_allclose(np.asarray(plan.from_blocks(got)), want, rtol=1e-4, atol=1e-5)
    got_t = _kron.apply_axis_matrices(
        plan.to_blocks(jnp.asarray(g, jnp.float32)),
        tuple(jnp.asarray(m, jnp.float32)[None] for m in mats),
        plan,
        transpose=True,
    )
    want_t = (np.kron(np.kron(mats[0].T, mats[1].T), mats[2].T) @ g.reshape(-1)).reshape(g.shape)
    np.testing.assert_allclose(np.asarray(plan.from_blocks(got_t)), want_t, rtol=1e-4, atol=1e-5)


def test_inverse_roots_keep_previous_on_failure():
    plan = _axes.make_plan((3, 4), DN(((0,), (1,))), max_precond_dim=10, block_size=None)
    prev = _kron.init_factors(plan, jnp.float32, identity=True)
    stats = (jnp.full((1, 3, 3), jnp.nan), jnp.eye(4)[None] * 4.0)
    roots, failures = _kron.inverse_roots_tree(
        {"w": stats},
        {"w": prev},
        {"w": plan},
        root=lambda _: 2,
        damping=jnp.float32(0.0),
        relative_damping=False,
    )
    assert int(failures) == 1
    np.testing.assert_array_equal(np.asarray(roots["w"][0]), np.asarray(prev[0]))
    np.testing.assert_allclose(np.asarray(roots["w"][1][0]), np.eye(4) * 0.5, rtol=1e-6)


def test_state_floats_formula():
    plan = _axes.make_plan((5000, 300), DN(((0,), (1,))), max_precond_dim=1024, block_size=128)
    # axis 0: 5000 > 128 -> blocks of 128 (40 blocks); axis 1: 300 -> 3 blocks of 128.
    assert plan.num_blocks == (40, 3) and plan.stack == 120
    assert plan.state_floats() == 120 * (128 * 128 + 128 * 128)


@pytest.mark.parametrize("name", ROUNDTRIP_CASES)
def test_block_sum_squares_matches_block_view(name):
    shape, spec, block = ROUNDTRIP_CASES[name]
    plan = _axes.make_plan(shape, spec, max_precond_dim=20, block_size=block)
    x = jax.random.normal(jax.random.key(3), shape)
    want = _kron.block_norms(plan.to_blocks(x)) ** 2
    np.testing.assert_allclose(
        np.asarray(plan.block_sum_squares(x)), np.asarray(want), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "shape, spec, max_dim, block",
    [
        ((6, 5), DN(((0,), (1,))), 8, None),
        ((10, 3), DN(((0,), (1,))), 8, 4),  # blocked: 3 blocks of 4 (padded)
        ((6, 3), DN(((0,), (1,))), 4, None),  # a diagonal factor
        ((2, 4, 5), DN(((1,),), batch_axes=(0,), identity_axes=(2,)), 8, None),
        ((1, 7), DN(((0,), (1,))), 8, None),  # a unit dimension
        ((4, 3), None, 8, None),  # no factors
    ],
)
def test_as_batch_is_the_block_view_as_a_leaf(shape, spec, max_dim, block):
    plan = _axes.make_plan(shape, spec, max_precond_dim=max_dim, block_size=block)
    batch = plan.as_batch(5)
    assert batch.block_shape == batch.shape == (5,) + plan.blocks
    assert (batch.kinds, batch.blocks, batch.stack) == (plan.kinds, plan.blocks, 5)
    # A leaf of its own: the plan make_plan gives for its shape and spec, and its
    # block view is the identity.
    assert _axes.make_plan(batch.shape, batch.spec, max_precond_dim=max_dim, block_size=None) == (
        batch
    )
    x = jnp.arange(np.prod(batch.shape), dtype=jnp.float32).reshape(batch.shape)
    np.testing.assert_array_equal(batch.to_blocks(x), x)
    np.testing.assert_array_equal(batch.from_blocks(x), x)
    # Leaves with the same block layout give the same plan (a group key); the
    # stacked blocks of a leaf are a batch of that layout.
    assert plan.as_batch(plan.stack) == batch.as_batch(plan.stack)
    assert hash(plan.as_batch(1)) == hash(batch.as_batch(1))


def test_as_batch_groups_transposed_layouts_together():
    a = _axes.make_plan((6, 5), DN(((0,), (1,))), max_precond_dim=8, block_size=None)
    b = _axes.make_plan((5, 6), DN(((1,), (0,))), max_precond_dim=8, block_size=None)
    c = _axes.make_plan((5, 6), DN(((0,), (1,))), max_precond_dim=8, block_size=None)
    assert a != b and a.as_batch(1) == b.as_batch(1)
    assert a.as_batch(1) != c.as_batch(1)


def test_with_kinds_keeps_the_block_view_and_the_invariants():
    plan = _axes.make_plan((7, 1, 6), DN(((0,), (1,), (2,))), max_precond_dim=1024, block_size=None)
    assert plan.kinds == ("full", "none", "full")
    edited = plan.with_kinds(("diag", "full", "none"))
    assert edited.kinds == ("diag", "full", "none")
    assert (edited.shape, edited.perm, edited.dims, edited.blocks) == (
        plan.shape,
        plan.perm,
        plan.dims,
        plan.blocks,
    )
    x = jnp.arange(42.0).reshape(7, 1, 6)
    np.testing.assert_array_equal(edited.to_blocks(x), plan.to_blocks(x))
    assert edited.state_floats() == 7 + 1
    with pytest.raises(ValueError, match="per view dimension"):
        plan.with_kinds(("full", "full"))
    with pytest.raises(ValueError, match="per view dimension"):
        plan.with_kinds(("full", "bogus", "full"))
    blocked = _axes.make_plan((5000, 6), DN(((0,), (1,))), max_precond_dim=1024, block_size=512)
    with pytest.raises(ValueError, match="blocked, so it cannot be 'diag'"):
        blocked.with_kinds(("diag", "full"))
    ident = _axes.make_plan(
        (4, 3), DN(((0,),), identity_axes=(1,)), max_precond_dim=8, block_size=None
    )
    assert ident.kinds == ("full", "none")
    with pytest.raises(ValueError, match="identity group"):
        ident.with_kinds(("full", "full"))
