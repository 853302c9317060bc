"""K-FAC statistics capture for flax.linen models: references, NNX twins, nn.scan."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402


class LinenNet(nn.Module):
    """Conv -> Dense -> DenseGeneral over two axes, named like its NNX twin's attributes."""

    @nn.compact
    def __call__(self, x):  # x: (n, 4, 4, 2)
        h = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID", name="conv")(x))
        h = jnp.tanh(nn.Dense(6, name="dense")(h.reshape(h.shape[0], -1)))
        out = nn.DenseGeneral((2, 2), axis=(-2, -1), name="general")(h.reshape(-1, 2, 3))
        return out.reshape(x.shape[0], -1)


class NnxNet(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(2, 3, (2, 2), padding="VALID", rngs=rngs)
        self.dense = nnx.Linear(27, 6, rngs=rngs)
        self.general = nnx.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), rngs=rngs)
        for name in ("conv", "dense", "general"):
            for leaf in ("kernel", "bias"):
                getattr(getattr(self, name), leaf)[...] = params[name][leaf]

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        h = jnp.tanh(self.dense(h.reshape(h.shape[0], -1)))
        return self.general(h.reshape(-1, 2, 3)).reshape(x.shape[0], -1)


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    paths_g = jax.tree_util.tree_flatten_with_path(got)[0]
    paths_w = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [jax.tree_util.keystr(p) for p, _ in paths_g] == [
        jax.tree_util.keystr(p) for p, _ in paths_w
    ]
    for (path, a), (_, b) in zip(paths_g, paths_w):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "loss, mode",
    [
        ("mse", "empirical"),
        ("softmax_cross_entropy", "fisher"),
        pytest.param("sigmoid_cross_entropy", "gauss_newton", marks=pytest.mark.slow),
    ],
)
def test_linen_and_nnx_twins_give_equal_statistics_and_kfac_updates(loss, mode):
    model = LinenNet()
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 2))
    params = model.init(jax.random.key(1), x)["params"]
    twin = NnxNet(params)
    np.testing.assert_allclose(model.apply({"params": params}, x), twin(x), rtol=1e-5, atol=1e-6)
    if loss == "softmax_cross_entropy":
        y = jax.random.randint(jax.random.key(2), (6,), 0, 4)
    else:
        y = jax.random.uniform(jax.random.key(2), (6, 4))
    key = jax.random.key(3) if mode == "fisher" else None
    capture = jax.jit(lof.linen_kfac_value_and_grad(model, loss, statistics=mode))
    lv, lg, ls = capture(params, x, y, key)
    nv, ng, ns = lof.kfac_value_and_grad(lambda m, x: m(x), loss, statistics=mode)(twin, x, y, key)
    np.testing.assert_allclose(lv, nv, rtol=1e-6)
    ng = nnx.as_pure(ng)
    _assert_trees_close(lg, ng)
    _assert_trees_close(ls, ns, rtol=1e-4)
    for name in ("conv", "dense", "general"):
        assert ls[name]["bias"] == ns[name]["bias"] == lo.FoldedBias(f"{name}/kernel")
    # Equal kfac updates, each with its capture's layouts (DenseGeneral: two output axes).
    tx_l = lo.kfac(0.5, dimension_numbers=lof.linen_kfac_dimension_numbers(model, params, x))
    tx_n = lo.kfac(0.5, dimension_numbers=lof.kfac_dimension_numbers(twin))
    pn = nnx.as_pure(nnx.state(twin, nnx.Param))
    ul, _ = jax.jit(tx_l.update)(lg, tx_l.init(params), params, kfac_stats=ls)
    un, _ = jax.jit(tx_n.update)(ng, tx_n.init(pn), pn, kfac_stats=ns)
    _assert_trees_close(ul, un, rtol=2e-3)


def test_dense_statistics_and_kfac_step_match_float64_references():
    """Two Dense layers: empirical and Gauss-Newton factors by hand in float64, then
    kfac's step on a single Dense layer with the squared error, where A ⊗ I is the
    exact Gauss-Newton matrix."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="l2")(jnp.tanh(nn.Dense(5, name="l1")(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    params = model.init(jax.random.key(2), x)["params"]
    _, _, emp = lof.linen_kfac_value_and_grad(model, "mse")(params, x, y)
    _, _, gn = lof.linen_kfac_value_and_grad(model, "mse", statistics="gauss_newton")(params, x, y)
    w1, b1, w2, b2 = (
        np.asarray(params[a][b], np.float64) for a in ("l1", "l2") for b in ("kernel", "bias")
    )
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(xn @ w1 + b1)
    d2 = h @ w2 + b2 - yn  # per-example dL/dz2 of 0.5 ||z2 - y||^2
    d1 = (d2 @ w2.T) * (1 - h**2)
    xh = np.concatenate([xn, np.ones((8, 1))], 1)
    hh = np.concatenate([h, np.ones((8, 1))], 1)
    np.testing.assert_allclose(emp["l1"]["kernel"].a, xh.T @ xh / 8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emp["l2"]["kernel"].a, hh.T @ hh / 8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emp["l1"]["kernel"].g, d1.T @ d1 / 8, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(emp["l2"]["kernel"].g, d2.T @ d2 / 8, rtol=1e-4, atol=1e-6)
    j1 = (1 - h**2)[:, :, None] * w2[None]  # d z2 / d z1 per example, (8, 5, 2)
    np.testing.assert_allclose(
        gn["l1"]["kernel"].g, np.einsum("iak,ibk->ab", j1, j1) / 8, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(gn["l2"]["kernel"].g, np.eye(2), rtol=1e-6, atol=1e-7)

    one = nn.Dense(2)
    p1 = one.init(jax.random.key(3), x)["params"]
    _, g1, s1 = lof.linen_kfac_value_and_grad(one, "mse", statistics="gauss_newton")(p1, x, y)
    tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.0, damping=1e-3, damping_mode="absolute")
    u: Any = jax.jit(tx.update)(g1, tx.init(p1), p1, kfac_stats=s1)[0]
    w, b = np.asarray(p1["kernel"], np.float64), np.asarray(p1["bias"], np.float64)
    grad = xh.T @ (xn @ w + b - yn) / 8  # [dW; db], (4, 2)
    # Exact Gauss-Newton kron(A, I) with the factors damped by 1e-3 each.
    a = xh.T @ xh / 8
    step = -np.linalg.solve(a + 1e-3 * np.eye(4), grad) / (1 + 1e-3)
    np.testing.assert_allclose(u["kernel"], step[:3], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(u["bias"], step[3], rtol=1e-3, atol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(4, name="dense")(x)), None


_SCAN_AXES = {"params": 0, "perturbations": 0, "intermediates": 0}


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="embed")(x)
        blocks = nn.scan(Block, variable_axes=_SCAN_AXES, split_rngs={"params": True}, length=3)
        h, _ = blocks(name="blocks")(h, None)
        return nn.Dense(2, name="head")(h)


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="embed")(x)
        for i in range(3):
            h = jnp.tanh(nn.Dense(4, name=f"b{i}")(h))
        return nn.Dense(2, name="head")(h)


def _unroll(params):
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(3):
        out[f"b{i}"] = jax.tree.map(lambda v: v[i], params["blocks"]["dense"])
    return out


@pytest.mark.parametrize(
    "mode", ["empirical", pytest.param("gauss_newton", marks=pytest.mark.slow)]
)
def test_scanned_blocks_give_their_unrolled_twins_statistics_and_updates(mode):
    scanned = Scanned()
    x = jax.random.normal(jax.random.key(0), (7, 2, 3))  # a sequence axis: T = 2 rows each
    y = jax.random.normal(jax.random.key(1), (7, 2, 2))
    params = scanned.init(jax.random.key(2), x)["params"]
    assert params["blocks"]["dense"]["kernel"].shape == (3, 4, 4)
    flat = _unroll(params)
    np.testing.assert_allclose(
        scanned.apply({"params": params}, x),
        Unrolled().apply({"params": flat}, x),
        rtol=1e-5,
        atol=1e-6,
    )
    capture = jax.jit(lof.linen_kfac_value_and_grad(scanned, "mse", statistics=mode))
    _, grads, stats = capture(params, x, y)
    _, fgrads, fstats = lof.linen_kfac_value_and_grad(Unrolled(), "mse", statistics=mode)(
        flat, x, y
    )
    assert stats["blocks"]["dense"]["kernel"].a.shape == (3, 5, 5)
    assert stats["blocks"]["dense"]["bias"] == lo.FoldedBias("blocks/dense/kernel")
    _assert_trees_close(_unroll(grads), fgrads)
    _assert_trees_close(_unroll(stats), fstats, rtol=1e-4)
    dims = lof.linen_kfac_dimension_numbers(scanned, params, x)
    spec = dims(params)["blocks"]["dense"]
    assert spec["kernel"] == lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))
    tx_s, tx_u = lo.kfac(0.5, dimension_numbers=dims), lo.kfac(0.5)
    us, _ = jax.jit(tx_s.update)(grads, tx_s.init(params), params, kfac_stats=stats)
    uu, _ = jax.jit(tx_u.update)(fgrads, tx_u.init(flat), flat, kfac_stats=fstats)
    _assert_trees_close(_unroll(us), uu, rtol=2e-3)
    # Separate bias blocks carry the layer axis too.
    _, _, sep = lof.linen_kfac_value_and_grad(scanned, "mse", statistics=mode, fold_biases=False)(
        params, x, y
    )
    np.testing.assert_array_equal(sep["blocks"]["dense"]["bias"].a, np.full((3, 1, 1), 2.0))
    sdims = lof.linen_kfac_dimension_numbers(scanned, params, x, fold_biases=False)
    assert sdims(params)["blocks"]["dense"]["bias"] == lo.DimensionNumbers(
        ((), (1,)), batch_axes=(0,)
    )


def test_conv_padding_forms_match_nnx():
    """Linen's padding forms (incl. CIRCULAR and strides) give NNX's conv patches."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 2))
    for padding, strides in (("SAME", 1), ("CIRCULAR", 1), (((1, 0), (0, 2)), 2)):
        lin = nn.Conv(2, (3, 2), strides=strides, padding=padding)
        params = lin.init(jax.random.key(1), x)["params"]
        twin = nnx.Conv(2, 2, (3, 2), strides=strides, padding=padding, rngs=nnx.Rngs(0))
        twin.kernel[...] = params["kernel"]
        twin.bias[...] = params["bias"]
        out = lin.apply({"params": params}, x)
        y = jnp.zeros(out.shape)
        np.testing.assert_allclose(out, twin(x), rtol=1e-5, atol=1e-6)
        _, _, ls = lof.linen_kfac_value_and_grad(lin, "mse")(params, x, y)
        _, _, ns = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(twin, x, y)
        _assert_trees_close(ls, ns, rtol=1e-4)


class NoAxes(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return blocks(name="blocks")(x, None)[0]


class Broadcast(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            Block,
            variable_axes={"perturbations": 0, "intermediates": 0},
            variable_broadcast="params",
            split_rngs={"params": False},
            length=2,
        )
        return blocks(name="blocks")(x, None)[0]


class TwoBatchAxes(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (2,), name="conv")(x.reshape(2, 1, 2, 2))


class NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones, (4,))[None]


@pytest.mark.parametrize(
    "model, match",
    [
        (NoAxes(), "layer blocks/dense: .* needs 'perturbations' and 'intermediates'"),
        (Broadcast(), "layer blocks/dense: .* reused across slices"),
        (TwoBatchAxes(), r"layer conv: .* one batch axis \(n, \*spatial, c_in\); got shape "),
        (NoLayers(), "NoLayers has no nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed"),
    ],
)
def test_uncapturable_linen_models_are_named(model, match):
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    y = jnp.zeros_like(model.apply({"params": params}, x))
    with pytest.raises(ValueError, match=match):
        lof.linen_kfac_value_and_grad(model, "mse")(params, x, y)
    with pytest.raises(ValueError, match=match):
        lof.linen_kfac_dimension_numbers(model, params, x)


def test_bad_arguments():
    model = nn.Dense(2)
    x = jnp.ones((3, 2))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="needs a PRNG key"):
        lof.linen_kfac_value_and_grad(model, "mse", statistics="fisher")(params, x, x)
    with pytest.raises(ValueError, match="Unknown loss 'l1'"):
        lof.linen_kfac_value_and_grad(model, "l1")  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="fold_biases"):
        lof.linen_kfac_value_and_grad(model, fold_biases=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="fold_biases"):
        lof.linen_kfac_dimension_numbers(model, params, x, fold_biases=None)  # pyright: ignore[reportArgumentType]


class RematScanned(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        blocks = nn.scan(block, variable_axes=_SCAN_AXES, split_rngs={"params": True}, length=3)
        return blocks(name="blocks")(x, None)[0]


class Ensemble(nn.Module):
    """Three Dense heads on the same input, stacked by nn.vmap (axis 0 of the kernels)."""

    @nn.compact
    def __call__(self, x):
        heads = nn.vmap(
            nn.Dense,
            variable_axes=_SCAN_AXES,
            split_rngs={"params": True},
            in_axes=None,
            out_axes=1,
            axis_size=3,
        )
        return heads(2, name="heads")(x).reshape(x.shape[0], -1)


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([nn.Dense(2, name=f"h{i}")(x) for i in range(3)], -1)


def test_remat_scan_and_vmap_stacks_are_captured_per_slice():
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y = jax.random.normal(jax.random.key(1), (5, 4))
    params = RematScanned(False).init(jax.random.key(2), x)["params"]
    key = jax.random.key(3)
    plain = lof.linen_kfac_value_and_grad(RematScanned(False), "mse", statistics="fisher")
    remat = lof.linen_kfac_value_and_grad(RematScanned(True), "mse", statistics="fisher")
    _assert_trees_close(remat(params, x, y, key), plain(params, x, y, key), rtol=1e-6)
    # nn.vmap'd heads: one pair of factors per head, those of separate Dense layers.
    ens = Ensemble()
    pe = ens.init(jax.random.key(4), x)["params"]
    ph = {f"h{i}": jax.tree.map(lambda v: v[i], pe["heads"]) for i in range(3)}
    ye = jax.random.normal(jax.random.key(5), (5, 6))
    np.testing.assert_allclose(
        ens.apply({"params": pe}, x), Heads().apply({"params": ph}, x), rtol=1e-6
    )
    _, _, se = lof.linen_kfac_value_and_grad(ens, "mse")(pe, x, ye)
    _, _, sh = lof.linen_kfac_value_and_grad(Heads(), "mse")(ph, x, ye)
    for i in range(3):
        for f in ("a", "g"):
            np.testing.assert_allclose(
                getattr(se["heads"]["kernel"], f)[i],
                getattr(sh[f"h{i}"]["kernel"], f),
                rtol=1e-5,
                atol=1e-6,
            )
    spec = lof.linen_kfac_dimension_numbers(ens, pe, x)(pe)["heads"]["kernel"]
    assert spec == lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))


def test_scanned_linen_model_trains_with_kfac_under_jit():
    """Capture, kfac and optax.apply_updates in one jitted step: the loss falls."""
    import optax

    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (32, 2, 3))
    y = jnp.tanh(x[..., :2] @ jnp.array([[1.0, -2.0], [0.5, 1.0]]))
    params = model.init(jax.random.key(1), x)["params"]
    tx = lo.kfac(0.3, dimension_numbers=lof.linen_kfac_dimension_numbers(model, params, x))
    capture = lof.linen_kfac_value_and_grad(model, "mse", statistics="fisher")

    @jax.jit
    def step(params, state, key):
        loss, grads, stats = capture(params, x, y, key)
        updates, state = tx.update(grads, state, params, kfac_stats=stats)
        return optax.apply_updates(params, updates), state, loss

    state, losses = tx.init(params), []
    for i in range(15):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses


class OwnPerturbation(nn.Module):
    """A model that perturbs an intermediate itself (Flax's gradient-debugging idiom)."""

    @nn.compact
    def __call__(self, x):
        h = self.perturb("hidden", jnp.tanh(nn.Dense(3, name="l1")(x)))
        return nn.Dense(2, name="l2")(h)


def test_a_models_own_perturbations_stay_zero():
    model = OwnPerturbation()
    x = jax.random.normal(jax.random.key(0), (4, 3))
    y = jax.random.normal(jax.random.key(1), (4, 2))
    params = model.init(jax.random.key(2), x)["params"]
    value, grads, stats = lof.linen_kfac_value_and_grad(model, "mse")(params, x, y)
    want_value, want_grads = jax.value_and_grad(
        lambda p: lof.mse(model.apply({"params": p}, x), y)
    )(params)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    _assert_trees_close(grads, want_grads)
    assert set(stats) == {"l1", "l2"}


def test_frozen_dict_params_give_the_plain_dict_results():
    from flax.core import freeze

    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (5, 2, 3))
    y = jax.random.normal(jax.random.key(1), (5, 2, 2))
    params = model.init(jax.random.key(2), x)["params"]
    frozen = freeze(params)
    capture = lof.linen_kfac_value_and_grad(model, "mse")
    _, grads, stats = capture(params, x, y)
    _, fgrads, fstats = capture(frozen, x, y)
    _assert_trees_close(fstats, stats, rtol=0, atol=0)
    dims = lof.linen_kfac_dimension_numbers(model, frozen, x)
    assert dims(frozen)["blocks"]["dense"]["kernel"] == dims(params)["blocks"]["dense"]["kernel"]
    tx = lo.kfac(0.5, dimension_numbers=dims)
    u = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)[0]
    fu = jax.jit(tx.update)(fgrads, tx.init(frozen), frozen, kfac_stats=fstats)[0]
    _assert_trees_close(_to_plain(fu), _to_plain(u), rtol=0, atol=0)


def _to_plain(tree):
    return {k: _to_plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree
