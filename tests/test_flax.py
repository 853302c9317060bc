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
    # Biases folded by default: the input factor is over [x; 1] (homogeneous coordinates).
    xh = jnp.concatenate([x, jnp.ones((n, 1))], 1)
    hh = jnp.concatenate([h, jnp.ones((n, 1))], 1)
    np.testing.assert_allclose(stats["l1"]["kernel"].a, xh.T @ xh / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["l1"]["kernel"].g, d1.T @ d1 / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["l2"]["kernel"].a, hh.T @ hh / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["l2"]["kernel"].g, d2.T @ d2 / n, rtol=1e-4, atol=1e-6)
    assert stats["l1"]["bias"] == lo.FoldedBias("l1/kernel")
    # The separate form: the bias's own block, a unit input and the layer's output factor.
    _, _, sep = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=False)(model, x, y)
    np.testing.assert_allclose(sep["l1"]["kernel"].a, x.T @ x / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sep["l1"]["bias"].a, np.ones((1, 1)))
    np.testing.assert_allclose(sep["l1"]["bias"].g, d1.T @ d1 / n, rtol=1e-4, atol=1e-6)


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
    p2 = np.concatenate([p2, np.ones((p2.shape[0], 1))], 1)  # the folded bias's constant 1
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
        for factor in ("a", "g"):
            np.testing.assert_allclose(
                getattr(sg[layer]["kernel"], factor),
                getattr(sf[layer]["kernel"], factor),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{layer}/{factor}",
            )
        assert sg[layer]["bias"] == sf[layer]["bias"] == lo.FoldedBias(f"{layer}/kernel")
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
            lambda rngs: nnx.Einsum("bhd,shdk->bhk", (2, 2, 3, 4), rngs=rngs),
            r"layer proj: einsum 'bhd,shdk->bhk' cannot be captured: kernel axes \['s'\]",
        ),
        (
            lambda rngs: nnx.Conv(2, 4, (3,), feature_group_count=2, rngs=rngs),
            r"layer proj: grouped convolutions are not supported",
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
    with pytest.raises(ValueError, match="statistics='fisher' needs a built-in loss"):
        lof.kfac_value_and_grad(lambda m, x: m(x), lambda o, t: jnp.mean(o), statistics="fisher")
    with pytest.raises(ValueError, match="Unknown statistics 'exact'"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="exact")
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
    curvature = lof.kfac_curvature(lambda m, x: m(x), "mse")
    traces = []

    @nnx.jit
    def step(model, opt, x, y):
        traces.append(None)
        value, grads, stats = capture(model, x, y)
        # kfac_adaptive's quadratic model needs the curvature; the others ignore it.
        opt.update(model, grads, kfac_stats=stats, curvature=curvature(model, x, y))
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
    tx = lo.kfac(lr, momentum=0.0, factor_decay=0.0, damping=lam, damping_mode="absolute")
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


# ----------------------------------------------------------------------------- paths and biases
# Issue 20, items 1 and 2: nnx.State paths end in `.value` (they silently took the
# diagonal fallback), and bias statistics ignored positions. The references below are
# written out from the formulas in float64: with rows r = examples x positions (T per
# example), delta = z - y for lof.mse (= n dL/dz), G = X^T Delta / n, g_b = sum(Delta) / n,
# B = Delta^T Delta / (n T), and A = X^T X / n (separate: the bias's A is T) or
# A = [X, 1]^T [X, 1] / n (folded). Updates are -(A + lam)^-1 [G; g_b] (B + lam)^-1.


def kfac_layer_reference(rows_x, delta, n, lam, fold):
    """Float64 K-FAC step (lr 1, no momentum, absolute damping) of one layer with a bias."""
    rows_x, delta = np.asarray(rows_x, np.float64), np.asarray(delta, np.float64)
    t = rows_x.shape[0] // n
    d_in, d_out = rows_x.shape[1], delta.shape[1]
    g_k, g_b = rows_x.T @ delta / n, delta.sum(0) / n
    b_inv = np.linalg.inv(delta.T @ delta / (n * t) + lam * np.eye(d_out))
    if fold:
        xh = np.concatenate([rows_x, np.ones((rows_x.shape[0], 1))], 1)
        a = xh.T @ xh / n
        u = np.linalg.solve(a + lam * np.eye(d_in + 1), np.vstack([g_k, g_b])) @ b_inv
        return -u[:d_in], -u[d_in]
    a = rows_x.T @ rows_x / n
    u_k = np.linalg.solve(a + lam * np.eye(d_in), g_k) @ b_inv
    return -u_k, -(g_b / (t + lam)) @ b_inv


def _kfac_step(model, x, y, fold, dims=None, **kw):
    """One capture + kfac step (lr 1, b1 0, factor_decay 0, damping 1e-8 absolute)."""
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=fold)
    _, grads, stats = f(model, x, y)
    if dims is None and not fold:
        dims = lof.kfac_dimension_numbers(model, fold_biases=False)
    tx = lo.kfac(
        1.0,
        momentum=0.0,
        factor_decay=0.0,
        damping=1e-8,
        damping_mode="absolute",
        dimension_numbers=dims,
        **kw,
    )
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    u, state = tx.update(nnx.as_pure(grads), tx.init(params), params, kfac_stats=stats)
    return u, state


def _conv_patches_np(x, k=2):
    n, h, w, _ = x.shape
    rows = [
        x[:, i : i + k, j : j + k, :].reshape(n, -1)
        for i in range(h - k + 1)
        for j in range(w - k + 1)
    ]
    return np.stack(rows, 1).reshape(-1, rows[0].shape[-1])  # (n * positions, k*k*c_in)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "separate"])
@pytest.mark.parametrize("kind", ["dense", "sequence", "conv"])
def test_bias_step_matches_the_float64_formula(kind, fold):
    rng = np.random.default_rng(0)
    if kind == "conv":
        model = nnx.Conv(2, 3, kernel_size=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
        x = rng.standard_normal((5, 4, 4, 2)).astype(np.float32) + 0.3
        y = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
        rows = _conv_patches_np(x)
    else:
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        shape = (8, 3) if kind == "dense" else (4, 6, 3)  # 6 tokens per example
        x = rng.standard_normal(shape).astype(np.float32) + 0.3
        y = rng.standard_normal(shape[:-1] + (2,)).astype(np.float32)
        rows = x.reshape(-1, 3)
    w = np.asarray(model.kernel[...], np.float64)
    b = np.asarray(model.bias[...], np.float64)
    delta = rows @ w.reshape(-1, w.shape[-1]) + b - y.reshape(rows.shape[0], -1)
    want_k, want_b = kfac_layer_reference(rows, delta, x.shape[0], 1e-8, fold)
    u, state = _kfac_step(model, jnp.asarray(x), jnp.asarray(y), fold)
    np.testing.assert_allclose(u["kernel"].reshape(want_k.shape), want_k, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(u["bias"], want_b, rtol=2e-3, atol=1e-5)
    a = state[0].factors["kernel"][0]
    assert a.shape[-1] == rows.shape[1] + fold  # the homogeneous factor when folded


def test_issue_sequence_bias_regression_values():
    # nnx.Linear(3, 2) on 6 tokens: the separate bias block's input factor is [[6.]]
    # (it was [[1.]], a 6x too large step [0.8223, 0.32]); the folded form keeps the
    # kernel-bias cross term and gives a different (the homogeneous) step.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 6, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 6, 2)), jnp.float32)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    _, _, sep = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=False)(model, x, y)
    np.testing.assert_array_equal(sep["bias"].a, [[6.0]])
    u, _ = _kfac_step(model, x, y, fold=False)
    np.testing.assert_allclose(u["bias"], [0.1371, 0.0533], atol=1e-4)
    u, _ = _kfac_step(model, x, y, fold=True)
    w, b = np.asarray(model.kernel[...], np.float64), np.asarray(model.bias[...], np.float64)
    rows = np.asarray(x, np.float64).reshape(-1, 3)
    delta = rows @ w + b - np.asarray(y, np.float64).reshape(-1, 2)
    _, want_b = kfac_layer_reference(rows, delta, 4, 1e-8, True)
    np.testing.assert_allclose(u["bias"], want_b, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(want_b, [0.006023, 0.111322], atol=1e-5)  # float64 value


def test_nnx_state_paths_give_the_pure_dict_step():
    # Issue 20 item 1, first repro: on nnx.State trees (paths ending in `.value`) every
    # layer used to take the diagonal fallback; now State, as_pure and to_pure_dict trees
    # give the same step, the float64 K-FAC step.
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = jax.random.normal(jax.random.key(1), (8, 2))
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    params = nnx.split(model, nnx.Param)[1]
    tx = lo.kfac(1.0, momentum=0, factor_decay=0, damping=1e-8, damping_mode="absolute")
    steps = {}
    for name, conv in [
        ("state", lambda t: t),
        ("as_pure", nnx.as_pure),
        ("pure_dict", nnx.to_pure_dict),
    ]:
        p, g = conv(params), conv(grads)
        u, state = tx.update(g, tx.init(p), p, kfac_stats=stats)
        steps[name] = nnx.as_pure(u) if name == "state" else u
        assert float(jnp.abs(jax.tree.leaves(state[0].factors)[0]).max()) > 0
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    delta = xn @ np.asarray(model.kernel[...], np.float64) + np.asarray(model.bias[...]) - yn
    want_k, want_b = kfac_layer_reference(xn, delta, 8, 1e-8, True)
    for name, u in steps.items():
        np.testing.assert_allclose(u["kernel"], want_k, rtol=2e-3, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(u["bias"], want_b, rtol=2e-3, atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(steps["pure_dict"])):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7, err_msg=name)


class _LG(nnx.Module):
    def __init__(self, rngs):
        self.lg = nnx.LinearGeneral(4, (2, 3), rngs=rngs)

    def __call__(self, x):
        return self.lg(x).reshape(x.shape[0], -1)


def test_readme_recipe_with_linear_general_under_nnx_optimizer():
    # Issue 20 item 1, second repro: init saw `.value` paths (default layout), update
    # plain ones (the LinearGeneral layout): a broadcasting TypeError. The step now is
    # the float64 K-FAC step of the equivalent dense (4, 6) layer.
    model = _LG(nnx.Rngs(0))
    w = np.asarray(model.lg.kernel[...], np.float64).reshape(4, 6)
    b = np.asarray(model.lg.bias[...], np.float64).reshape(6)
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jax.random.normal(jax.random.key(1), (16, 6))
    tx = lo.kfac(
        1.0,
        momentum=0.0,
        factor_decay=0.0,
        damping=1e-8,
        damping_mode="absolute",
        dimension_numbers=lof.kfac_dimension_numbers(model),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    opt.update(model, grads, kfac_stats=stats)
    xn = np.asarray(x, np.float64)
    want_k, want_b = kfac_layer_reference(xn, xn @ w + b - np.asarray(y), 16, 1e-8, True)
    np.testing.assert_allclose(
        np.asarray(model.lg.kernel[...]).reshape(4, 6) - w, want_k, rtol=2e-3, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(model.lg.bias[...]).reshape(6) - b, want_b, rtol=2e-3, atol=1e-5
    )


class _Mixed(nnx.Module):
    """Linear + LayerNorm (no statistics: diagonal fallback) + LinearGeneral in a list."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.blocks = nnx.List([nnx.LinearGeneral(6, (2, 2), rngs=rngs)])

    def __call__(self, x):
        h = self.norm(jnp.tanh(self.l1(x)))
        return self.blocks[0](h).reshape(x.shape[0], -1)


def test_state_pure_and_dict_trees_give_identical_results():
    # Issue 20, Tests: the statistics, roles and dimension-numbers paths on nnx.State
    # (`.value` paths), nnx.as_pure and to_pure_dict trees agree exactly.
    model = _Mixed(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 4))
    y = jax.random.normal(jax.random.key(1), (8, 4))
    _, grads, stats = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(model, x, y)
    params = nnx.split(model, nnx.Param)[1]
    dims = lof.kfac_dimension_numbers(model)
    tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.0, damping=1e-4, dimension_numbers=dims)
    spec_leaf = lambda s: s is None or isinstance(s, (lo.DimensionNumbers, lo.FoldedBias))
    results = {}
    for name, conv in [
        ("state", lambda t: t),
        ("as_pure", nnx.as_pure),
        ("pure_dict", nnx.to_pure_dict),
    ]:
        p, g = conv(params), conv(grads)
        u, state = jax.jit(tx.update)(g, tx.init(p), p, kfac_stats=stats)
        if name == "pure_dict":
            u_pure = u
        results[name] = (
            jax.tree.leaves(lo.layer_roles(p)),
            jax.tree.leaves(dims(p), is_leaf=spec_leaf),
            lo.format_roles(p),
            [np.asarray(v) for v in jax.tree.leaves(u)],
            [np.asarray(v) for v in jax.tree.leaves(state[0].factors)],
        )
    roles, specs, table, steps, factors = results["pure_dict"]
    assert len(roles) == 6 and "blocks/0/kernel" in table and "norm/scale" in table
    assert lo.FoldedBias("blocks/0/kernel") in specs and lo.FoldedBias("l1/kernel") in specs
    for name, (r, s, t, us, fs) in results.items():
        assert (r, s, t) == (roles, specs, table), name
        for a, b in zip(us + fs, steps + factors):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # The norm has its diagonal Fisher block (issue 16): g / (F + damping), factor_decay 0.
    g = np.asarray(nnx.to_pure_dict(grads)["norm"]["scale"])
    f = np.asarray(stats["norm"]["scale"].fisher)
    np.testing.assert_allclose(-np.asarray(u_pure["norm"]["scale"]), g / (f + 1e-4), rtol=1e-5)


def _padded_patches_np(x, k, pads, mode):
    """Rows of every (k[0], k[1]) window of ``x`` padded by ``pads`` (NumPy, stride 1)."""
    x = np.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
    n, h, w, _ = x.shape
    rows = [
        x[:, i : i + k[0], j : j + k[1], :].reshape(n, -1)
        for i in range(h - k[0] + 1)
        for j in range(w - k[1] + 1)
    ]
    return np.stack(rows, 1)  # (n, positions, k0*k1*c_in)


@pytest.mark.parametrize(
    "padding, pads, mode",
    [
        ("SAME", [(0, 1), (1, 1)], "constant"),
        (1, [(1, 1), (1, 1)], "constant"),
        ((1, 2), [(1, 1), (2, 2)], "constant"),
        (((1, 0), (0, 2)), [(1, 0), (0, 2)], "constant"),
        ("CIRCULAR", [(0, 1), (1, 1)], "wrap"),
    ],
    ids=["same", "int", "ints", "pairs", "circular"],
)
def test_conv_input_factor_for_every_padding_form(padding, pads, mode):
    # nnx.Conv takes an int, per-axis ints, (low, high) pairs and CIRCULAR besides the lax
    # names; capture used to fail on the int forms (TypeError / ValueError) and CIRCULAR.
    # The float64 windows are checked against the layer's own output first.
    x = np.random.default_rng(0).standard_normal((3, 5, 4, 2)).astype(np.float32)
    model = nnx.Conv(2, 3, kernel_size=(2, 3), padding=padding, rngs=nnx.Rngs(0))
    rows = _padded_patches_np(x.astype(np.float64), (2, 3), pads, mode)
    w = np.asarray(model.kernel[...], np.float64).reshape(-1, 3)
    out = np.asarray(model(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(
        rows @ w, (out - np.asarray(model.bias[...])).reshape(3, -1, 3), atol=1e-5
    )
    y = jnp.zeros(out.shape, jnp.float32)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=False)
    _, _, stats = f(model, jnp.asarray(x), y)
    rows = rows.reshape(-1, rows.shape[-1])
    np.testing.assert_allclose(stats["kernel"].a, rows.T @ rows / 3, rtol=1e-5, atol=1e-5)


def test_causal_conv_input_factor():
    x = np.random.default_rng(1).standard_normal((2, 6, 2)).astype(np.float32)
    model = nnx.Conv(2, 3, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2, rngs=nnx.Rngs(0))
    xp = np.pad(x.astype(np.float64), [(0, 0), (4, 0), (0, 0)])  # (3 - 1) * 2 zeros before
    rows = np.stack([xp[:, t : t + 5 : 2, :].reshape(2, -1) for t in range(6)], 1)
    w = np.asarray(model.kernel[...], np.float64).reshape(-1, 3)
    out = np.asarray(model(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(rows @ w, out - np.asarray(model.bias[...]), atol=1e-5)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", fold_biases=False)
    _, _, stats = f(model, jnp.asarray(x), jnp.zeros(out.shape, jnp.float32))
    rows = rows.reshape(-1, rows.shape[-1])
    np.testing.assert_allclose(stats["kernel"].a, rows.T @ rows / 2, rtol=1e-5, atol=1e-5)


def test_a_layer_whose_rows_are_not_a_multiple_of_the_examples_is_named():
    """The rows of a layer's input are examples × positions; a model that mixes the
    examples into another axis (here 4 examples of 6 features seen as 6 rows of 4)
    has no positions per example, and used to be floored to 1 silently."""

    class Mixer(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return jnp.reshape(self.dense(jnp.reshape(x, (6, 4))), (4, -1))[:, :1]

    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")
    with pytest.raises(ValueError, match=r"layer dense: its input has 6 rows .* 4 examples"):
        grad_fn(Mixer(nnx.Rngs(0)), jnp.ones((4, 6)), jnp.zeros((4, 1)))
