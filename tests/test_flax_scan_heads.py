"""K-FAC capture for stacked (nnx.vmap/nnx.scan) layers that also have heads.

A scanned block whose per-head kernels (``nnx.Einsum`` with a shared axis,
``LinearGeneral(batch_axis=...)``) or ``nnx.MultiHeadAttention`` projections are
stacked: one pair of factors per (layer, head) slice, batch axes the layer axis then
the head axes, the statistics and ``kfac`` updates of the unrolled twin.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import kernel_factors, unstack_into  # noqa: E402

LAYERS, N, T, DM, H, DH, DK, D_OUT = 2, 4, 3, 6, 2, 3, 4, 2


class HeadsBlock(nnx.Module):
    """Per-head kernels of both kinds, between a heads-out and a heads-in projection."""

    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(DM, (H, DH), rngs=rngs)  # (n, t, H, DH)
        self.heads = nnx.Einsum("bthd,hdk->bthk", (H, DH, DK), (H, DK), rngs=rngs)
        self.mix = nnx.LinearGeneral(DK, DK, batch_axis={0: H}, rngs=rngs)  # heads lead
        self.out = nnx.LinearGeneral((H, DK), DM, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.heads(jnp.tanh(self.q(x))))
        h = jnp.tanh(jnp.moveaxis(self.mix(jnp.moveaxis(h, 2, 0)), 0, 2))
        return x + self.out(h)


class AttentionBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=H, in_features=DM, qkv_features=H * DH, decode=False, rngs=rngs
        )

    def __call__(self, x):
        return x + self.attn(x)


BLOCKS = {"heads": HeadsBlock, "attention": AttentionBlock}


class Scanned(nnx.Module):
    def __init__(self, block, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(DM, D_OUT, rngs=rngs)

    def __call__(self, x):
        body = nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.head(body(x, self.blocks))


class Unrolled(nnx.Module):
    """The scanned model's twin: the same weights, each block a separate module."""

    def __init__(self, block, scanned):
        self.blocks = nnx.List([block(nnx.Rngs(i)) for i in range(LAYERS)])
        self.head = nnx.Linear(DM, D_OUT, rngs=nnx.Rngs(0))
        nnx.update(self.head, nnx.state(scanned.head))
        unstack_into(scanned.blocks, self.blocks)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _data():
    x = jax.random.normal(jax.random.key(0), (N, T, DM))
    y = jax.random.normal(jax.random.key(1), (N, T, D_OUT))
    return x, y


def test_stacked_per_head_kernels_get_layer_then_head_batch_axes():
    model = Scanned(HeadsBlock, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    for tree in (params, nnx.to_pure_dict(params)):  # nnx.State and a plain dict
        dims = jax.tree.map(
            lambda d: d.get_value() if hasattr(d, "get_value") else d,
            lof.kfac_dimension_numbers(model)(tree)["blocks"],
            is_leaf=lambda d: isinstance(d, nnx.Variable),
        )
        # Einsum kernel (L, H, DH, DK): the layer axis, then the head axis shifted past it.
        assert dims["heads"]["kernel"] == lo.DimensionNumbers(((2,), (3,)), (0, 1))
        # LinearGeneral(batch_axis) kernel (L, H, DK, DK).
        assert dims["mix"]["kernel"] == lo.DimensionNumbers(((2,), (3,)), (0, 1))
        # Heads only in the output group: the layer axis is the only batch axis.
        assert dims["q"]["kernel"] == lo.DimensionNumbers(((1,), (2, 3)), (0,))
        assert dims["out"]["kernel"] == lo.DimensionNumbers(((1, 2), (3,)), (0,))
        assert dims["heads"]["bias"] == lo.FoldedBias("blocks/heads/kernel")
    separate = lof.kfac_dimension_numbers(model, fold_biases=False)(nnx.to_pure_dict(params))
    # Separate bias blocks: bias (L, H, DK) keeps layer and head axes as batch axes.
    assert separate["blocks"]["heads"]["bias"] == lo.DimensionNumbers(((), (2,)), (0, 1))
    assert separate["blocks"]["mix"]["bias"] == lo.DimensionNumbers(((), (2,)), (0, 1))
    assert separate["blocks"]["q"]["bias"] == lo.DimensionNumbers(((), (1, 2)), (0,))


@pytest.mark.parametrize(
    ("kind", "sequence_statistics", "statistics"),
    [
        ("heads", "expand", "empirical"),
        ("heads", "reduce", "empirical"),
        ("attention", "expand", "empirical"),
        ("attention", "reduce", "empirical"),
        ("heads", "expand", "fisher"),
        pytest.param("heads", "reduce", "gauss_newton", marks=pytest.mark.slow),
        pytest.param("attention", "expand", "gauss_newton", marks=pytest.mark.slow),
    ],
)
def test_scanned_heads_stats_equal_the_unrolled_twin(kind, sequence_statistics, statistics):
    model = Scanned(BLOCKS[kind], nnx.Rngs(1))
    twin = Unrolled(BLOCKS[kind], model)
    x, y = _data()
    np.testing.assert_allclose(model(x), twin(x), rtol=1e-5, atol=1e-6)
    f = lof.kfac_value_and_grad(
        lambda m, x: m(x), "mse", statistics=statistics, sequence_statistics=sequence_statistics
    )
    key = jax.random.key(5)  # the same sampled labels for both (fisher)
    value, _, stats = f(model, x, y, key=key)
    want_value, _, want = f(twin, x, y, key=key)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    got, want = kernel_factors(stats), kernel_factors(want)
    assert got["head/kernel"].a.shape == (DM + 1, DM + 1)
    for path, factors in got.items():
        if not path.startswith("blocks/"):
            for g, w in zip(factors, want[path]):
                np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6, err_msg=path)
            continue
        for i in range(LAYERS):
            twin_path = path.replace("blocks/", f"blocks/{i}/", 1)
            for g, w in zip(factors, want[twin_path]):
                np.testing.assert_allclose(g[i], w, rtol=2e-5, atol=1e-6, err_msg=twin_path)
    if kind == "heads":
        heads = got["blocks/heads/kernel"]
        assert heads.a.shape == (LAYERS, H, DH + 1, DH + 1)  # (L, *heads, d, d)
        assert heads.g.shape == (LAYERS, H, DK, DK)
        assert got["blocks/mix/kernel"].a.shape == (LAYERS, H, DK + 1, DK + 1)
        if sequence_statistics == "reduce":  # folded bias corner: 1 after averaging
            np.testing.assert_allclose(heads.a[..., -1, -1], 1.0)
        else:  # T positions per example
            np.testing.assert_allclose(heads.a[..., -1, -1], float(T))
    else:
        assert got["blocks/attn/query/kernel"].a.shape == (LAYERS, DM + 1, DM + 1)
        assert got["blocks/attn/out/kernel"].a.shape == (LAYERS, H * DH + 1, H * DH + 1)


@pytest.mark.parametrize("kind", ["heads", pytest.param("attention", marks=pytest.mark.slow)])
def test_scanned_heads_kfac_updates_equal_the_unrolled_twin(kind):
    """Two lo.kfac steps under nnx.jit, every leaf preconditioned, on nnx.State."""
    model = Scanned(BLOCKS[kind], nnx.Rngs(2))
    twin = Unrolled(BLOCKS[kind], model)
    x, y = _data()
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")

    # Every parameter leaf of the scanned model gets a K-FAC block (no fallback leaf).
    _, _, stats = grad_fn(model, x, y)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kinds = jax.tree.map(
        lambda s: type(s).__name__,
        stats,
        is_leaf=lambda s: isinstance(s, (lo.KfacFactors, lo.FoldedBias)),
    )
    flat = {jax.tree_util.keystr(p): k for p, k in jax.tree_util.tree_leaves_with_path(kinds)}
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sorted(flat) == sorted(leaves)
    for path, block in flat.items():
        assert block == ("KfacFactors" if path.endswith("['kernel']") else "FoldedBias"), path

    def optimizer(m):
        tx = lo.kfac(0.3, dimension_numbers=lof.kfac_dimension_numbers(m))
        return nnx.Optimizer(m, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, grads, stats = grad_fn(m, x, y)
        opt.update(m, grads, kfac_stats=stats)
        return loss

    opt, twin_opt = optimizer(model), optimizer(twin)
    losses = []
    for _ in range(2):
        loss, twin_loss = step(model, opt), step(twin, twin_opt)
        np.testing.assert_allclose(loss, twin_loss, rtol=1e-5)
        losses.append(float(loss))
    assert lo.failure_report(opt.opt_state).failed == 0
    stacked = nnx.state(model.blocks, nnx.Param)
    for i, block in enumerate(twin.blocks):
        for got, want in zip(
            jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], stacked)),
            jax.tree.leaves(nnx.state(block, nnx.Param)),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.head.kernel[...], twin.head.kernel[...], rtol=1e-4, atol=1e-6)
    assert losses[1] < losses[0]  # the steps moved the weights


def test_reduce_on_a_stacked_layer_needs_the_examples_leading():
    """A stacked per-head layer whose rows lead with the heads' other axis is refused."""

    class Transposed(nnx.Module):
        def __init__(self, rngs):
            self.heads = nnx.Einsum("tbhd,hdk->tbhk", (H, DH, DK), rngs=rngs)

        def __call__(self, x):  # x (n, t, H, DH): the positions lead the einsum's rows
            return x + jnp.swapaxes(self.heads(jnp.swapaxes(x, 0, 1)), 0, 1)[..., :DH]

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Transposed(rngs)

    blocks = make(nnx.Rngs(0))
    body = nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    x = jax.random.normal(jax.random.key(0), (N, T, H, DH))
    f = lof.kfac_value_and_grad(lambda m, x: body(x, m), "mse", sequence_statistics="reduce")
    with pytest.raises(ValueError, match=r"layer heads: sequence_statistics='reduce' needs"):
        f(blocks, x, x)
    # Expand takes any row order: one pair of factors per (layer, head).
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: body(x, m), "mse")(blocks, x, x)
    assert stats["heads"]["kernel"].a.shape == (LAYERS, H, DH, DH)
