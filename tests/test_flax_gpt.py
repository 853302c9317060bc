"""Issue 16's acceptance test: a GPT-style model trains with ``lo.kfac``, every leaf a K-FAC block.

Tied input embedding and output head (``Embed.attend``), pre-LayerNorm blocks with
``nnx.MultiHeadAttention`` and an MLP, 4 blocks created with ``nnx.vmap`` and applied
with ``nnx.scan``; plus the scanned norms' statistics against the unrolled twin and
``statistics_batch_size`` on a scanned model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import block_types, next_token_data, unstack_into  # noqa: E402

VOCAB, D, HEADS, LAYERS, N, T = 12, 16, 2, 4, 16, 8


class Block(nnx.Module):
    """Pre-LayerNorm: ``x + attn(ln1(x))``, then ``x + down(gelu(up(ln2(x))))``."""

    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D, qkv_features=D, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, rngs, remat=False):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = make(rngs)
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.remat = remat

    def __call__(self, ids):
        mask = nnx.make_causal_mask(ids)

        def body(x, block):
            return block(x, mask)

        if self.remat:
            body = nnx.remat(body)
        scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        x = scan(self.embed(ids), self.blocks)
        return self.embed.attend(self.ln_f(x))  # tied output head


def _tokens(key, n=N):
    """Sequences of the map ``t -> (5 t + 3) mod V``: inputs and next tokens."""
    return next_token_data(key, n, T, VOCAB)


def _param_paths(model) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return sorted(jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat)


def test_gpt_trains_with_kfac_under_jit_with_every_leaf_preconditioned():
    model = GPT(nnx.Rngs(0))
    ids, targets = _tokens(jax.random.key(0))
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy")
    stats = nnx.eval_shape(lambda m: grad_fn(m, ids, targets)[2], model)
    # Which block each param leaf gets: no leaf missing, none None (no fallback).
    types = block_types(stats)
    assert sorted(types) == _param_paths(model)
    assert "NoneType" not in types.values(), types
    assert types["embed/embedding"] == "KfacFactors"
    for name in ("ln1/scale", "ln1/bias", "ln2/scale", "ln_f/scale"):
        path = name if name.startswith("ln_f") else f"blocks/{name}"
        assert types[path] == "KfacDiagonal"
    for name in ("query", "key", "value", "out"):
        assert types[f"blocks/attn/{name}/kernel"] == "KfacFactors"
        assert types[f"blocks/attn/{name}/bias"] == "FoldedBias"
    # Stacked: one block per layer slice (the LayerNorm scale (L, D) a (L, D) diagonal).
    assert stats["blocks"]["ln1"]["scale"].fisher.shape == (LAYERS, D)
    assert stats["blocks"]["up"]["kernel"].a.shape == (LAYERS, D + 1, D + 1)
    assert stats["embed"]["embedding"].a.shape == (VOCAB,)

    dims = lof.kfac_dimension_numbers(model)
    specs = dims(nnx.state(model, nnx.Param))
    assert specs["embed"]["embedding"].get_value() == lo.DiagonalFactors(
        lo.DimensionNumbers(((0,), (1,))), (0,)
    )
    assert specs["blocks"]["ln1"]["scale"].get_value() is None
    opt = nnx.Optimizer(model, lo.kfac(0.1, dimension_numbers=dims), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads, stats = grad_fn(model, ids, targets)
        opt.update(model, grads, kfac_stats=stats)
        return loss

    losses = [float(step(model, opt)) for _ in range(20)]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.3 * losses[0], losses[::4]
    report = lo.failure_report(opt.opt_state)
    assert report.skipped == 0 and report.failed == 0
    # The diagonal fallback never ran: its second moment stays zero at every kernel.
    nu = opt.opt_state[0].nu
    np.testing.assert_array_equal(nu["blocks"]["up"]["kernel"][...], 0.0)
    np.testing.assert_array_equal(nu["embed"]["embedding"][...], 0.0)
    assert float(jnp.min(nu["blocks"]["ln1"]["scale"][...])) > 0.0


class NormBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.rms = nnx.RMSNorm(D, rngs=rngs)
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.rms(jnp.tanh(self.lin(self.ln(x))))


class ScannedNorms(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NormBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        return nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
            x, self.blocks
        )


class UnrolledNorms(nnx.Module):
    def __init__(self, scanned):
        self.blocks = nnx.List([NormBlock(nnx.Rngs(i)) for i in range(LAYERS)])
        unstack_into(scanned.blocks, self.blocks)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _perturbed(model, key):
    """Norm scales and biases away from 1 and 0, so the slices differ."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    nnx.update(
        model,
        treedef.unflatten([p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]),
    )
    return model


@pytest.mark.parametrize("statistics", ["empirical", "gauss_newton"])
def test_scanned_norm_statistics_equal_the_unrolled_twin(statistics):
    model = _perturbed(ScannedNorms(nnx.Rngs(0)), jax.random.key(3))
    twin = UnrolledNorms(model)
    x = jax.random.normal(jax.random.key(0), (4, 3, D))
    y = jax.random.normal(jax.random.key(1), (4, 3, D))
    np.testing.assert_allclose(model(x), twin(x), rtol=1e-5, atol=1e-6)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics=statistics)
    stats, twin_stats = f(model, x, y)[2], f(twin, x, y)[2]
    for name in ("ln", "rms"):
        for leaf in ("scale", "bias") if name == "ln" else ("scale",):
            got = stats["blocks"][name][leaf]
            assert isinstance(got, lo.KfacDiagonal) and got.fisher.shape == (LAYERS, D)
            want = np.stack([twin_stats["blocks"][i][name][leaf].fisher for i in range(LAYERS)])
            np.testing.assert_allclose(got.fisher, want, rtol=2e-5, atol=1e-8)
            assert not np.allclose(want[0], want[1])  # the slices differ
    want_a = np.stack([twin_stats["blocks"][i]["lin"]["kernel"].a for i in range(LAYERS)])
    np.testing.assert_allclose(stats["blocks"]["lin"]["kernel"].a, want_a, rtol=2e-5, atol=1e-6)


def test_scanned_norm_statistics_match_a_float64_per_example_reference():
    """The stacked LayerNorm's diagonal Fisher is (1/n) Σ_i g_i² of each slice's per-example grads."""
    with jax.enable_x64(True):
        model = _perturbed(ScannedNorms(nnx.Rngs(0)), jax.random.key(3))
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), params))
        x = jax.random.normal(jax.random.key(0), (3, 2, D), jnp.float64)
        y = jax.random.normal(jax.random.key(1), (3, 2, D), jnp.float64)
        stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)[2]
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def example_loss(p, xi, yi):
            return lof.mse(nnx.merge(graphdef, p, rest)(xi[None]), yi[None])

        per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
        g = per_example["blocks"]["ln"]["scale"][...]  # (n, L, D)
        want = np.mean(np.asarray(g) ** 2, axis=0)
        # The capture accumulates its statistics in float32.
        np.testing.assert_allclose(stats["blocks"]["ln"]["scale"].fisher, want, rtol=1e-5)
        b = np.asarray(per_example["blocks"]["rms"]["scale"][...])
        np.testing.assert_allclose(
            stats["blocks"]["rms"]["scale"].fisher, np.mean(b**2, axis=0), rtol=1e-5
        )


def test_statistics_batch_size_on_a_scanned_model_equals_the_first_examples_capture():
    """Stacked kernels and stacked norms: the sub-batch's statistics, per slice."""
    model = _perturbed(ScannedNorms(nnx.Rngs(1)), jax.random.key(2))
    x = jax.random.normal(jax.random.key(0), (8, 3, D))
    y = jax.random.normal(jax.random.key(1), (8, 3, D))
    m = 3

    def f(**kw):
        return lof.kfac_value_and_grad(lambda mod, x: mod(x), "mse", **kw)

    loss, grads, sub = f(statistics_batch_size=m)(model, x, y)
    full_loss, full_grads, full = f()(model, x, y)
    assert sub["blocks"]["ln"]["scale"].fisher.shape == (LAYERS, D)
    assert not np.allclose(
        sub["blocks"]["ln"]["scale"].fisher, full["blocks"]["ln"]["scale"].fisher
    )
    # The loss and the gradient stay the whole batch's.
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The first m examples captured alone: the same statistics. Their loss is the mean
    # over m examples, and the per-example output gradients n dL/dz do not depend on n.
    want = f()(model, x[:m], y[:m])[2]
    got_leaves = jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: x is None)[0]
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: x is None)[0])
    assert len(got_leaves) == len(want_leaves)
    for path, leaf in got_leaves:
        np.testing.assert_allclose(
            leaf, want_leaves[path], rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


class TwiceBlock(nnx.Module):
    """A Linear and a LayerNorm each used twice per block (weight reuse inside the scan)."""

    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        h = self.lin(jnp.tanh(self.lin(self.ln(x))))
        return x + self.ln(h)


# statistics_batch_size=2: each use's rows sliced on the examples (a second use of a stacked
# layer once had its layer axis sliced instead).
@pytest.mark.parametrize("sub_batch", [None, 2])
def test_a_stacked_layer_used_twice_in_a_scanned_body_equals_the_unrolled_twin(sub_batch):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return TwiceBlock(rngs)

    class Scanned(nnx.Module):
        def __init__(self):
            self.blocks = make(nnx.Rngs(0))

        def __call__(self, x):
            body = nnx.scan(lambda h, b: b(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            return body(x, self.blocks)

    class Unrolled(nnx.Module):
        def __init__(self, scanned):
            self.blocks = nnx.List([TwiceBlock(nnx.Rngs(i)) for i in range(LAYERS)])
            unstack_into(scanned.blocks, self.blocks)

        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = _perturbed(Scanned(), jax.random.key(7))
    twin = Unrolled(model)
    x = jax.random.normal(jax.random.key(0), (4, 3, D))
    y = jax.random.normal(jax.random.key(1), (4, 3, D))
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics_batch_size=sub_batch)
    stats, twin_stats = f(model, x, y)[2], f(twin, x, y)[2]
    if sub_batch is not None:  # the statistics are those of the first examples alone
        alone = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(twin, x[:2], y[:2])[2]
        for name in ("a", "g"):
            np.testing.assert_allclose(
                getattr(twin_stats["blocks"][0]["lin"]["kernel"], name),
                getattr(alone["blocks"][0]["lin"]["kernel"], name),
                rtol=2e-5,
                atol=1e-5,
            )
    for i in range(LAYERS):
        want = twin_stats["blocks"][i]
        # The reuse rule per slice: uses as extra positions (a, g over 2 * positions rows).
        for name in ("a", "g"):
            np.testing.assert_allclose(
                getattr(stats["blocks"]["lin"]["kernel"], name)[i],
                getattr(want["lin"]["kernel"], name),
                rtol=2e-5,
                atol=1e-5,  # float32 round-off on entries up to ~10
            )
        for leaf in ("scale", "bias"):
            np.testing.assert_allclose(
                stats["blocks"]["ln"][leaf].fisher[i], want["ln"][leaf].fisher, rtol=2e-5
            )
    # Two uses: the kernel's a has 2 * 3 rows per example (corner = positions of both uses).
    np.testing.assert_allclose(stats["blocks"]["lin"]["kernel"].a[:, -1, -1], 6.0)


def test_a_stacked_layer_looped_over_in_python_is_refused_by_path():
    class Looped(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.LayerNorm(D, rngs=rngs)

            self.norms = make(rngs)

        def __call__(self, x):
            graphdef, state = nnx.split(self.norms)
            for i in range(LAYERS):
                x = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(x)
            return x

    x = jnp.ones((2, D))
    with pytest.raises(ValueError, match="layer norms: .*did not reach the model"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(Looped(nnx.Rngs(0)), x, x)


@pytest.mark.parametrize("layout", ["default", "norm spec None"])
def test_a_diagonal_block_keeps_its_average_on_a_step_without_statistics(layout):
    """statistics_frequency=2: the step without statistics divides by the kept EMA, not g²."""
    f = jnp.array([0.5, 2.0, 8.0])
    params = {"norm": {"scale": jnp.ones(3)}, "lin": {"kernel": jnp.ones((3, 2))}}
    stats = {"norm": {"scale": lo.KfacDiagonal(f)}, "lin": {"kernel": None}}
    damping, lr = 0.1, 1.0
    dims = None
    if layout != "default":  # as kfac_dimension_numbers gives norm leaves

        def dims(tree):
            return {"norm": {"scale": None}, "lin": {"kernel": lo.DimensionNumbers(((0,), (1,)))}}

    tx = lo.kfac(lr, momentum=0.0, damping=damping, statistics_frequency=2, dimension_numbers=dims)
    state = tx.init(params)
    g0 = {"norm": {"scale": jnp.array([1.0, 1.0, 1.0])}, "lin": {"kernel": jnp.ones((3, 2))}}
    u0, state = tx.update(g0, state, params, kfac_stats=stats)
    # EMA (1 - beta) f after one statistics update, debiased: f itself.
    np.testing.assert_allclose(
        u0["norm"]["scale"], -lr * g0["norm"]["scale"] / (f + damping), rtol=1e-6
    )
    assert bool(state[0].diagonal["norm"]["scale"]) and not bool(state[0].diagonal["lin"]["kernel"])
    nu_before = np.asarray(state[0].nu["norm"]["scale"])
    g1 = {"norm": {"scale": jnp.array([2.0, -1.0, 3.0])}, "lin": {"kernel": jnp.ones((3, 2))}}
    u1, state = tx.update(g1, state, params, kfac_stats=None)
    # Still one statistics update: the same f, the new gradient.
    np.testing.assert_allclose(
        u1["norm"]["scale"], -lr * g1["norm"]["scale"] / (f + damping), rtol=1e-6
    )
    np.testing.assert_array_equal(state[0].nu["norm"]["scale"], nu_before)
    assert bool(state[0].diagonal["norm"]["scale"])
    assert int(lo.failure_report(state).skipped) == 0


def test_stacked_embeddings_get_per_slice_statistics_and_layouts():
    """Tables created with nnx.vmap: per slice the counts diagonal and g, as separate tables."""

    class EmbBlock(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(VOCAB, D, rngs=rngs)
            self.norm = nnx.LayerNorm(D, rngs=rngs)

        def __call__(self, h, ids):
            return self.norm(h + self.emb(ids))

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return EmbBlock(rngs)

            self.blocks = make(rngs)

        def __call__(self, ids):
            body = nnx.scan(lambda h, b: b(h, ids), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            return body(jnp.zeros(ids.shape + (D,)), self.blocks)

    class Unrolled(nnx.Module):
        def __init__(self, stacked):
            self.blocks = nnx.List([EmbBlock(nnx.Rngs(i)) for i in range(LAYERS)])
            unstack_into(stacked.blocks, self.blocks)

        def __call__(self, ids):
            h = jnp.zeros(ids.shape + (D,))
            for b in self.blocks:
                h = b(h, ids)
            return h

    model = Stacked(nnx.Rngs(0))
    twin = Unrolled(model)
    ids, _ = _tokens(jax.random.key(4), n=4)
    y = jax.random.normal(jax.random.key(5), ids.shape + (D,))
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    stats, twin_stats = f(model, ids, y)[2], f(twin, ids, y)[2]
    got = stats["blocks"]["emb"]["embedding"]
    assert got.a.shape == (LAYERS, VOCAB) and got.g.shape == (LAYERS, D, D)
    for i in range(LAYERS):
        want = twin_stats["blocks"][i]["emb"]["embedding"]
        np.testing.assert_allclose(got.a[i], want.a, rtol=1e-6)
        np.testing.assert_allclose(got.g[i], want.g, rtol=2e-5, atol=1e-7)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=VOCAB) / ids.shape[0]
    np.testing.assert_allclose(got.a[0], counts, rtol=1e-6)
    dims = lof.kfac_dimension_numbers(model)
    spec = dims(nnx.state(model, nnx.Param))["blocks"]["emb"]["embedding"].get_value()
    assert spec == lo.DiagonalFactors(lo.DimensionNumbers(((1,), (2,)), (0,)), (0,))
    # kfac takes the stacked layout: one diagonal-counts block per slice.
    opt = nnx.Optimizer(model, lo.kfac(0.1, dimension_numbers=dims), wrt=nnx.Param)
    _, grads, stats = f(model, ids, y)
    opt.update(model, grads, kfac_stats=stats)
    assert int(lo.failure_report(opt.opt_state).skipped) == 0
