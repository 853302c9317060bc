"""K-FAC capture for stacked layers (nnx.vmap-created, nnx.scan/nnx.vmap-applied), no silent fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import kernel_factors, unstack_into  # noqa: E402

LAYERS, D_IN, D, D_OUT, N = 3, 4, 5, 2, 8


class Block(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        h = jnp.tanh(self.up(x))
        if self.drop is not None:
            h = self.drop(h)
        return x + self.down(h)


class Scanned(nnx.Module):
    """``LAYERS`` blocks created with ``nnx.vmap`` (stacked kernels), applied with ``nnx.scan``."""

    def __init__(self, rngs, remat=False, dropout=0.0):
        self.inp = nnx.Linear(D_IN, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs, dropout)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, D_OUT, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        def step(h, block):
            return block(h)

        if self.remat:
            step = nnx.remat(step)
        # With dropout, each slice has its own RNG stream (split_rngs at creation), which
        # the scan splits along the layer axis like the kernels.
        body = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.head(body(self.inp(x), self.blocks))


class Unrolled(nnx.Module):
    """The scanned model's twin: the same weights, each block a separate module."""

    def __init__(self, scanned):
        rngs = nnx.Rngs(0)
        self.inp = nnx.Linear(D_IN, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(D, D_OUT, rngs=rngs)
        nnx.update(self.inp, nnx.state(scanned.inp))
        nnx.update(self.head, nnx.state(scanned.head))
        unstack_into(scanned.blocks, self.blocks)

    def __call__(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _data():
    x = jax.random.normal(jax.random.key(0), (N, D_IN))
    y = jax.random.normal(jax.random.key(1), (N, D_OUT))
    return x, y


def _slice_stats(stats, i):
    """The unrolled-form statistics of block ``i`` out of the scanned model's stacked ones."""
    return {
        layer: {
            "kernel": lo.KfacFactors(*(f[i] for f in stats["blocks"][layer]["kernel"])),
            "bias": stats["blocks"][layer]["bias"],
        }
        for layer in ("up", "down")
    }


def _assert_stats_equal(scanned, unrolled, rtol=2e-5, atol=1e-6):
    for name in ("inp", "head"):
        for f, g in zip(scanned[name]["kernel"], unrolled[name]["kernel"]):
            np.testing.assert_allclose(f, g, rtol=rtol, atol=atol)
    for i in range(LAYERS):
        got = _slice_stats(scanned, i)
        for layer in ("up", "down"):
            want = unrolled["blocks"][i][layer]
            for f, g in zip(got[layer]["kernel"], want["kernel"]):
                np.testing.assert_allclose(f, g, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "statistics", ["empirical", "fisher", pytest.param("gauss_newton", marks=pytest.mark.slow)]
)
def test_scanned_stats_equal_the_unrolled_twin(statistics):
    model = Scanned(nnx.Rngs(0))
    twin = Unrolled(model)
    x, y = _data()
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics=statistics)
    key = jax.random.key(3)
    value, grads, stats = grad_fn(model, x, y, key=key)
    want_value, want_grads, want = grad_fn(twin, x, y, key=key)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    up = stats["blocks"]["up"]
    assert up["kernel"].a.shape == (LAYERS, D + 1, D + 1)  # one pair of factors per slice
    assert up["kernel"].g.shape == (LAYERS, 2 * D, 2 * D)
    assert up["bias"] == lo.FoldedBias("blocks/up/kernel")
    _assert_stats_equal(stats, want)
    for i in range(LAYERS):
        np.testing.assert_allclose(
            np.asarray(grads["blocks"]["down"]["kernel"][...])[i],
            np.asarray(want_grads["blocks"][i]["down"]["kernel"][...]),
            rtol=1e-5,
            atol=1e-7,
        )


def test_scanned_slice_factors_match_explicit_per_example_sums_float64():
    """One slice's factors against the explicit sums over examples, in float64 NumPy/JAX."""
    model = Scanned(nnx.Rngs(1))
    x, y = _data()
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
    k = 1  # the middle block's `down` layer

    with jax.enable_x64(True):

        def lin(w, h):
            return h @ w["kernel"] + w["bias"]

        def per_example_loss(e, xr, yr):
            """0.5 ||f(x) - y||^2 of one example, with e added to block k's `down` output."""
            h = lin(p["inp"], xr)
            feats = None
            for i in range(LAYERS):
                w = jax.tree.map(lambda a, i=i: a[i], p["blocks"])
                u = jnp.tanh(lin(w["up"], h))
                if i == k:
                    feats = u
                h = h + lin(w["down"], u) + (e if i == k else 0.0)
            return 0.5 * jnp.sum((lin(p["head"], h) - yr) ** 2), feats

        xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
        grad = jax.vmap(jax.grad(per_example_loss, has_aux=True), in_axes=(None, 0, 0))
        deltas, feats = grad(jnp.zeros(D), xs, ys)  # n dL/dz_r = the per-example gradient
        deltas = np.asarray(deltas)
        feats = np.concatenate([np.asarray(feats), np.ones((N, 1))], axis=1)  # [u; 1]
        assert deltas.dtype == np.float64
    a_ref = sum(np.outer(f, f) for f in feats) / N
    g_ref = sum(np.outer(d, d) for d in deltas) / N
    got = stats["blocks"]["down"]["kernel"]
    np.testing.assert_allclose(got.a[k], a_ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got.g[k], g_ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("fold_biases", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_scanned_kfac_updates_equal_the_unrolled_twin(fold_biases):
    """Several lo.kfac steps (a refresh every 2) from stacked statistics, on nnx.State."""
    model = Scanned(nnx.Rngs(2))
    twin = Unrolled(model)
    x, y = _data()
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=fold_biases)

    def optimizer(m):
        specs = lof.kfac_dimension_numbers(m, fold_biases=fold_biases)
        tx = lo.kfac(0.3, precondition_frequency=2, dimension_numbers=specs)
        return nnx.Optimizer(m, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt):
        loss, grads, stats = grad_fn(m, x, y)
        opt.update(m, grads, kfac_stats=stats)
        return loss

    opt, twin_opt = optimizer(model), optimizer(twin)
    for _ in range(3):  # inverses refreshed at the first and third steps
        loss, twin_loss = train_step(model, opt), train_step(twin, twin_opt)
        np.testing.assert_allclose(loss, twin_loss, rtol=1e-5)
    stacked = nnx.state(model.blocks, nnx.Param)
    for i, block in enumerate(twin.blocks):
        for got, want in zip(
            jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], stacked)),
            jax.tree.leaves(nnx.state(block, nnx.Param)),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The updates moved the weights: the comparison is not between two untouched models.
    assert float(loss) < float(lof.mse(Scanned(nnx.Rngs(2))(x), y))


def test_kfac_dimension_numbers_give_stacked_kernels_a_batch_axis():
    model = Scanned(nnx.Rngs(0))
    for tree in (nnx.state(model, nnx.Param), nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        specs = lof.kfac_dimension_numbers(model)(tree)
        up = specs["blocks"]["up"]
        kernel = up["kernel"].get_value() if hasattr(up["kernel"], "get_value") else up["kernel"]
        bias = up["bias"].get_value() if hasattr(up["bias"], "get_value") else up["bias"]
        assert kernel == lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))
        assert bias == lo.FoldedBias("blocks/up/kernel")
    sep = lof.kfac_dimension_numbers(model, fold_biases=False)(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    assert sep["blocks"]["down"]["bias"] == lo.DimensionNumbers(((), (1,)), batch_axes=(0,))
    assert sep["head"]["bias"] == lo.DimensionNumbers(((), (0,)))


def test_remat_inside_scan_gives_the_same_statistics():
    plain, remat = Scanned(nnx.Rngs(4)), Scanned(nnx.Rngs(4), remat=True)
    x, y = _data()
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    _, grads, stats = grad_fn(plain, x, y)
    _, remat_grads, remat_stats = grad_fn(remat, x, y)
    for f, g in zip(jax.tree.leaves(stats), jax.tree.leaves(remat_stats)):
        np.testing.assert_allclose(f, g, rtol=1e-6, atol=1e-7)
    for f, g in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(f, g, rtol=1e-6, atol=1e-7)


def test_split_rngs_dropout_and_remat_in_a_scan():
    """Per-layer dropout keys (split_rngs) under remat: the same forward as nnx.value_and_grad."""
    model = Scanned(nnx.Rngs(5), remat=True, dropout=0.5)
    x, y = _data()
    # The capture writes the model's non-parameter state back as nnx.value_and_grad
    # does (RNG counts advance): a twin taken before draws the same dropout masks, and
    # both models end with the same RNG state.
    twin = nnx.clone(model)
    value, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    want_value, want_grads = nnx.value_and_grad(lambda m: lof.mse(m(x), y))(twin)
    for u, v in zip(
        jax.tree.leaves(nnx.state(model, nnx.RngState)),
        jax.tree.leaves(nnx.state(twin, nnx.RngState)),
    ):
        np.testing.assert_array_equal(
            jax.random.key_data(u) if jnp.issubdtype(u.dtype, jax.dtypes.prng_key) else u,
            jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v,
        )
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for f, g in zip(jax.tree.leaves(grads), jax.tree.leaves(nnx.state(want_grads, nnx.Param))):
        np.testing.assert_allclose(f, g, rtol=1e-5, atol=1e-7)
    a = np.asarray(stats["blocks"]["down"]["kernel"].a)
    assert a.shape == (LAYERS, 2 * D + 1, 2 * D + 1)
    # Dropout with rate 0.5 zeroes about half of each slice's recorded features, each
    # slice with its own mask: the slices' feature second moments differ.
    assert not np.allclose(a[0], a[1])


class Ensemble(nnx.Module):
    """``LAYERS`` stacked members applied with ``nnx.vmap`` (same input, mean output)."""

    def __init__(self, rngs, axes=0):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(D_IN, D_OUT, rngs=rngs)

        self.members = make(rngs)
        self.axes = axes

    def __call__(self, x):
        outs = nnx.vmap(lambda m, x: jnp.tanh(m(x)), in_axes=(self.axes, None))(self.members, x)
        return jnp.mean(outs, axis=0)


@pytest.mark.parametrize(
    "axes", [0, nnx.StateAxes({nnx.Param: 0, ...: None})], ids=["all", "params-only"]
)
def test_vmap_applied_members_equal_separate_layers(axes):
    """Also when only nnx.Param is mapped: the capture's variables follow the params."""
    model = Ensemble(nnx.Rngs(6), axes)
    members = nnx.List([nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0)) for _ in range(LAYERS)])
    unstack_into(model.members, members)
    x, y = _data()
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    _, _, want = lof.kfac_value_and_grad(
        lambda ms, x: jnp.mean(jnp.stack([jnp.tanh(m(x)) for m in ms]), axis=0), "mse"
    )(members, x, y)
    for i in range(LAYERS):
        for f, g in zip(stats["members"]["kernel"], want[i]["kernel"]):
            np.testing.assert_allclose(f[i], g, rtol=2e-5, atol=1e-7)


# --- No silent fallback -----------------------------------------------------------------


class WithUnused(nnx.Module):
    def __init__(self, rngs):
        self.used = nnx.Linear(D_IN, D_OUT, rngs=rngs)
        self.unused = nnx.Linear(D_IN, D_OUT, rngs=rngs)

    def __call__(self, x):
        return self.used(x)


def test_a_layer_whose_call_is_not_seen_is_named():
    model = WithUnused(nnx.Rngs(0))
    x, y = _data()
    with pytest.raises(ValueError, match=r"layer unused: .*Linear.*not seen.*diagonal="):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)


def test_diagonal_asks_for_the_diagonal_fisher_on_purpose():
    model = WithUnused(nnx.Rngs(0))
    x, y = _data()
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", diagonal=["unused"])(
        model, x, y
    )
    assert stats["unused"] == {"kernel": None, "bias": None}
    assert isinstance(stats["used"]["kernel"], lo.KfacFactors)
    # The same by predicate; and kfac takes these entries (the diagonal fallback).
    _, _, by_rule = lof.kfac_value_and_grad(
        lambda m, x: m(x), "mse", diagonal=lambda path, layer: path.startswith("un")
    )(model, x, y)
    assert by_rule["unused"] == {"kernel": None, "bias": None}
    opt = nnx.Optimizer(model, lo.kfac(0.1), wrt=nnx.Param)
    opt.update(model, grads, kfac_stats=stats)
    assert np.all(np.isfinite(model.used.kernel[...]))


def test_a_layer_that_cannot_be_captured_can_be_given_the_diagonal():
    class SummedAxis(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D_IN, D_OUT, rngs=rngs)
            # The kernel's `h` is summed away (in neither input nor output): refused.
            self.odd = nnx.Einsum("bi,hio->bo", (2, D_IN, 3), rngs=rngs)

        def __call__(self, x):
            return self.lin(x) + jnp.sum(self.odd(x), axis=1)[:, None]

    model = SummedAxis(nnx.Rngs(0))
    x, y = _data()
    with pytest.raises(ValueError, match="layer odd"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", diagonal=["odd"])(model, x, y)
    assert stats["odd"] == {"kernel": None}  # nnx.Einsum has no bias here
    specs = lof.kfac_dimension_numbers(model, diagonal=["odd"])(nnx.state(model, nnx.Param))
    assert specs["lin"]["bias"].get_value() == lo.FoldedBias("lin/kernel")


@pytest.mark.parametrize(
    "bad", ["unused", [1], {"unused": True}, None], ids=["str", "int", "dict", "none"]
)
def test_bad_diagonal_values_are_refused(bad):
    with pytest.raises(ValueError, match="diagonal must be"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", diagonal=bad)
    with pytest.raises(ValueError, match="diagonal must be"):
        lof.kfac_dimension_numbers(WithUnused(nnx.Rngs(0)), diagonal=bad)


def test_diagonal_naming_no_captured_layer_is_refused():
    model = WithUnused(nnx.Rngs(0))
    x, y = _data()
    with pytest.raises(ValueError, match=r"diagonal names 'nope'.*\['unused', 'used'\]"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", diagonal=["nope"])(model, x, y)


def test_a_layer_broadcast_across_scan_iterations_is_refused():
    class SharedLoop(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            body = nnx.scan(
                lambda h, m: m(h),
                in_axes=(nnx.Carry, nnx.StateAxes({...: None})),
                out_axes=nnx.Carry,
                length=LAYERS,
            )
            return body(x, self.lin)

    x = jax.random.normal(jax.random.key(0), (N, D))
    with pytest.raises(ValueError, match="layer lin: .*did not reach the model"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(SharedLoop(nnx.Rngs(0)), x, x)


def test_a_stacked_layer_looped_over_in_python_is_refused():
    model = Ensemble(nnx.Rngs(0))
    x, y = _data()

    def looped(m, x):
        graphdef, state = nnx.split(m.members)
        outs = [
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(x) for i in range(LAYERS)
        ]
        return jnp.mean(jnp.stack(outs), axis=0)

    with pytest.raises(ValueError, match="layer members: .*did not reach the model"):
        lof.kfac_value_and_grad(looped, "mse")(model, x, y)


def test_plain_kfac_refuses_stacked_statistics_and_names_the_layout_to_use():
    model = Scanned(nnx.Rngs(0))
    x, y = _data()
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    opt = nnx.Optimizer(model, lo.kfac(0.1), wrt=nnx.Param)  # default layout: no batch axis
    with pytest.raises(ValueError, match=r"blocks.*kfac_dimension_numbers\(model\)"):
        opt.update(model, grads, kfac_stats=stats)


class GeneralBlock(nnx.Module):
    """LinearGeneral (several output axes) and Einsum (kernel axes reordered, with a bias)."""

    def __init__(self, rngs):
        self.proj = nnx.LinearGeneral(D, (2, 3), rngs=rngs)
        self.mix = nnx.Einsum("bk,ok->bo", (D, 6), (D,), rngs=rngs)

    def __call__(self, x):
        return x + self.mix(jnp.tanh(self.proj(x)).reshape(x.shape[0], 6))


def test_stacked_linear_general_and_einsum_equal_their_unrolled_twin():
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return GeneralBlock(rngs)

    stacked = make(nnx.Rngs(7))
    blocks = nnx.List([GeneralBlock(nnx.Rngs(0)) for _ in range(LAYERS)])
    state = nnx.state(stacked, nnx.Param)
    unstack_into(stacked, blocks)
    scan = nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)

    def unrolled(bs, h):
        for b in bs:
            h = b(h)
        return h

    x = jax.random.normal(jax.random.key(0), (N, D))
    y = jax.random.normal(jax.random.key(1), (N, D))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: scan(x, m), "mse")(stacked, x, y)
    _, _, want = lof.kfac_value_and_grad(unrolled, "mse")(blocks, x, y)
    assert stats["mix"]["bias"] == lo.FoldedBias("mix/kernel")  # the stacked bias folds too
    assert stats["proj"]["kernel"].a.shape == (LAYERS, D + 1, D + 1)
    assert stats["proj"]["kernel"].g.shape == (LAYERS, 6, 6)
    for i in range(LAYERS):
        for layer in ("proj", "mix"):
            for f, g in zip(stats[layer]["kernel"], want[i][layer]["kernel"]):
                np.testing.assert_allclose(f[i], g, rtol=2e-5, atol=1e-6)
    specs = lof.kfac_dimension_numbers(stacked)(nnx.to_pure_dict(state))
    assert specs["proj"]["kernel"] == lo.DimensionNumbers(((1,), (2, 3)), batch_axes=(0,))
    assert specs["mix"]["kernel"] == lo.DimensionNumbers(((2,), (1,)), batch_axes=(0,))


def test_two_layer_axes_scan_over_vmap_applied_members():
    """A (4, 2) stack: nnx.scan over 4 stages, each averaging 2 members applied by nnx.vmap."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def stages(key):
        @nnx.vmap(in_axes=0, out_axes=0)
        def members(k):
            return nnx.Linear(3, 3, rngs=nnx.Rngs(k))

        return members(jax.random.split(key, 2))

    model = stages(jax.random.split(jax.random.key(0), 4))

    def scanned(m, x):
        def stage(h, layer):
            return jnp.mean(nnx.vmap(lambda m, h: jnp.tanh(m(h)), in_axes=(0, None))(layer, h), 0)

        return nnx.scan(stage, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, m)

    twin = nnx.List(
        [nnx.List([nnx.Linear(3, 3, rngs=nnx.Rngs(0)) for _ in range(2)]) for _ in range(4)]
    )
    state = nnx.state(model, nnx.Param)
    for i in range(4):
        for j in range(2):
            nnx.update(twin[i][j], jax.tree.map(lambda a, i=i, j=j: a[i, j], state))

    def unrolled(m, h):
        for stage in m:
            h = jnp.mean(jnp.stack([jnp.tanh(layer(h)) for layer in stage]), 0)
        return h

    x = jax.random.normal(jax.random.key(1), (5, 3))
    _, _, stats = lof.kfac_value_and_grad(scanned, "mse")(model, x, x)
    _, _, want = lof.kfac_value_and_grad(unrolled, "mse")(twin, x, x)
    assert stats["kernel"].a.shape == (4, 2, 4, 4)
    for i in range(4):
        for j in range(2):
            for f, g in zip(stats["kernel"], want[i][j]["kernel"]):
                np.testing.assert_allclose(f[i, j], g, rtol=2e-5, atol=1e-7)
    spec = lof.kfac_dimension_numbers(model)(nnx.to_pure_dict(state))["kernel"]
    assert spec == lo.DimensionNumbers(((2,), (3,)), batch_axes=(0, 1))


class GptBlock(nnx.Module):
    def __init__(self, rngs, d=16, heads=2):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Gpt(nnx.Module):
    """Tied embedding/head, pre-LayerNorm blocks built by nnx.vmap, scanned under nnx.remat."""

    def __init__(self, rngs, vocab=32, d=16, layers=2):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return GptBlock(rngs, d)

        self.blocks = make(rngs)
        self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
        step = nnx.remat(lambda h, block: block(h))
        h = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
            self.embed(tokens), self.blocks
        )
        return self.embed.attend(self.ln(h))


@pytest.mark.slow
def test_scanned_gpt_attention_and_mlp_kernels_are_preconditioned_per_block():
    model = Gpt(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, 9), 0, 32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    grad_fn = lof.kfac_value_and_grad(
        lambda m, x: m(x), "softmax_cross_entropy", statistics="fisher"
    )
    _, _, stats = grad_fn(model, x, y, key=jax.random.key(1))
    kernels = kernel_factors(stats)
    # q, k, v, out projections and the MLP: every block's own factors, stacked.
    assert len(kernels) == 6
    assert all(f.a.shape[0] == 2 and f.g.shape[0] == 2 for f in kernels.values())
    specs = lof.kfac_dimension_numbers(model)
    optimizer = nnx.Optimizer(model, lo.kfac(0.1, dimension_numbers=specs), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        loss, grads, stats = grad_fn(model, x, y, key=key)
        optimizer.update(model, grads, kfac_stats=stats)
        return loss

    losses = [float(train_step(model, optimizer, jax.random.key(i))) for i in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_stacked_convolutions_applied_with_vmap_equal_separate_layers():
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return nnx.Conv(2, 3, kernel_size=(2, 2), padding="SAME", rngs=rngs)

    model = make(nnx.Rngs(8))
    twin = nnx.List(
        [nnx.Conv(2, 3, kernel_size=(2, 2), padding="SAME", rngs=nnx.Rngs(0)) for _ in range(2)]
    )
    state = nnx.state(model, nnx.Param)
    unstack_into(model, twin)
    x = jax.random.normal(jax.random.key(2), (4, 3, 3, 2))
    y = jnp.zeros((4, 3, 3, 3))
    apply = nnx.vmap(lambda m, x: jnp.tanh(m(x)), in_axes=(0, None))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: jnp.sum(apply(m, x), 0), "mse")(model, x, y)
    _, _, want = lof.kfac_value_and_grad(
        lambda ms, x: jnp.sum(jnp.stack([jnp.tanh(m(x)) for m in ms]), 0), "mse"
    )(twin, x, y)
    assert stats["kernel"].a.shape == (2, 2 * 2 * 2 + 1, 2 * 2 * 2 + 1)  # window · c_in, + 1
    for i in range(2):
        for f, g in zip(stats["kernel"], want[i]["kernel"]):
            np.testing.assert_allclose(f[i], g, rtol=2e-5, atol=1e-6)
    spec = lof.kfac_dimension_numbers(model)(state)["kernel"].get_value()
    assert spec == lo.DimensionNumbers(((1, 2, 3), (4,)), batch_axes=(0,))


def test_a_scan_function_reused_across_captures_is_traced_each_time():
    """jax caches a transform body's trace; the capture must still see every call."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(D, D, rngs=nnx.Rngs(key))

    layers = make(jax.random.split(jax.random.key(0), LAYERS))
    scan = nnx.scan(lambda h, layer: jnp.tanh(layer(h)), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    x = jax.random.normal(jax.random.key(1), (N, D))
    grad_fn = lof.kfac_value_and_grad(lambda m, x: scan(x, m), "mse")
    first = grad_fn(layers, x, x)[2]
    second = grad_fn(layers, x, x)[2]  # the same scan object, graph and shapes
    fisher = lof.kfac_value_and_grad(lambda m, x: scan(x, m), "mse", statistics="fisher")
    third = fisher(layers, x, x, key=jax.random.key(2))[2]
    for f, g in zip(first["kernel"], second["kernel"]):
        np.testing.assert_array_equal(f, g)
    np.testing.assert_array_equal(first["kernel"].a, third["kernel"].a)
    assert first["kernel"].a.shape == (LAYERS, D + 1, D + 1)
