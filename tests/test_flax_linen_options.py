"""Linen parity of the K-FAC capture's options (issue 16): ``nn.BatchNorm`` with its
``batch_stats``, ``diagonal``, ``sequence_statistics``, ``statistics_batch_size``, and models
applied with PRNG streams, call arguments or another method.

Twins compare the Linen capture with the NNX capture on the same weights; references are
float64 per-example gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import block_types  # noqa: E402
from tests.test_flax_linen_layers import (  # noqa: E402
    LinenMix,
    NnxMix,
    _assert_trees_close,
    _ids,
    _perturbed,
)

F64 = jnp.float64


class LinenBN(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dense; ``train`` picks batch or running statistics."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Dense(5, param_dtype=self.dtype, name="inp")(x)
        h = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, param_dtype=self.dtype, name="bn"
        )(h)
        return nn.Dense(3, param_dtype=self.dtype, name="out")(jnp.tanh(h))


class NnxBN(nnx.Module):
    def __init__(self, params, batch_stats):
        rngs = nnx.Rngs(0)
        self.inp = nnx.Linear(4, 5, rngs=rngs)
        self.bn = nnx.BatchNorm(5, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)
        for name in ("inp", "out"):
            for leaf in ("kernel", "bias"):
                getattr(getattr(self, name), leaf)[...] = params[name][leaf]
        self.bn.scale[...] = params["bn"]["scale"]
        self.bn.bias[...] = params["bn"]["bias"]
        self.bn.mean[...] = batch_stats["bn"]["mean"]
        self.bn.var[...] = batch_stats["bn"]["var"]

    def __call__(self, x):
        return self.out(jnp.tanh(self.bn(self.inp(x))))


def _bn_setup(dtype=jnp.float32):
    model = LinenBN(dtype)
    x = jax.random.normal(jax.random.key(0), (8, 4), dtype)
    variables = model.init(jax.random.key(1), x, train=False)
    params = _perturbed(variables["params"], jax.random.key(2))
    stats = {"bn": {"mean": 0.1 * jnp.ones(5, dtype), "var": 2.0 * jnp.ones(5, dtype)}}
    y = jax.random.normal(jax.random.key(3), (8, 3), dtype)
    return model, x, y, params, stats


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gives_the_nnx_twins_statistics_and_running_averages(train):
    model, x, y, params, batch_stats = _bn_setup()
    twin = NnxBN(params, batch_stats)
    if not train:
        twin.eval()
    capture = lof.linen_kfac_value_and_grad(model, "mse", mutable=["batch_stats"])
    lv, lg, ls, updated = jax.jit(capture, static_argnames="train")(
        params, x, y, variables={"batch_stats": batch_stats}, train=train
    )
    nv, ng, ns = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(twin, x, y)
    np.testing.assert_allclose(lv, nv, rtol=1e-6)
    _assert_trees_close(lg, nnx.to_pure_dict(ng), rtol=1e-5, atol=1e-6)
    _assert_trees_close(ls, ns, rtol=1e-4, atol=1e-7)
    assert block_types(ls)["bn/scale"] == block_types(ls)["bn/bias"] == "KfacDiagonal"
    # The updated running averages come back, as the capture wrote the twin's.
    np.testing.assert_allclose(updated["batch_stats"]["bn"]["mean"], twin.bn.mean[...], rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["bn"]["var"], twin.bn.var[...], rtol=1e-5)
    moved = not np.allclose(updated["batch_stats"]["bn"]["mean"], batch_stats["bn"]["mean"])
    assert moved == train


def test_batchnorm_diagonal_fisher_matches_float64_per_example_gradients():
    """Train mode: ``F = mean_i (∂ℓ_i/∂θ)²`` for the scale and shift, with the batch statistics
    held as the forward pass computed them (they enter before the scale and shift)."""
    with jax.enable_x64(True):
        model, x, y, params, batch_stats = _bn_setup(F64)
        capture = lof.linen_kfac_value_and_grad(model, "mse", mutable=["batch_stats"])
        _, _, stats, _ = jax.jit(capture)(params, x, y, variables={"batch_stats": batch_stats})

        def losses(p):  # per-example 0.5 ||f(x)_i - y_i||^2 with this batch's statistics
            out, _ = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            return 0.5 * jnp.sum((out - y) ** 2, axis=1)

        jac = jax.jacrev(losses)(params)["bn"]
        for leaf in ("scale", "bias"):
            want = np.mean(np.asarray(jac[leaf]) ** 2, axis=0)
            # Statistics are stored in float32 (as the NNX capture stores them).
            np.testing.assert_allclose(stats["bn"][leaf].fisher, want, rtol=2e-6, atol=1e-12)


def test_diagonal_layers_get_none_and_no_factors():
    model = LinenMix()
    ids, targets = _ids(jax.random.key(0))
    params = _perturbed(model.init(jax.random.key(1), ids)["params"], jax.random.key(2))
    full = lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy")(params, ids, targets)[2]
    by_path = lof.linen_kfac_value_and_grad(
        model, "softmax_cross_entropy", diagonal=["heads", "ln"]
    )
    by_rule = lof.linen_kfac_value_and_grad(
        model,
        "softmax_cross_entropy",
        diagonal=lambda path, m: isinstance(m, nn.Einsum) or path == "ln",
    )
    for capture in (by_path, by_rule):
        _, grads, stats = jax.jit(capture)(params, ids, targets)
        types = block_types(stats)
        assert types["heads/kernel"] == types["heads/bias"] == "NoneType"
        assert types["ln/scale"] == types["ln/bias"] == "NoneType"
        kept = {k: v for k, v in types.items() if not k.startswith(("heads/", "ln/"))}
        assert "NoneType" not in kept.values()
        # The other layers' statistics are unchanged.
        _assert_trees_close(stats["embed"], full["embed"], rtol=1e-6)
        _assert_trees_close(stats["attn"], full["attn"], rtol=1e-6)
    dims = lof.linen_kfac_dimension_numbers(model, params, ids, diagonal=["heads", "ln"])
    spec = dims(params)
    assert spec["heads"] == {"kernel": None, "bias": None} and spec["ln"]["scale"] is None
    tx = lo.kfac(0.1, dimension_numbers=dims)
    state = tx.init(params)

    # No factors allocated for them (the full layout holds the heads' (H, DH+1, DH+1) pair).
    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    assert nbytes(state[0].factors["heads"]) == 0
    assert nbytes(lo.kfac(0.1).init(params)[0].factors["heads"]) > 0
    updates, state = jax.jit(tx.update)(grads, state, params, kfac_stats=stats)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match=r"diagonal names 'head'.*captured layers are"):
        lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy", diagonal=["head"])(
            params, ids, targets
        )
    with pytest.raises(ValueError, match="diagonal must be"):
        lof.linen_kfac_value_and_grad(model, diagonal="heads")


@pytest.mark.parametrize("option", ["reduce", "sub_batch"])
def test_sequence_and_sub_batch_options_give_the_nnx_twins_statistics(option):
    model = LinenMix()
    ids, targets = _ids(jax.random.key(0), n=6)
    params = _perturbed(model.init(jax.random.key(1), ids)["params"], jax.random.key(2))
    twin = NnxMix(params)
    kw = {"sequence_statistics": "reduce"} if option == "reduce" else {"statistics_batch_size": 4}
    lv, lg, ls = jax.jit(lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy", **kw))(
        params, ids, targets
    )
    nv, ng, ns = nnx.jit(lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy", **kw))(
        twin, ids, targets
    )
    np.testing.assert_allclose(lv, nv, rtol=1e-6)
    _assert_trees_close(lg, nnx.to_pure_dict(ng), rtol=1e-4, atol=1e-6)
    _assert_trees_close(ls, ns, rtol=1e-4, atol=1e-6)
    default = lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy")(params, ids, targets)
    # The option changes the statistics (not the loss or gradients).
    a_got, a_default = ls["attn"]["query"]["kernel"].g, default[2]["attn"]["query"]["kernel"].g
    assert not np.allclose(a_got, a_default, rtol=1e-3)
    if option == "sub_batch":  # the statistics of the first 4 examples alone
        sub = lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy")(
            params, ids[:4], targets[:4]
        )[2]
        _assert_trees_close(ls["embed"], sub["embed"], rtol=1e-4, atol=1e-7)
        with pytest.raises(ValueError, match=r"statistics_batch_size=7 is larger than the batch"):
            lof.linen_kfac_value_and_grad(model, "softmax_cross_entropy", statistics_batch_size=7)(
                params, ids, targets
            )


class DropoutNet(nn.Module):
    """Dense -> Dropout -> Dense with a ``train`` flag and a second method."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dropout(0.5, deterministic=not train)(nn.Dense(6, name="a")(x))
        return nn.Dense(2, name="b")(jnp.tanh(h))

    def doubled(self, x, train: bool = False):
        return 2.0 * self(x, train=train)


@pytest.mark.parametrize("method", [None, "doubled"])
def test_rngs_call_arguments_and_method_reach_every_pass(method):
    model = DropoutNet()
    x = jax.random.normal(jax.random.key(0), (5, 3))
    y = jax.random.normal(jax.random.key(1), (5, 2))
    params = model.init(jax.random.key(2), x)["params"]
    rngs = {"dropout": jax.random.key(3)}

    def loss(p):
        out = model.apply({"params": p}, x, train=True, rngs=rngs, method=method)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    capture = lof.linen_kfac_value_and_grad(model, "mse", method=method)
    value, grads, stats = jax.jit(capture, static_argnames="train")(
        params, x, y, rngs=rngs, train=True
    )
    np.testing.assert_allclose(value, loss(params), rtol=1e-6)
    _assert_trees_close(grads, jax.grad(loss)(params), rtol=1e-5, atol=1e-7)
    # Layer b's input factor is that of the dropped-out features of this very stream.
    _, inter = model.apply(
        {"params": params}, x, train=True, rngs=rngs, method=method, capture_intermediates=True
    )
    feats = jnp.tanh(inter["intermediates"]["Dropout_0"]["__call__"][0])
    feats = jnp.concatenate([feats, jnp.ones((5, 1))], axis=1)
    a = stats["b"]["kernel"].a
    np.testing.assert_allclose(a, feats.T @ feats / 5, rtol=1e-5, atol=1e-7)
    assert float(jnp.mean(feats[:, :-1] == 0.0)) > 0.2  # units were dropped
    # Different streams, different masks, different statistics.
    other = jax.jit(capture, static_argnames="train")(
        params, x, y, rngs={"dropout": jax.random.key(4)}, train=True
    )[2]
    assert not np.allclose(other["b"]["kernel"].a, a)


def test_bad_option_values_are_named():
    model = LinenMix()
    with pytest.raises(ValueError, match="sequence_statistics must be one of"):
        lof.linen_kfac_value_and_grad(model, sequence_statistics="mean")
    with pytest.raises((TypeError, ValueError), match="statistics_batch_size"):
        lof.linen_kfac_value_and_grad(model, statistics_batch_size=0)
    with pytest.raises(TypeError, match="mutable must be a sequence"):
        lof.linen_kfac_value_and_grad(model, mutable="batch_stats")
    with pytest.raises(ValueError, match="capture's own collections"):
        lof.linen_kfac_value_and_grad(model, mutable=["intermediates"])
