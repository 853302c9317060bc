"""K-FAC capture for attention: per-head kernels as batch axes, nnx.MultiHeadAttention,
and K-FAC-expand vs K-FAC-reduce sequence statistics (issue 16 items 2 and 5)."""

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402

H, D, K = 2, 3, 4  # heads, per-head input width, per-head output width (rectangular)


def _homog(x):
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)


class EinsumHeads(nnx.Module):
    """Per-head weights ``(H, D, K)`` applied with an einsum whose ``h`` is shared."""

    def __init__(self, rngs, spec="bthd,hdk->bthk", kernel=(H, D, K), bias=(H, K)):
        self.ein = nnx.Einsum(spec, kernel, bias, rngs=rngs)
        self.head = nnx.Linear(H * K, 2, rngs=rngs)

    def kernels(self):
        w = np.asarray(self.ein.kernel[...])
        return [w[h] for h in range(H)], list(np.asarray(self.ein.bias[...]))

    def __call__(self, x):
        n, t = x.shape[:2]
        z = jnp.tanh(self.ein(x.reshape(n, t, H, D)))
        return self.head(z.reshape(n, t, H * K))


class GeneralHeads(nnx.Module):
    """The same per-head layer as ``nnx.LinearGeneral(batch_axis={0: H})``."""

    def __init__(self, rngs):
        self.ein = nnx.LinearGeneral(D, K, batch_axis={0: H}, rngs=rngs)
        self.head = nnx.Linear(H * K, 2, rngs=rngs)

    kernels = EinsumHeads.kernels

    def __call__(self, x):
        n, t = x.shape[:2]
        xh = jnp.moveaxis(x.reshape(n, t, H, D), 2, 0)  # heads lead, as batch_axis asks
        z = jnp.tanh(jnp.moveaxis(self.ein(xh), 0, 2))
        return self.head(z.reshape(n, t, H * K))


class SeparateHeads(nnx.Module):
    """The same weights as ``H`` separate ``nnx.Linear(D, K)`` layers."""

    def __init__(self, twin):
        ws, bs = twin.kernels()
        rngs = nnx.Rngs(0)
        self.heads = nnx.List([nnx.Linear(D, K, rngs=rngs) for _ in range(H)])
        for layer, w, b in zip(self.heads, ws, bs):
            layer.kernel[...] = jnp.asarray(w)
            layer.bias[...] = jnp.asarray(b)
        self.head = nnx.Linear(H * K, 2, rngs=rngs)
        self.head.kernel[...] = twin.head.kernel[...]
        self.head.bias[...] = twin.head.bias[...]

    def __call__(self, x):
        n, t = x.shape[:2]
        xh = x.reshape(n, t, H, D)
        z = jnp.concatenate(
            [jnp.tanh(layer(xh[:, :, h])) for h, layer in enumerate(self.heads)], -1
        )
        return self.head(z.reshape(n, t, H * K))


def _seq_data(n=6, t=5, d_out=2):
    x = jax.random.normal(jax.random.key(0), (n, t, H * D))
    y = jax.random.normal(jax.random.key(1), (n, t, d_out))
    return x, y


def test_shared_einsum_axis_is_a_batch_axis_of_the_kernel():
    model = EinsumHeads(nnx.Rngs(0))
    dims = lof.kfac_dimension_numbers(model)(nnx.state(model, nnx.Param))
    assert dims["ein"]["kernel"].get_value() == lo.DimensionNumbers(((1,), (2,)), (0,))
    assert dims["ein"]["bias"].get_value() == lo.FoldedBias("ein/kernel")
    unfolded = lof.kfac_dimension_numbers(model, fold_biases=False)(nnx.state(model, nnx.Param))
    assert unfolded["ein"]["bias"].get_value() == lo.DimensionNumbers(((), (1,)), (0,))
    # The kernel axis order is free: 'dhk' puts the heads in the middle.
    other = EinsumHeads(nnx.Rngs(0), "bthd,dhk->bthk", (D, H, K))
    spec = lof.kfac_dimension_numbers(other)(nnx.state(other, nnx.Param))["ein"]["kernel"]
    assert spec.get_value() == lo.DimensionNumbers(((0,), (2,)), (1,))


def test_per_head_factors_match_explicit_float64_sums():
    # One per-head einsum layer with the squared error: delta = n dL/dz = z - y.
    class One(nnx.Module):
        def __init__(self, rngs):
            self.ein = nnx.Einsum("bthd,hdk->bthk", (H, D, K), (H, K), rngs=rngs)

        def __call__(self, x):
            return self.ein(x)

    model = One(nnx.Rngs(1))
    n, t = 5, 4
    x = jax.random.normal(jax.random.key(2), (n, t, H, D))
    y = jax.random.normal(jax.random.key(3), (n, t, H, K))
    for fold in (True, False):
        _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=fold)(
            model, x, y
        )
        w = np.asarray(model.ein.kernel[...], np.float64)
        b = np.asarray(model.ein.bias[...], np.float64)
        xn = np.asarray(x, np.float64)
        z = np.einsum("bthd,hdk->bthk", xn, w) + b
        delta = z - np.asarray(y, np.float64)
        feats = _homog(xn) if fold else xn
        want_a = np.zeros((H,) + (feats.shape[-1],) * 2)
        want_g = np.zeros((H, K, K))
        for i in range(n):
            for j in range(t):
                for h in range(H):
                    want_a[h] += np.outer(feats[i, j, h], feats[i, j, h]) / n
                    want_g[h] += np.outer(delta[i, j, h], delta[i, j, h]) / (n * t)
        np.testing.assert_allclose(stats["ein"]["kernel"].a, want_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["ein"]["kernel"].g, want_g, rtol=1e-5, atol=1e-6)
        if fold:
            assert stats["ein"]["bias"] == lo.FoldedBias("ein/kernel")
        else:
            # The bias is a per-head kernel on the constant input 1 at each of t positions.
            np.testing.assert_array_equal(stats["ein"]["bias"].a, np.full((H, 1, 1), t))
            np.testing.assert_array_equal(stats["ein"]["bias"].g, stats["ein"]["kernel"].g)


def _head_updates(model, grads, stats, dims, as_state):
    tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.0, damping=1e-3, dimension_numbers=dims)
    params = nnx.state(model, nnx.Param)
    if not as_state:
        params, grads = nnx.to_pure_dict(params), nnx.to_pure_dict(grads)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    return nnx.to_pure_dict(updates) if as_state else updates


@pytest.mark.parametrize("kind", ["einsum", "linear_general"])
def test_heads_as_batch_equal_separate_per_head_layers(kind):
    model = (EinsumHeads if kind == "einsum" else GeneralHeads)(nnx.Rngs(4))
    twin = SeparateHeads(model)
    x, y = _seq_data()
    np.testing.assert_allclose(model(x), twin(x), rtol=1e-6, atol=1e-6)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    _, gm, sm = f(model, x, y)
    _, gt, st = f(twin, x, y)
    for h in range(H):
        for factor in ("a", "g"):
            np.testing.assert_allclose(
                getattr(sm["ein"]["kernel"], factor)[h],
                getattr(st["heads"][h]["kernel"], factor),
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"head {h} {factor}",
            )
    for as_state in (True, False):  # nnx.State and plain-dict params and grads
        um = _head_updates(model, gm, sm, lof.kfac_dimension_numbers(model), as_state)
        ut = _head_updates(twin, gt, st, None, as_state)
        for h in range(H):
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(
                    um["ein"][leaf][h], ut["heads"][h][leaf], rtol=1e-4, atol=1e-6
                )
        np.testing.assert_allclose(um["head"]["kernel"], ut["head"]["kernel"], rtol=1e-4, atol=1e-6)


def test_separate_bias_blocks_per_head_equal_separate_layers():
    # fold_biases=False: each head's bias is its own block (a = [[T]], the head's g).
    model = EinsumHeads(nnx.Rngs(5))
    twin = SeparateHeads(model)
    x, y = _seq_data()
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=False)
    _, gm, sm = f(model, x, y)
    _, gt, st = f(twin, x, y)
    um = _head_updates(model, gm, sm, lof.kfac_dimension_numbers(model, fold_biases=False), False)
    ut = _head_updates(twin, gt, st, lof.kfac_dimension_numbers(twin, fold_biases=False), False)
    for h in range(H):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(
                um["ein"][leaf][h], ut["heads"][h][leaf], rtol=1e-4, atol=1e-6
            )


def test_two_shared_axes_equal_one_merged_axis():
    # 'g' and 'h' both shared: (G, H) slices, the same blocks as one axis of G * H.
    w = jax.random.normal(jax.random.key(0), (2, 3, D, K))
    x = jax.random.normal(jax.random.key(1), (4, 5, 2, 3, D))
    y = jax.random.normal(jax.random.key(2), (4, 5, 2, 3, K))
    two = nnx.Einsum("btghd,ghdk->btghk", (2, 3, D, K), (2, 3, K), rngs=nnx.Rngs(0))
    one = nnx.Einsum("bthd,hdk->bthk", (6, D, K), (6, K), rngs=nnx.Rngs(0))
    two.kernel[...], one.kernel[...] = w, w.reshape(6, D, K)
    one.bias[...] = two.bias[...].reshape(6, K)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    s2 = f(two, x, y)[2]["kernel"]
    s1 = f(one, x.reshape(4, 5, 6, D), y.reshape(4, 5, 6, K))[2]["kernel"]
    assert s2.a.shape == (2, 3, D + 1, D + 1) and s2.g.shape == (2, 3, K, K)
    np.testing.assert_allclose(s2.a.reshape(s1.a.shape), s1.a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s2.g.reshape(s1.g.shape), s1.g, rtol=1e-6, atol=1e-7)
    spec = lof.kfac_dimension_numbers(two)({"kernel": w, "bias": jnp.zeros((2, 3, K))})
    assert spec["kernel"] == lo.DimensionNumbers(((2,), (3,)), (0, 1))


def test_einsum_bias_not_on_the_sliced_outputs_takes_the_diagonal_fallback():
    # 'bthd,hdk->btkh' puts the bias's axes in the output as (k, h): it is not a
    # (heads, outputs) function of each slice's output, so it gets no statistics.
    class Swapped(nnx.Module):
        def __init__(self, rngs):
            self.ein = nnx.Einsum("bthd,hdk->btkh", (H, D, K), (K, H), rngs=rngs)

        def __call__(self, x):
            return self.ein(x)

    model = Swapped(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 2, H, D))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(
        model, x, jnp.zeros((3, 2, K, H))
    )
    assert stats["ein"]["bias"] is None
    assert stats["ein"]["kernel"].a.shape == (H, D, D)
    dims = lof.kfac_dimension_numbers(model)(nnx.state(model, nnx.Param))
    assert dims["ein"]["bias"].get_value() == lo.DimensionNumbers(((), (0, 1)))


def test_einsum_with_a_summed_kernel_axis_is_refused_by_path():
    class Summed(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Einsum("bd,sdk->bk", (2, 3, 4), rngs=rngs)

        def __call__(self, x):
            return self.proj(x)

    match = r"layer proj: einsum 'bd,sdk->bk' cannot be captured: kernel axes \['s'\]"
    with pytest.raises(ValueError, match=match):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(
            Summed(nnx.Rngs(0)), jnp.zeros((4, 3)), jnp.zeros((4, 4))
        )
    with pytest.raises(ValueError, match=match):
        lof.kfac_dimension_numbers(Summed(nnx.Rngs(0)))


class Attention(nnx.Module):
    def __init__(self, rngs, heads=2, d=6, qkv=4):
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=d, qkv_features=qkv, decode=False, rngs=rngs
        )
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.attn(x)))


def test_multi_head_attention_out_projection_factor_is_over_heads_then_head_dim():
    model = Attention(nnx.Rngs(0))
    attn = model.attn
    n, t = 4, 5
    x = jax.random.normal(jax.random.key(0), (n, t, 6))
    y = jax.random.normal(jax.random.key(1), (n, t, 3))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    dims = lof.kfac_dimension_numbers(model)(nnx.state(model, nnx.Param))
    assert dims["attn"]["out"]["kernel"].get_value() == lo.DimensionNumbers(((0, 1), (2,)))
    assert dims["attn"]["query"]["kernel"].get_value() == lo.DimensionNumbers(((0,), (1, 2)))

    def proj(layer):
        return jnp.einsum("ntd,dhe->nthe", x, layer.kernel[...]) + layer.bias[...][None, None]

    ctx = nnx.dot_product_attention(proj(attn.query), proj(attn.key), proj(attn.value))
    feats = _homog(np.asarray(ctx, np.float64).reshape(n * t, -1))  # (heads, head_dim) order
    np.testing.assert_allclose(
        stats["attn"]["out"]["kernel"].a, feats.T @ feats / n, rtol=1e-4, atol=1e-5
    )
    xs = _homog(np.asarray(x, np.float64).reshape(n * t, -1))
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(stats["attn"][name]["kernel"].a, xs.T @ xs / n, rtol=1e-5)
        assert stats["attn"][name]["kernel"].g.shape == (4, 4)


def test_multi_head_attention_trains_under_nnx_jit_with_every_leaf_preconditioned():
    model = Attention(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 5, 6))
    y = jnp.sin(x[..., :3].cumsum(1))  # depends on earlier positions: attention helps
    tx = lo.kfac(0.1, dimension_numbers=lof.kfac_dimension_numbers(model))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")

    _, _, stats = grad_fn(model, x, y)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kinds = jax.tree.map(
        lambda s: type(s).__name__,
        stats,
        is_leaf=lambda s: isinstance(s, (lo.KfacFactors, lo.FoldedBias)),
    )
    # Every parameter leaf gets a block: KfacFactors at kernels, FoldedBias at biases.
    flat = {jax.tree_util.keystr(p): k for p, k in jax.tree_util.tree_leaves_with_path(kinds)}
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sorted(flat) == sorted(leaves) and len(leaves) == 10
    for path, kind in flat.items():
        assert kind == ("KfacFactors" if path.endswith("['kernel']") else "FoldedBias"), path

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads, stats = grad_fn(model, x, y)
        opt.update(model, grads, kfac_stats=stats)
        return loss

    losses = [float(step(model, opt, x, y)) for _ in range(25)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    report = lo.failure_report(opt.opt_state)
    assert report.failed == 0 and report.skipped == 0, report


# --- Sequence statistics: K-FAC-expand vs K-FAC-reduce (Eschenhagen et al., 2023) ---


def test_sequence_statistics_match_float64_references():
    # One dense layer over t positions (plain Linear, folded bias) and a per-head
    # einsum (sliced), both against explicit per-example sums.
    n, t = 5, 4
    x = jax.random.normal(jax.random.key(0), (n, t, H, D))
    y = jax.random.normal(jax.random.key(1), (n, t, H, K))
    dense = nnx.Linear(D, K, rngs=nnx.Rngs(0))
    heads = nnx.Einsum("bthd,hdk->bthk", (H, D, K), (H, K), rngs=nnx.Rngs(1))
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for name, layer, z in [
        ("dense", dense, xn @ np.asarray(dense.kernel[...]) + np.asarray(dense.bias[...])),
        (
            "heads",
            heads,
            np.einsum("bthd,hdk->bthk", xn, np.asarray(heads.kernel[...]))
            + np.asarray(heads.bias[...]),
        ),
    ]:
        delta = z - yn  # n dL/dz of the mean over examples of 0.5 * sum of squares
        xh = _homog(xn)
        for mode in ("expand", "reduce"):
            f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", sequence_statistics=mode)
            _, _, s = f(layer, x, y)
            # dense: rows are (example, position, head) with shared weights; heads: per head.
            ex = "nthi,nthj->ij" if name == "dense" else "nthi,nthj->hij"
            if mode == "expand":
                want_a = np.einsum(ex, xh, xh) / n
                want_g = np.einsum(ex, delta, delta) / (n * t * (H if name == "dense" else 1))
            else:
                re = ex.replace("t", "")
                if name == "dense":  # the positions of a dense layer are (t, h)
                    xm, ds = xh.mean((1, 2)), delta.sum((1, 2))
                    want_a = np.einsum("ni,nj->ij", xm, xm) / n
                    want_g = np.einsum("ni,nj->ij", ds, ds) / n
                else:
                    xm, ds = xh.mean(1), delta.sum(1)
                    want_a = np.einsum(re, xm, xm) / n
                    want_g = np.einsum(re, ds, ds) / n
            np.testing.assert_allclose(s["kernel"].a, want_a, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(s["kernel"].g, want_g, rtol=1e-5, atol=1e-6, err_msg=name)
    _, _, s = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(dense, x, y)
    _, _, se = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", sequence_statistics="expand")(
        dense, x, y
    )
    np.testing.assert_array_equal(s["kernel"].a, se["kernel"].a)  # 'expand' is the default
    np.testing.assert_array_equal(s["kernel"].g, se["kernel"].g)


class _SharedLinear(nnx.Module):
    """One linear layer over t positions; ``pool``: outputs averaged over positions."""

    def __init__(self, pool):
        self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        self.pool = pool

    def __call__(self, x):
        z = self.lin(x)
        return z.mean(1) if self.pool else z


def _exact_ggn(model, x):
    """The exact Gauss-Newton block of ``[W; b]`` (row-major) for the mean squared error."""
    w = np.asarray(model.lin.kernel[...], np.float64)
    b = np.asarray(model.lin.bias[...], np.float64)
    wh = np.concatenate([w, b[None]], 0)
    xn = np.asarray(x, np.float64)
    with jax.enable_x64(True):

        def f(wh):
            z = jnp.asarray(xn) @ wh[:-1] + wh[-1][None, None]
            return z.mean(1) if model.pool else z

        jac = jax.jacobian(f)(jnp.asarray(wh))  # (n, [t,] out, d_in + 1, out)
        n = xn.shape[0]
        jac = np.asarray(jac).reshape(n, -1, wh.size)
    return np.einsum("nri,nrj->ij", jac, jac) / n


@pytest.mark.parametrize("pool", [False, True], ids=["per_position_loss", "pooled"])
def test_expand_and_reduce_are_exact_for_a_linear_layer_in_their_setting(pool):
    # Eschenhagen et al. (2023): K-FAC-expand is the exact GGN when every position has
    # its own loss term; K-FAC-reduce when the positions are aggregated before the loss.
    model = _SharedLinear(pool)
    n, t = 6, 5
    x = jax.random.normal(jax.random.key(0), (n, t, 3)) + 0.5
    y = jnp.zeros((n, 2) if pool else (n, t, 2))
    exact = _exact_ggn(model, x)
    kron = {}
    for mode in ("expand", "reduce"):
        f = lof.kfac_value_and_grad(
            lambda m, x: m(x), "mse", statistics="gauss_newton", sequence_statistics=mode
        )
        s = f(model, x, y)[2]["lin"]["kernel"]
        kron[mode] = np.kron(np.asarray(s.a, np.float64), np.asarray(s.g, np.float64))
    right, wrong = ("reduce", "expand") if pool else ("expand", "reduce")
    np.testing.assert_allclose(kron[right], exact, rtol=1e-5, atol=1e-6)
    assert np.abs(kron[wrong] - exact).max() > 0.1 * np.abs(exact).max()


def test_gauss_newton_on_a_sequence_output_sums_every_output_coordinate():
    # y_t = sum_{s <= t} z_s mixes positions: dy_{t'}/dz_t = I for t <= t', so the exact
    # E[J^T J] per row is (T - t) I and B = (1/(n T)) sum_{n, t} (T - t) I = (T + 1)/2 I.
    class Cumulative(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.cumsum(self.lin(x), axis=1)

    n, t = 4, 5
    x = jax.random.normal(jax.random.key(0), (n, t, 3))
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="gauss_newton")
    g = f(Cumulative(), x, jnp.zeros((n, t, 2)))[2]["lin"]["kernel"].g
    np.testing.assert_allclose(g, (t + 1) / 2 * np.eye(2), rtol=1e-6)


def test_bad_sequence_statistics_is_refused():
    with pytest.raises(ValueError, match="sequence_statistics must be one of"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", sequence_statistics=cast(Any, "mean"))


def test_reduce_needs_the_examples_leading_in_the_layer_rows():
    model = GeneralHeads(nnx.Rngs(0))

    class Transposed(nnx.Module):  # positions first: the layer's rows are (t, n)
        def __init__(self):
            self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.swapaxes(self.lin(jnp.swapaxes(x, 0, 1)), 0, 1)

    x = jnp.ones((4, 3, 2))
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", sequence_statistics="reduce")
    with pytest.raises(ValueError, match="layer lin: sequence_statistics='reduce' needs"):
        f(Transposed(), x, x)
    # batch_axis heads lead the layer's input but not its rows: reduce per head equals
    # reduce on separate per-head layers.
    xs, ys = _seq_data()
    sm, st = f(model, xs, ys)[2], f(SeparateHeads(model), xs, ys)[2]
    for h in range(H):
        for factor in ("a", "g"):
            np.testing.assert_allclose(
                getattr(sm["ein"]["kernel"], factor)[h],
                getattr(st["heads"][h]["kernel"], factor),
                rtol=1e-5,
                atol=1e-7,
            )
