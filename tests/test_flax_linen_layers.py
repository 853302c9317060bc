"""Linen parity of the K-FAC capture (issue 16): embeddings (tied ``attend``), LayerNorm and
RMSNorm, per-head ``nn.Einsum``, ``nn.MultiHeadDotProductAttention``, reused layers and a
GPT-like model.

References are float64 computations from explicit per-example gradients; twins compare the
Linen capture with the NNX capture on the same weights.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import block_types, next_token_data, unstack_into  # noqa: E402

F64 = jnp.float64
V, D, H, T = 7, 4, 2, 3
DH = D // H


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in flat_g] == [
        jax.tree_util.keystr(p) for p, _ in flat_w
    ]
    for (path, a), (_, b) in zip(flat_g, flat_w):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _paths(tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted(jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat)


# ------------------------------------------------------------------ NNX and Linen twins


class LinenMix(nn.Module):
    """Embed -> LayerNorm -> attention -> RMSNorm -> per-head Einsum -> tied head."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(V, D, name="embed")
        h = nn.LayerNorm(name="ln")(emb(ids))
        mask = nn.make_causal_mask(ids)
        h = h + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, name="attn")(
            h, mask=mask
        )
        h = nn.RMSNorm(name="rms")(h)
        heads = nn.Einsum((H, DH, DH), "bthd,hdk->bthk", name="heads")
        h = jnp.tanh(heads(h.reshape(h.shape[:-1] + (H, DH)))).reshape(h.shape)
        return emb.attend(h)


class NnxMix(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=H, in_features=D, qkv_features=D, decode=False, rngs=rngs
        )
        self.rms = nnx.RMSNorm(D, rngs=rngs)
        self.heads = nnx.Einsum("bthd,hdk->bthk", (H, DH, DH), (H, DH), rngs=rngs)
        state = nnx.state(self, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        nnx.update(self, state)

    def __call__(self, ids):
        h = self.ln(self.embed(ids))
        h = h + self.attn(h, mask=nnx.make_causal_mask(ids))
        h = self.rms(h)
        h = jnp.tanh(self.heads(h.reshape(h.shape[:-1] + (H, DH)))).reshape(h.shape)
        return self.embed.attend(h)


def _ids(key, n=5):
    ids = jax.random.randint(key, (n, T + 1), 0, V)
    return ids[:, :-1], ids[:, 1:]


def _perturbed(params, key, scale=0.3):
    """Params moved away from their initial values (norm scales 1, biases 0)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize(
    "mode",
    [
        "empirical",
        pytest.param("fisher", marks=pytest.mark.slow),
        pytest.param("gauss_newton", marks=pytest.mark.slow),
    ],
)
def test_linen_layers_give_the_nnx_twins_statistics_and_kfac_updates(mode):
    model = LinenMix()
    ids, targets = _ids(jax.random.key(0))
    params = _perturbed(model.init(jax.random.key(1), ids)["params"], jax.random.key(2))
    twin = NnxMix(params)
    np.testing.assert_allclose(
        model.apply({"params": params}, ids), twin(ids), rtol=1e-5, atol=1e-5
    )
    key = jax.random.key(3) if mode == "fisher" else None
    capture = jax.jit(
        lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy", statistics=mode)
    )
    lv, lg, ls = capture(params, ids, targets, key)
    nv, ng, ns = nnx.jit(
        lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy", statistics=mode)
    )(twin, ids, targets, key)
    np.testing.assert_allclose(lv, nv, rtol=1e-6)
    _assert_trees_close(lg, nnx.to_pure_dict(ng), rtol=1e-4, atol=1e-6)
    _assert_trees_close(ls, ns, rtol=1e-4, atol=1e-6)
    types = block_types(ls)
    assert sorted(types) == _paths(params) and "NoneType" not in types.values(), types
    assert types["embed/embedding"] == "KfacFactors" and ls["embed"]["embedding"].a.shape == (V,)
    assert types["ln/scale"] == types["ln/bias"] == types["rms/scale"] == "KfacDiagonal"
    assert ls["heads"]["kernel"].a.shape == (H, DH + 1, DH + 1)  # one block per head
    assert ls["heads"]["bias"] == lo.FoldedBias("heads/kernel")
    # The layouts, then the kfac updates, are the NNX twin's.
    dims = lof.linen_kfac_dimension_numbers(model, params, ids)
    spec = dims(params)
    nspec = nnx.to_pure_dict(lof.kfac_dimension_numbers(twin)(nnx.state(twin, nnx.Param)))
    assert spec == nspec
    assert spec["heads"]["kernel"] == lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))
    assert spec["embed"]["embedding"] == lo.DiagonalFactors(lo.DimensionNumbers(((0,), (1,))), (0,))
    assert spec["ln"]["scale"] is None
    tx = lo.kfac(0.5, dimension_numbers=dims)
    ntx = lo.kfac(0.5, dimension_numbers=lof.kfac_dimension_numbers(twin))
    npar = nnx.to_pure_dict(nnx.state(twin, nnx.Param))
    lu, _ = jax.jit(tx.update)(lg, tx.init(params), params, kfac_stats=ls)
    nu, _ = jax.jit(ntx.update)(nnx.to_pure_dict(ng), ntx.init(npar), npar, kfac_stats=ns)
    _assert_trees_close(lu, nu, rtol=2e-3, atol=1e-5)


# ------------------------------------------------------------------ float64 references


class NormNet(nn.Module):
    """Dense -> norm over a sequence -> tanh -> Dense, float64."""

    norm: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, param_dtype=F64, name="inp")(x)
        if self.norm == "layer":
            h = nn.LayerNorm(param_dtype=F64, name="norm")(h)
        else:
            h = nn.RMSNorm(param_dtype=F64, name="norm")(h)
        return nn.Dense(2, param_dtype=F64, name="out")(jnp.tanh(h))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_diagonal_fisher_matches_float64_per_example_gradients(norm):
    with jax.enable_x64(True):
        model = NormNet(norm)
        x = jax.random.normal(jax.random.key(0), (6, T, 3), F64)
        y = jax.random.normal(jax.random.key(1), (6, T, 2), F64)
        params = _perturbed(model.init(jax.random.key(2), x)["params"], jax.random.key(3))
        _, _, stats = jax.jit(lof.linen_kfac_value_and_grad(model, "mse"))(params, x, y)

        def losses(p):  # per-example 0.5 ||f(x)_i - y_i||^2
            out = model.apply({"params": p}, x)
            return 0.5 * jnp.sum(jnp.reshape(out - y, (x.shape[0], -1)) ** 2, axis=1)

        jac = jax.jit(jax.jacrev(losses))(params)["norm"]
        leaves = ("scale",) if norm == "rms" else ("scale", "bias")
        assert sorted(stats["norm"]) == sorted(leaves)
        for leaf in leaves:
            got = stats["norm"][leaf]
            assert isinstance(got, lo.KfacDiagonal)
            want = np.mean(np.asarray(jac[leaf]) ** 2, axis=0)
            np.testing.assert_allclose(got.fisher, want, rtol=2e-5, atol=1e-10)


class TiedNet(nn.Module):
    """Embed -> Dense -> tanh -> the same table as the output head (``attend``), float64."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(V, D, param_dtype=F64, name="embed")
        return emb.attend(jnp.tanh(nn.Dense(D, param_dtype=F64, name="mid")(emb(ids))))


def test_tied_embedding_statistics_follow_the_reuse_rule_in_float64():
    """Lookup and ``attend`` combined: ``a = (counts + Σ_rows (n ∂L/∂logits)²) / n`` and
    ``g = (Σ δ δ^T + Σ q q^T) / R`` over the ``R = 2 n T`` rows of both uses."""
    with jax.enable_x64(True):
        model = TiedNet()
        n = 4
        ids, labels = _ids(jax.random.key(0), n)
        params = _perturbed(model.init(jax.random.key(1), ids)["params"], jax.random.key(2))
        _, _, stats = jax.jit(lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy"))(
            params, ids, labels
        )
        table = params["embed"]["embedding"]
        w, b = params["mid"]["kernel"], params["mid"]["bias"]

        def from_z(z):  # the loss from the embedding's output
            return lof.softmax_cross_entropy(jnp.tanh(z @ w + b[None, None]) @ table.T, labels)

        z = table[ids]
        q = np.asarray(jnp.tanh(z @ w + b[None, None])).reshape(
            -1, D
        )  # the head's inputs (queries)
        delta = n * np.asarray(jax.grad(from_z)(z)).reshape(-1, D)
        logits = jnp.tanh(z @ w + b[None, None]) @ table.T
        dlog = n * np.asarray(jax.grad(lof.softmax_cross_entropy)(logits, labels)).reshape(-1, V)
        counts = np.bincount(np.asarray(ids).ravel(), minlength=V)
        s = stats["embed"]["embedding"]
        # The statistics are float32 (the capture accumulates in float32).
        np.testing.assert_allclose(s.a, (counts + np.sum(dlog**2, 0)) / n, rtol=2e-6)
        want_g = (delta.T @ delta + q.T @ q) / (2 * n * T)
        np.testing.assert_allclose(s.g, want_g, rtol=2e-6, atol=1e-9)


class PerHead(nn.Module):
    @nn.compact
    def __call__(self, x):  # (n, T, H, DH)
        return jnp.tanh(nn.Einsum((H, DH, 3), "bthd,hdk->bthk", param_dtype=F64, name="e")(x))


def test_per_head_einsum_factors_match_float64_per_head_rows():
    with jax.enable_x64(True):
        model = PerHead()
        n = 5
        x = jax.random.normal(jax.random.key(0), (n, T, H, DH), F64)
        y = jax.random.normal(jax.random.key(1), (n, T, H, 3), F64)
        params = _perturbed(model.init(jax.random.key(2), x)["params"], jax.random.key(3))
        _, _, stats = jax.jit(lof.linen_kfac_value_and_grad(model, "mse"))(params, x, y)
        kernel, bias = params["e"]["kernel"], params["e"]["bias"]

        def from_out(z):
            return lof.mse(jnp.tanh(z), y)

        z = jnp.einsum("bthd,hdk->bthk", x, kernel) + bias[None, None]
        delta = n * np.asarray(jax.grad(from_out)(z))
        s = stats["e"]["kernel"]
        for h in range(H):
            xh = np.concatenate([np.asarray(x[:, :, h]).reshape(-1, DH), np.ones((n * T, 1))], 1)
            dh = delta[:, :, h].reshape(-1, 3)
            np.testing.assert_allclose(s.a[h], xh.T @ xh / n, rtol=2e-6)
            np.testing.assert_allclose(s.g[h], dh.T @ dh / (n * T), rtol=2e-6, atol=1e-9)
        assert stats["e"]["bias"] == lo.FoldedBias("e/kernel")


# ------------------------------------------------------------------ reuse and per-slice kernels


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3, name="shared")
        return d(jnp.tanh(d(x)))


class NnxTwice(nnx.Module):
    def __init__(self, params):
        self.shared = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.shared.kernel[...] = params["shared"]["kernel"]
        self.shared.bias[...] = params["shared"]["bias"]

    def __call__(self, x):
        return self.shared(jnp.tanh(self.shared(x)))


class Batched(nn.Module):
    @nn.compact
    def __call__(self, x):  # (H, n, 3): one kernel per leading slice
        return nn.DenseGeneral(2, batch_dims=(0,), name="per_slice")(x)


class NnxBatched(nnx.Module):
    def __init__(self, params):
        self.per_slice = nnx.LinearGeneral(3, 2, axis=-1, batch_axis={0: H}, rngs=nnx.Rngs(0))
        self.per_slice.kernel[...] = params["per_slice"]["kernel"]
        self.per_slice.bias[...] = params["per_slice"]["bias"]

    def __call__(self, x):
        return self.per_slice(x)


@pytest.mark.parametrize("which", ["twice", "batch_dims"])
def test_reused_and_per_slice_linen_layers_equal_the_nnx_twins(which):
    if which == "twice":
        model, make, x = Twice(), NnxTwice, jax.random.normal(jax.random.key(0), (6, 3))
    else:
        model, make, x = Batched(), NnxBatched, jax.random.normal(jax.random.key(0), (H, 6, 3))
    params = model.init(jax.random.key(1), x)["params"]
    twin = make(params)
    out = model.apply({"params": params}, x)
    np.testing.assert_allclose(out, twin(x), rtol=1e-6, atol=1e-6)
    y = jax.random.normal(jax.random.key(2), out.shape)
    _, lg, ls = lof.linen_kfac_value_and_grad(model, "mse")(params, x, y)
    _, ng, ns = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(twin, x, y)
    _assert_trees_close(lg, nnx.to_pure_dict(ng))
    _assert_trees_close(ls, ns, rtol=1e-5)
    spec = lof.linen_kfac_dimension_numbers(model, params, x)(params)
    assert spec == nnx.to_pure_dict(lof.kfac_dimension_numbers(twin)(nnx.state(twin, nnx.Param)))


class NormOnAxis0(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(reduction_axes=0, feature_axes=0, name="norm")(x)


def test_a_norm_over_the_examples_axis_is_refused_by_path():
    x = jnp.ones((3, 4))
    params = NormOnAxis0().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="layer norm: its features include axis 0"):
        lof.linen_kfac_value_and_grad(NormOnAxis0(), "mse")(params, x, jnp.zeros((3, 4)))


# ------------------------------------------------------------------ a GPT-like Linen model

LAYERS, N = 2, 16
_SCAN_AXES = {"params": 0, "perturbations": 0, "intermediates": 0}


class Block(nn.Module):
    """Pre-LayerNorm: ``x + attn(ln1(x))``, then ``x + down(gelu(up(ln2(x))))``."""

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=8, name="attn")(
            h, mask=mask
        )
        h = nn.Dense(16, name="up")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dense(8, name="down")(nn.gelu(h)), None


class LinenGPT(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(12, 8, name="embed")
        blocks = nn.scan(
            Block,
            variable_axes=_SCAN_AXES,
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=LAYERS,
        )
        x, _ = blocks(name="blocks")(emb(ids), nn.make_causal_mask(ids))
        return emb.attend(nn.LayerNorm(name="ln_f")(x))  # tied output head


def test_linen_gpt_trains_with_kfac_under_jit_with_every_leaf_preconditioned():
    import optax

    model = LinenGPT()
    ids, targets = next_token_data(jax.random.key(0), N, 6, 12)
    params = model.init(jax.random.key(1), ids)["params"]
    capture = lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy")
    stats = jax.eval_shape(lambda p: capture(p, ids, targets)[2], params)
    types = block_types(stats)
    assert sorted(types) == _paths(params)
    assert "NoneType" not in types.values(), types
    assert types["embed/embedding"] == "KfacFactors"
    for name in ("ln1/scale", "ln1/bias", "ln2/scale"):
        assert types[f"blocks/{name}"] == "KfacDiagonal"
    for name in ("query", "key", "value", "out"):
        assert types[f"blocks/attn/{name}/kernel"] == "KfacFactors"
        assert types[f"blocks/attn/{name}/bias"] == "FoldedBias"
    assert stats["blocks"]["ln1"]["scale"].fisher.shape == (LAYERS, 8)
    assert stats["blocks"]["up"]["kernel"].a.shape == (LAYERS, 9, 9)
    assert stats["blocks"]["attn"]["query"]["kernel"].g.shape == (LAYERS, 8, 8)

    dims = lof.linen_kfac_dimension_numbers(model, params, ids)
    spec = dims(params)
    assert spec["blocks"]["attn"]["query"]["kernel"] == lo.DimensionNumbers(
        ((1,), (2, 3)), batch_axes=(0,)
    )
    assert spec["blocks"]["ln1"]["scale"] is None
    tx = lo.kfac(0.3, dimension_numbers=dims)

    @jax.jit
    def step(params, state):
        loss, grads, stats = capture(params, ids, targets)
        updates, state = tx.update(grads, state, params, kfac_stats=stats)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.3 * losses[0], losses[::4]
    report = lo.failure_report(state)
    assert report.skipped == 0 and report.failed == 0
    # The diagonal fallback never ran: its second moment stays zero at every kernel.
    state_: Any = state
    nu = state_[0].nu
    np.testing.assert_array_equal(nu["blocks"]["up"]["kernel"], 0.0)
    np.testing.assert_array_equal(nu["embed"]["embedding"], 0.0)
    assert float(jnp.min(nu["blocks"]["ln1"]["scale"])) > 0.0


# ------------------------------------------------------------------ kfac's default layout


class NormLM(nn.Module):
    """Embed -> LayerNorm -> Dense -> RMSNorm -> tied head: every leaf has its default."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(V, 16, name="embed")
        h = nn.Dense(16, name="mid")(nn.LayerNorm(name="ln")(emb(ids)))
        return emb.attend(nn.RMSNorm(name="rms")(jnp.tanh(h)))


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


_NORM_LEAVES = (("ln", "scale"), ("ln", "bias"), ("rms", "scale"))


def _norm_lm():
    model = NormLM()
    ids, targets = _ids(jax.random.key(0), 6)
    params = _perturbed(model.init(jax.random.key(1), ids)["params"], jax.random.key(2))
    dims = lof.linen_kfac_dimension_numbers(model, params, ids)
    # The layout kfac had before norm leaves defaulted to None: an output factor each.
    old = jax.tree.map(lambda s: s, dims(params), is_leaf=lambda s: s is None)
    for name, leaf in _NORM_LEAVES:
        old[name][leaf] = lo.default_kernel_dimension_numbers(params[name][leaf].shape)
    return model, ids, targets, params, dims, old


def test_default_layout_allocates_no_factors_for_norm_leaves():
    _, _, _, params, dims, old = _norm_lm()
    from layerwise_optax._kfac import default_layout

    assert default_layout(params) == dims(params)
    sd: Any = lo.kfac(0.1).init(params)
    ss: Any = lo.kfac(0.1, dimension_numbers=dims).init(params)
    for name, leaf in _NORM_LEAVES:
        for part in (sd[0].factors, sd[0].inverses, sd[0].pending):
            assert _nbytes(part[name][leaf]) == 0
    assert _nbytes(sd) == _nbytes(ss)
    # What the old default allocated on top: factors and inverses (pending statistics
    # are placeholders unless lo.multi_steps allocates them), 2 (d^2 + 1) floats per
    # leaf (d x d output factor, 1 x 1 empty input group), for 3 leaves.
    so: Any = lo.kfac(0.1, dimension_numbers=old).init(params)
    big = [_nbytes((t[0].factors, t[0].inverses, t[0].pending)) for t in (so, sd)]
    assert big[0] - big[1] == 3 * 2 * (16 * 16 + 1) * 4  # float32
    assert _nbytes(so) - _nbytes(sd) >= big[0] - big[1]


@pytest.mark.slow
def test_default_layout_updates_of_norm_leaves_are_the_spelled_layouts():
    model, ids, targets, params, dims, old = _norm_lm()
    _, grads, stats = jax.jit(lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy"))(
        params, ids, targets
    )
    default, spelled = lo.kfac(0.1), lo.kfac(0.1, dimension_numbers=dims)
    ud, _ = jax.jit(default.update)(grads, default.init(params), params, kfac_stats=stats)
    us, _ = jax.jit(spelled.update)(grads, spelled.init(params), params, kfac_stats=stats)
    _assert_trees_close(ud, us, rtol=0, atol=0)
    # Without statistics for them, norm leaves take the diagonal fallback as before.
    no_norm = {k: v for k, v in stats.items() if k not in ("ln", "rms")}
    no_norm.update({"ln": {"scale": None, "bias": None}, "rms": {"scale": None}})
    before = lo.kfac(0.1, dimension_numbers=old)
    un, _ = jax.jit(default.update)(grads, default.init(params), params, kfac_stats=no_norm)
    uo, _ = jax.jit(before.update)(grads, before.init(params), params, kfac_stats=no_norm)
    _assert_trees_close(un, uo, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ examples mapped away by vmap


def _stacked_linears(count, d=3):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(d, d, rngs=nnx.Rngs(key))

    return make(jax.random.split(jax.random.key(0), count))


class StackedModel(nnx.Module):
    def __init__(self, count, per_example):
        self.blocks = _stacked_linears(count)
        self.per_example = per_example

    def __call__(self, x):  # x: (n, T, 3)
        if self.per_example:  # slice i of the stack applied to example i only
            return nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(self.blocks, x)
        # every slice sees the n examples (copies of x stacked on a layer axis of size n)
        copies = jnp.broadcast_to(x, (x.shape[0],) + x.shape)
        return jnp.sum(nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(self.blocks, copies), 0)


class PerExampleModel(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(self.lin, x)


def test_a_vmap_that_maps_the_examples_away_is_refused_by_path():
    """Each slice seeing one example's rows counted them as the batch's (``B`` off by n)."""
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))  # n = 2 examples, T = 4
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    with pytest.raises(ValueError, match=r"layer blocks: .* maps axis 0 .* examples were mapped"):
        grad_fn(StackedModel(2, per_example=True), x, x)
    with pytest.raises(ValueError, match=r"layer lin: .* maps axis 0 .* examples were mapped"):
        grad_fn(PerExampleModel(), x, x)


def test_a_layer_axis_of_the_batch_size_whose_slices_see_the_examples_is_captured():
    model = StackedModel(2, per_example=False)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    y = jax.random.normal(jax.random.key(2), (2, 4, 3))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    twins = [nnx.Linear(3, 3, rngs=nnx.Rngs(0)) for _ in range(2)]
    unstack_into(model.blocks, twins)
    _, _, want = lof.kfac_value_and_grad(lambda ms, x: ms[0](x) + ms[1](x), "mse")(
        nnx.List(twins), x, y
    )
    for i in range(2):
        for f, g in zip(stats["blocks"]["kernel"], want[i]["kernel"]):
            np.testing.assert_allclose(f[i], g, rtol=1e-5, atol=1e-6)


class LinenPerExample(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(
            nn.Dense,
            variable_axes={"params": None, "perturbations": 0, "intermediates": 0},
            split_rngs={"params": False},
        )
        return dense(3, name="dense")(x)


def test_a_linen_vmap_over_the_examples_is_refused_by_path():
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    params = LinenPerExample().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"layer dense: .* examples were mapped away"):
        lof.linen_kfac_value_and_grad(LinenPerExample(), "mse")(params, x, x)


# ------------------------------------------------------------------ a per-head kernel used twice


class HeadsTwice(nnx.Module):
    def __init__(self, dtype=F64):
        self.e = nnx.Einsum(
            "bthd,hdk->bthk", (H, DH, DH), (H, DH), param_dtype=dtype, rngs=nnx.Rngs(0)
        )
        self.e.kernel[...] = jax.random.normal(jax.random.key(5), (H, DH, DH), dtype)
        self.e.bias[...] = 0.3 * jax.random.normal(jax.random.key(6), (H, DH), dtype)

    def __call__(self, x):
        return self.e(jnp.tanh(self.e(x)))


class LinenHeadsTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        e = nn.Einsum((H, DH, DH), "bthd,hdk->bthk", name="e")
        return e(jnp.tanh(e(x)))


def test_a_per_head_kernel_used_twice_gets_the_reuse_rule_per_head():
    """Per head: ``a = (1/n) Σ over both uses' rows of [x; 1][x; 1]^T``, ``g = Σ δ δ^T / (2 n T)``."""
    n = 4
    with jax.enable_x64(True):
        model = HeadsTwice()
        x = jax.random.normal(jax.random.key(0), (n, T, H, DH), F64)
        y = jax.random.normal(jax.random.key(1), (n, T, H, DH), F64)
        _, _, stats = nnx.jit(lof.kfac_value_and_grad(lambda m, x: m(x), "mse"))(model, x, y)
        w, b = model.e.kernel[...], model.e.bias[...]

        def use(h):
            return jnp.einsum("bthd,hdk->bthk", h, w) + b[None, None]

        def loss(e1, e2):  # the output of each use perturbed on its own
            h = jnp.tanh(use(x) + e1)
            return lof.mse(use(h) + e2, y)

        z = jnp.zeros((n, T, H, DH), F64)
        d1, d2 = (n * np.asarray(d) for d in jax.grad(loss, argnums=(0, 1))(z, z))
        inputs = (np.asarray(x), np.asarray(jnp.tanh(use(x))))
        s = stats["e"]["kernel"]
        assert s.a.shape == (H, DH + 1, DH + 1)
        for h in range(H):
            xs = np.concatenate([u[:, :, h].reshape(-1, DH) for u in inputs])
            xs = np.concatenate([xs, np.ones((xs.shape[0], 1))], 1)
            ds = np.concatenate([d[:, :, h].reshape(-1, DH) for d in (d1, d2)])
            np.testing.assert_allclose(s.a[h], xs.T @ xs / n, rtol=2e-6, atol=1e-9)
            np.testing.assert_allclose(s.g[h], ds.T @ ds / (2 * n * T), rtol=2e-6, atol=1e-9)
    # The Linen capture applies the same rule.
    twin = HeadsTwice(jnp.float32)
    params = {"e": {"kernel": twin.e.kernel[...], "bias": twin.e.bias[...]}}
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    _, _, ls = lof.linen_kfac_value_and_grad(LinenHeadsTwice(), "mse")(params, x32, y32)
    _, _, ns = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(twin, x32, y32)
    _assert_trees_close(ls, ns, rtol=1e-5)
