"""K-FAC statistics capture for Flax NNX models, and every alias under nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402
from tests._helpers import optimizer_params  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs, d_in=4, d_h=8, d_out=2):
        self.l1 = nnx.Linear(d_in, d_h, rngs=rngs)
        self.l2 = nnx.Linear(d_h, d_out, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(2, 2), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(3 * 3 * 3, 1, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.head(h.reshape(h.shape[0], -1))


def _data(n=32, d_in=4, d_out=2):
    x = jax.random.normal(jax.random.key(0), (n, d_in))
    y = jax.random.normal(jax.random.key(1), (n, d_out))
    return x, y


def test_empirical_stats_and_grads_match_a_hand_written_pass():
    model = MLP(nnx.Rngs(0))
    x, y = _data()
    value, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    want_value, want_grads = nnx.value_and_grad(lambda m: lof.mse(m(x), y))(model)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # By hand: per-example output gradients delta = n dL/dz of each layer.
    w1, b1 = model.l1.kernel[...], model.l1.bias[...]
    w2, b2 = model.l2.kernel[...], model.l2.bias[...]
    n = x.shape[0]
    z1 = x @ w1 + b1[None, :]
    h = jnp.tanh(z1)
    z2 = h @ w2 + b2[None, :]
    d2 = n * (z2 - y) / n  # dL/dz2 for the mean of 0.5 * ||z2 - y||^2
    d1 = (d2 @ w2.T) * (1 - h**2)
    np.testing.assert_allclose(stats["l1"]["kernel"].a, x.T @ x / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["l1"]["kernel"].g, d1.T @ d1 / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["l2"]["kernel"].a, h.T @ h / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["l2"]["kernel"].g, d2.T @ d2 / n, rtol=1e-4, atol=1e-6)
    # Biases: a unit input factor and the layer's output factor.
    np.testing.assert_array_equal(stats["l1"]["bias"].a, np.ones((1, 1)))
    np.testing.assert_allclose(stats["l1"]["bias"].g, d1.T @ d1 / n, rtol=1e-4, atol=1e-6)


def test_conv_input_factor_is_over_kernel_ordered_patches():
    model = ConvNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (5, 4, 4, 2))
    y = jnp.zeros((5, 1))
    _, _, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    xn = np.asarray(x)
    patches = np.stack(
        [xn[:, i : i + 2, j : j + 2, :].reshape(5, -1) for i in range(3) for j in range(3)], axis=1
    )  # (n, positions, kh*kw*c_in)
    # The patch ordering is the kernel's: patches @ kernel.reshape(-1, out) is the conv.
    k = np.asarray(model.conv.kernel[...]).reshape(-1, 3)
    conv = np.asarray(model.conv(x)).reshape(5, 9, 3) - np.asarray(model.conv.bias[...])
    np.testing.assert_allclose(patches @ k, conv, rtol=1e-4, atol=1e-5)
    p2 = patches.reshape(-1, 8)
    np.testing.assert_allclose(stats["conv"]["kernel"].a, p2.T @ p2 / 5, rtol=1e-4, atol=1e-5)
    assert stats["conv"]["kernel"].g.shape == (3, 3)


def test_fisher_mse_output_factor_of_the_last_layer_is_identity():
    model = MLP(nnx.Rngs(0), d_out=3)
    x, y = _data(n=4000, d_out=3)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="fisher")
    _, _, stats = f(model, x, y, key=jax.random.key(5))
    np.testing.assert_allclose(stats["l2"]["kernel"].g, np.eye(3), atol=0.08)


def test_fisher_softmax_output_factor_matches_its_expectation():
    model = MLP(nnx.Rngs(1), d_out=4)
    x, _ = _data(n=6000, d_out=4)
    labels = jnp.zeros(6000, jnp.int32)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy", statistics="fisher")
    _, _, stats = f(model, x, labels, key=jax.random.key(6))
    p = jax.nn.softmax(model(x), axis=-1)
    expected = jnp.mean(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p), axis=0)
    np.testing.assert_allclose(stats["l2"]["kernel"].g, expected, atol=0.02)


class General(nnx.Module):
    """LinearGeneral over two input axes into two output axes, then an Einsum whose
    kernel is (out, in): layouts that differ from nnx.Linear's (in, out)."""

    def __init__(self, rngs):
        self.lg = nnx.LinearGeneral((2, 3), (4, 2), axis=(-2, -1), rngs=rngs)
        self.ein = nnx.Einsum("btd,kd->btk", (3, 8), (3,), rngs=rngs)

    def __call__(self, x):  # x: (b, t, 2, 3)
        h = jnp.tanh(self.lg(x)).reshape(x.shape[0], x.shape[1], 8)
        return self.ein(h).reshape(x.shape[0], -1)


class Flat(nnx.Module):
    """The same function with nnx.Linear layers (kernels reshaped/transposed)."""

    def __init__(self, g: General):
        rngs = nnx.Rngs(0)
        self.lg = nnx.Linear(6, 8, rngs=rngs)
        self.ein = nnx.Linear(8, 3, rngs=rngs)
        self.lg.kernel[...] = g.lg.kernel[...].reshape(6, 8)
        self.lg.bias[...] = g.lg.bias[...].reshape(8)
        self.ein.kernel[...] = g.ein.kernel[...].T
        self.ein.bias[...] = g.ein.bias[...]

    def __call__(self, x):
        h = jnp.tanh(self.lg(x.reshape(x.shape[0], x.shape[1], 6)))
        return self.ein(h).reshape(x.shape[0], -1)


def test_linear_general_and_einsum_are_captured_like_their_dense_equivalents():
    general = General(nnx.Rngs(3))
    flat = Flat(general)
    x = jax.random.normal(jax.random.key(0), (16, 5, 2, 3))
    y = jax.random.normal(jax.random.key(1), (16, 15))
    np.testing.assert_allclose(general(x), flat(x), rtol=1e-5, atol=1e-6)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    _, gg, sg = f(general, x, y)
    _, gf, sf = f(flat, x, y)
    for layer in ("lg", "ein"):
        for part in ("kernel", "bias"):
            for factor in ("a", "g"):
                np.testing.assert_allclose(
                    getattr(sg[layer][part], factor),
                    getattr(sf[layer][part], factor),
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{layer}/{part}/{factor}",
                )
    # kfac with the capture's layouts gives the dense model's update, in each layout.
    dims = lof.kfac_dimension_numbers(general)
    tx_g = lo.kfac(1.0, dimension_numbers=dims)
    tx_f = lo.kfac(1.0)
    pg, pf = nnx.as_pure(nnx.state(general, nnx.Param)), nnx.as_pure(nnx.state(flat, nnx.Param))
    ug, _ = tx_g.update(nnx.as_pure(gg), tx_g.init(pg), pg, kfac_stats=sg)
    uf, _ = tx_f.update(nnx.as_pure(gf), tx_f.init(pf), pf, kfac_stats=sf)
    np.testing.assert_allclose(
        ug["lg"]["kernel"].reshape(6, 8), uf["lg"]["kernel"], rtol=2e-3, atol=1e-6
    )
    np.testing.assert_allclose(ug["lg"]["bias"].reshape(8), uf["lg"]["bias"], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(ug["ein"]["kernel"].T, uf["ein"]["kernel"], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize(
    "layer, match",
    [
        (
            lambda rngs: nnx.Einsum("bhd,hdk->bhk", (2, 3, 4), rngs=rngs),
            r"layer proj: einsum 'bhd,hdk->bhk' cannot be captured: kernel axes \['h'\]",
        ),
        (
            lambda rngs: nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=rngs),
            r"layer proj: LinearGeneral with batch_axis",
        ),
    ],
)
def test_uncapturable_layer_is_named(layer, match):
    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.proj = layer(rngs)

        def __call__(self, x):
            return x

    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    with pytest.raises(ValueError, match=match):
        f(Bad(nnx.Rngs(0)), jnp.zeros((4, 2, 3)), jnp.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=match):
        lof.kfac_dimension_numbers(Bad(nnx.Rngs(0)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown loss 'l1'"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "l1")
    with pytest.raises(ValueError, match="statistics='fisher' needs loss="):
        lof.kfac_value_and_grad(lambda m, x: m(x), lambda o, t: jnp.mean(o), statistics="fisher")
    with pytest.raises(ValueError, match="Unknown statistics 'exact'"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="exact")
    with pytest.raises(ValueError, match="'gauss_newton' is implemented for loss='mse' only"):
        lof.kfac_value_and_grad(
            lambda m, x: m(x), "softmax_cross_entropy", statistics="gauss_newton"
        )
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="fisher")
    x, y = _data()
    with pytest.raises(ValueError, match="needs a PRNG key"):
        f(MLP(nnx.Rngs(0)), x, y)


@pytest.mark.parametrize("name", ["shampoo", "soap", "kfac"])
def test_every_alias_trains_under_nnx_optimizer_and_jit(name):
    # nnx.Optimizer round-trips the optimizer state through nnx.State, which turns
    # tuples into int-keyed mappings: the per-axis factors must survive that.
    model = MLP(nnx.Rngs(0))
    x, y = _data(n=64)
    tx = {
        "shampoo": lo.shampoo(3e-2, precondition_frequency=2),
        "soap": lo.soap(3e-2, precondition_frequency=2),
        "kfac": lo.kfac(0.3, precondition_frequency=2),
    }[name]
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")

    @nnx.jit
    def step(model, opt, x, y):
        value, grads, stats = f(model, x, y)
        opt.update(model, grads, kfac_stats=stats)
        return value

    losses = [float(step(model, opt, x, y)) for _ in range(25)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name,factory,kwargs", optimizer_params())
def test_nnx_optimizer_state_round_trips_and_compiles_once(name, factory, kwargs):
    # nnx.Optimizer keeps its state as nnx.Variables and writes each update back with
    # nnx.update: a per-leaf tuple of factors inside a Variable used to come back as an
    # nnx.State, so the second step saw a new state structure and compiled again.
    model = MLP(nnx.Rngs(0))
    x, y = _data(n=16)
    opt = nnx.Optimizer(model, factory(**kwargs), wrt=nnx.Param)
    before = jax.tree.structure(nnx.as_pure(opt.opt_state))
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    traces = []

    @nnx.jit
    def step(model, opt, x, y):
        traces.append(None)
        value, grads, stats = capture(model, x, y)
        opt.update(model, grads, kfac_stats=stats)
        return value

    for _ in range(3):
        step(model, opt, x, y)
    assert len(traces) == 1
    assert jax.tree.structure(nnx.as_pure(opt.opt_state)) == before
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("name", ["shampoo", "soap", "kfac"])
def test_variable_wrapped_state_trees_keep_their_structure(name):
    # nnx.split gives an nnx.State whose leaves are nnx.Param wrappers (pytree nodes that
    # forward attribute access to their value); updates must come back with the same
    # structure so optax.apply_updates works on them, as it does for optax.adam.
    model = MLP(nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    x, y = _data(n=16)
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    tx = {"shampoo": lo.shampoo(1e-2), "soap": lo.soap(1e-2), "kfac": lo.kfac(1e-2)}[name]
    state = tx.init(params)
    for _ in range(2):
        updates, state = jax.jit(tx.update)(grads, state, params, kfac_stats=stats)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


class LinearRep(nnx.Module):
    """f(x) = F G x: the paper's linear representation model (Flax layouts)."""

    def __init__(self, d_x, k, d_y, rngs):
        self.g = nnx.Linear(d_x, k, use_bias=False, rngs=rngs)
        self.f = nnx.Linear(k, d_y, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.f(self.g(x))


def test_library_kfac_reproduces_the_papers_update_on_linear_representation():
    # Library path: kfac fed by the Gauss-Newton capture on a Flax model. Direct path:
    # the paper's stylized K-FAC (Eq. 5, joint): G -= lr (F^T F + lam)^-1 dG (Sx + lam)^-1,
    # F -= lr dF (Sz + lam)^-1, in the paper's (out, in) layout, in float64.
    d_x, k, d_y, n, lam, lr = 12, 3, 5, 256, 1e-6, 0.5
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d_x, d_x)))
    sigma_sqrt = (q * np.sqrt(np.logspace(0, 2, d_x))) @ q.T  # kappa(Sigma_x) = 100
    g_star = np.linalg.qr(rng.standard_normal((d_x, k)))[0].T
    f_star = rng.standard_normal((d_y, k))
    model = LinearRep(d_x, k, d_y, nnx.Rngs(0))
    G = np.asarray(model.g.kernel[...], np.float64).T  # paper layout (k, d_x)
    F = np.asarray(model.f.kernel[...], np.float64).T  # (d_y, k)
    tx = lo.kfac(lr, b1=0.0, factor_decay=0.0, damping=lam, damping_mode="absolute")
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    capture = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="gauss_newton")

    @nnx.jit
    def step(model, opt, x, y):
        value, grads, stats = capture(model, x, y)
        opt.update(model, grads, kfac_stats=stats)
        return value

    for t in range(5):
        x = rng.choice([-1.0, 1.0], size=(n, d_x)) @ sigma_sqrt  # coloured Rademacher
        y = x @ (f_star @ g_star).T + 0.1 * rng.standard_normal((n, d_y))
        step(model, opt, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
        r = y - x @ (F @ G).T
        d_g = -F.T @ (r.T @ x) / n
        d_f = -(r.T @ (x @ G.T)) / n
        s_x, z = x.T @ x / n, x @ G.T
        s_z = z.T @ z / n
        G, F = (
            G
            - lr
            * np.linalg.solve(F.T @ F + lam * np.eye(k), d_g)
            @ np.linalg.inv(s_x + lam * np.eye(d_x)),
            F - lr * d_f @ np.linalg.inv(s_z + lam * np.eye(k)),
        )
        np.testing.assert_allclose(
            np.asarray(model.g.kernel[...]).T, G, rtol=2e-3, atol=2e-4, err_msg=f"G after step {t}"
        )
        np.testing.assert_allclose(
            np.asarray(model.f.kernel[...]).T, F, rtol=2e-3, atol=2e-4, err_msg=f"F after step {t}"
        )
    # And it learns the representation: the subspace distance to G* is small.
    u = np.linalg.qr(G.T)[0]
    dist = np.linalg.norm((np.eye(d_x) - g_star.T @ g_star) @ u, 2)
    assert dist < 0.1, dist
