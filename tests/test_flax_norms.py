"""K-FAC for norm layers, embeddings and reused weights (issue 16, items 3 and 4).

References are computed from explicit per-example gradients or explicit one-hot
matrices in float64; the captured statistics are float32, hence the tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import layerwise_optax as lo  # noqa: E402
from layerwise_optax import flax as lof  # noqa: E402

F64 = jnp.float64


def _capture(model, x, y, loss="mse", **kw):
    """The statistics of one jitted capture pass (jit keeps the eager op count down)."""
    f = lof.kfac_value_and_grad(lambda m, x: m(x), loss, **kw)
    return nnx.jit(f)(model, x, y)


# ------------------------------------------------------------------ core: KfacDiagonal


def test_kfac_diagonal_update_is_the_damped_diagonal_with_the_factors_ema():
    params = {"s": jnp.ones(3), "w": jnp.zeros((2, 3))}
    tx = lo.kfac(1.0, momentum=0.0, factor_decay=0.5, damping=0.1)
    state = tx.init(params)
    f1, f2 = jnp.array([1.0, 2.0, 4.0]), jnp.array([3.0, 0.0, 1.0])
    g = {"s": jnp.array([1.0, -2.0, 0.5]), "w": jnp.ones((2, 3))}
    stats = {"s": lo.KfacDiagonal(f1), "w": lo.KfacFactors(jnp.eye(2), jnp.eye(3))}
    update = jax.jit(tx.update)
    u1, state = update(g, state, params, kfac_stats=stats)
    np.testing.assert_allclose(u1["s"], -g["s"] / (f1 + 0.1), rtol=1e-6)
    stats["s"] = lo.KfacDiagonal(f2)
    u2, state = update(g, state, params, kfac_stats=stats)
    # EMA with the factors' decay, bias-corrected: (0.25 f1 + 0.5 f2) / 0.75.
    ema = (0.25 * f1 + 0.5 * f2) / 0.75
    np.testing.assert_allclose(u2["s"], -g["s"] / (ema + 0.1), rtol=1e-6)
    assert int(lo.failure_report(state).skipped) == 0


def test_kfac_diagonal_non_finite_statistics_never_poison_the_state():
    params = {"s": jnp.ones(2)}
    tx = lo.kfac(1.0, momentum=0.0, damping=0.1)
    state = tx.init(params)
    good = {"s": lo.KfacDiagonal(jnp.array([1.0, 1.0]))}
    _, state = tx.update({"s": jnp.ones(2)}, state, params, kfac_stats=good)
    bad = {"s": lo.KfacDiagonal(jnp.array([jnp.nan, 1.0]))}
    u, state2 = tx.update({"s": jnp.ones(2)}, state, params, kfac_stats=bad)
    np.testing.assert_array_equal(u["s"], 0.0)
    np.testing.assert_array_equal(state2[0].nu["s"], state[0].nu["s"])
    assert int(lo.failure_report(state2).skipped) == 1
    u, _ = tx.update({"s": jnp.ones(2)}, state2, params, kfac_stats=good)
    assert np.all(np.isfinite(u["s"])) and np.all(np.asarray(u["s"]) != 0)


def test_owner_layout_gives_the_replicated_updates_for_diagonal_blocks():
    params = {
        "emb": {"embedding": jnp.zeros((5, 3))},
        "ln": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "lin": {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros(3)},
    }
    spec = {
        "emb": {"embedding": lo.DiagonalFactors(lo.DimensionNumbers(((0,), (1,))), (0,))},
        "ln": {"scale": None, "bias": None},
        "lin": {"kernel": lo.DimensionNumbers(((0,), (1,))), "bias": lo.FoldedBias("lin/kernel")},
    }
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    m = rng.standard_normal((4, 4))
    stats = {
        "emb": {"embedding": lo.KfacFactors(jnp.array([1.0, 2, 3, 4, 5]), jnp.eye(3) * 2)},
        "ln": {
            "scale": lo.KfacDiagonal(jnp.array([1.0, 2, 3])),
            "bias": lo.KfacDiagonal(jnp.ones(3)),
        },
        "lin": {
            "kernel": lo.KfacFactors(jnp.asarray(m @ m.T, jnp.float32), jnp.eye(3)),
            "bias": lo.FoldedBias("lin/kernel"),
        },
    }
    outs = []
    for layout in ("replicated", "owner"):
        tx = lo.kfac(0.1, dimension_numbers=spec, state_layout=layout)
        state = tx.init(params)
        for _ in range(2):
            u, state = jax.jit(tx.update)(grads, state, params, kfac_stats=stats)
        outs.append(u)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_diagonal_factors_equal_the_full_factor_when_it_is_diagonal():
    params = {"t": jnp.zeros((4, 3))}
    a = jnp.array([1.0, 0.5, 2.0, 3.0])
    m = np.random.default_rng(1).standard_normal((3, 3))
    g = jnp.asarray(m @ m.T + np.eye(3), jnp.float32)
    grads = {"t": jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.float32)}
    diag = lo.kfac(
        0.1, dimension_numbers={"t": lo.DiagonalFactors(lo.DimensionNumbers(((0,), (1,))))}
    )
    full = lo.kfac(0.1, dimension_numbers={"t": lo.DimensionNumbers(((0,), (1,)))})
    sd = diag.init(params)
    assert sd[0].factors["t"][0].shape == (1, 4)  # the input factor is stored as a diagonal
    ud, _ = diag.update(grads, sd, params, kfac_stats={"t": lo.KfacFactors(a, g)})
    uf, _ = full.update(
        grads, full.init(params), params, kfac_stats={"t": lo.KfacFactors(jnp.diag(a), g)}
    )
    np.testing.assert_allclose(ud["t"], uf["t"], rtol=1e-5)


@pytest.mark.parametrize(
    ("stats", "match"),
    [
        ({"s": lo.KfacDiagonal(jnp.ones(3)), "w": None}, r"\['s'\].*shape \(3,\).*\(2,\)"),
        ({"s": None, "w": lo.KfacDiagonal(jnp.ones((2, 2)))}, r"\['w'\]: KfacDiagonal.fisher"),
    ],
)
def test_kfac_diagonal_bad_entries_name_the_path(stats, match):
    params = {"s": jnp.ones(2), "w": jnp.ones((3, 2))}
    tx = lo.kfac(0.1)
    with pytest.raises(ValueError, match=match):
        tx.update(params, tx.init(params), params, kfac_stats=stats)


def test_kfac_diagonal_at_a_folded_bias_is_refused():
    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    stats = {"kernel": lo.KfacFactors(jnp.eye(4), jnp.eye(2)), "bias": lo.KfacDiagonal(jnp.ones(2))}
    tx = lo.kfac(0.1)
    with pytest.raises(ValueError, match=r"\['bias'\].*FoldedBias"):
        tx.update(params, tx.init(params), params, kfac_stats=stats)


@pytest.mark.parametrize("groups", [(2,), (0, 0), [0], (True,)])
def test_diagonal_factors_bad_groups(groups):
    with pytest.raises(ValueError, match=r"DiagonalFactors.groups.*0 \(input\) and 1"):
        lo.DiagonalFactors(lo.DimensionNumbers(((0,), (1,))), groups)


# ------------------------------------------------------------------ capture: norm layers


class NormNet(nnx.Module):
    """Linear -> norm (optionally applied twice) -> tanh -> Linear, float64."""

    def __init__(self, norm, twice=False, dtype=F64):
        rngs = nnx.Rngs(0)
        self.inp = nnx.Linear(3, 4, rngs=rngs, param_dtype=dtype)
        if norm == "layer":
            self.norm = nnx.LayerNorm(4, rngs=rngs, param_dtype=dtype)
        elif norm == "rms":
            self.norm = nnx.RMSNorm(4, rngs=rngs, param_dtype=dtype)
        else:
            self.norm = nnx.BatchNorm(4, use_running_average=False, rngs=rngs, param_dtype=dtype)
            # Its running statistics are float32 in Flax; float64 here, like the rest.
            self.norm.mean = nnx.BatchStat(jnp.zeros(4, dtype))
            self.norm.var = nnx.BatchStat(jnp.ones(4, dtype))
        self.out = nnx.Linear(4, 2, rngs=rngs, param_dtype=dtype)
        self.twice = twice
        # Scale and shift away from their initial 1 and 0, so x-hat and delta both matter.
        key = jax.random.key(3)
        self.norm.scale[...] = 1.0 + 0.5 * jax.random.normal(key, (4,), dtype)
        if getattr(self.norm, "bias", None) is not None:
            self.norm.bias[...] = 0.3 * jax.random.normal(jax.random.key(4), (4,), dtype)

    def __call__(self, x):
        h = self.norm(self.inp(x))
        if self.twice:
            h = self.norm(jnp.tanh(h) + h)
        return self.out(jnp.tanh(h))


def _per_example_grads(model, x, y, norm_leaf):
    """(n, *shape): per-example gradients of 0.5 ||f(x)_i - y_i||^2 in the full-batch pass."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses(p):
        out = nnx.merge(graphdef, p, rest, copy=True)(x)
        return 0.5 * jnp.sum(jnp.reshape(out - y, (x.shape[0], -1)) ** 2, axis=1)

    jac = jax.jit(jax.jacrev(losses))(params)
    return np.asarray(jac["norm"][norm_leaf][...])


# BatchNorm applied twice is left out: its second use normalizes by batch statistics
# that depend on the scale, so the examples' losses are coupled through them and the
# per-example gradients of the full-batch pass are no longer ``Σ_t δ_t ⊙ x̂_t``.
@pytest.mark.parametrize(
    ("norm", "twice"),
    [("layer", False), ("layer", True), ("rms", False), ("rms", True), ("batch", False)],
)
def test_norm_diagonal_fisher_matches_per_example_gradients(norm, twice):
    with jax.enable_x64(True):
        model = NormNet(norm, twice)
        seq = norm != "batch"  # LayerNorm and RMSNorm over a sequence of 3 positions
        shape = (6, 3, 3) if seq else (6, 3)
        x = jax.random.normal(jax.random.key(0), shape, F64)
        y = jax.random.normal(jax.random.key(1), shape[:-1] + (2,), F64)
        _, _, stats = _capture(model, x, y)
        leaves = ["scale"] + ([] if norm == "rms" else ["bias"])
        for leaf in leaves:
            g = _per_example_grads(model, x, y, leaf)
            want = np.mean(g**2, axis=0)
            got = stats["norm"][leaf]
            assert isinstance(got, lo.KfacDiagonal)
            np.testing.assert_allclose(got.fisher, want, rtol=2e-5, atol=1e-9)
        if norm == "rms":
            assert "bias" not in stats["norm"]


def test_batchnorm_running_averages_are_updated_by_the_capture_pass():
    model, twin = NormNet("batch", dtype=jnp.float32), NormNet("batch", dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    y = jnp.zeros((6, 2))
    _capture(model, x, y)  # under nnx.jit: the write-back reaches the model through it
    nnx.jit(lambda m: nnx.value_and_grad(lambda m: lof.mse(m(x), y))(m))(twin)
    assert not np.allclose(model.norm.mean[...], 0.0)
    np.testing.assert_allclose(model.norm.mean[...], twin.norm.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.norm.var[...], twin.norm.var[...], rtol=1e-6)


def test_norm_gauss_newton_diagonal_is_the_exact_expectation():
    with jax.enable_x64(True):
        model = NormNet("layer")
        x = jax.random.normal(jax.random.key(0), (5, 3), F64)
        y = jax.random.normal(jax.random.key(1), (5, 2), F64)
        _, _, stats = _capture(model, x, y, statistics="gauss_newton")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        jac = jax.jit(jax.jacrev(lambda p: nnx.merge(graphdef, p, rest)(x)))(params)  # (n, 2, .)
        for leaf in ("scale", "bias"):
            j = np.asarray(jac["norm"][leaf][...])
            want = np.sum(j**2, axis=(0, 1)) / x.shape[0]  # (1/n) sum_i diag(J_i^T J_i)
            np.testing.assert_allclose(stats["norm"][leaf].fisher, want, rtol=2e-5)


@pytest.mark.slow
def test_norm_statistics_in_the_fisher_mode_have_the_gauss_newton_mean():
    # One-sample Fisher estimates average to the exact Gauss-Newton diagonal.
    model = NormNet("layer", dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = jnp.zeros((8, 2))
    fisher = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="fisher")
    exact = lof.kfac_value_and_grad(lambda m, x: m(x), "mse", statistics="gauss_newton")
    want = exact(model, x, y)[2]["norm"]["scale"].fisher
    draws = jax.vmap(lambda k: fisher(model, x, y, k)[2]["norm"]["scale"].fisher)(
        jax.random.split(jax.random.key(5), 400)
    )
    np.testing.assert_allclose(np.mean(draws, 0), want, rtol=0.15)


# ------------------------------------------------------------------ capture: embeddings


class EmbedNet(nnx.Module):
    def __init__(self, vocab=6, d=3, tied=False, dtype=F64):
        rngs = nnx.Rngs(0)
        self.emb = nnx.Embed(vocab, d, rngs=rngs, param_dtype=dtype)
        self.tied = tied
        if not tied:
            self.head = nnx.Linear(d, 2, rngs=rngs, param_dtype=dtype)

    def __call__(self, ids):
        h = jnp.tanh(self.emb(ids))
        return self.emb.attend(h) if self.tied else self.head(h)


def test_embedding_factors_match_the_one_hot_computation():
    with jax.enable_x64(True):
        vocab, d, n, t = 6, 3, 4, 5
        model = EmbedNet(vocab, d)
        ids = jax.random.randint(jax.random.key(0), (n, t), 0, vocab - 1)  # id 5 unused
        y = jax.random.normal(jax.random.key(1), (n, t, 2), F64)
        _, _, stats = _capture(model, ids, y)
        s = stats["emb"]["embedding"]
        # The same layer as a dense kernel on one-hot inputs: A = X^T X / n, B = Δ^T Δ / (n T).
        onehot = np.eye(vocab)[np.asarray(ids).reshape(-1)]
        a_full = onehot.T @ onehot / n
        assert np.count_nonzero(a_full - np.diag(np.diag(a_full))) == 0
        np.testing.assert_allclose(s.a, np.diag(a_full), rtol=1e-6)
        assert s.a.shape == (vocab,) and float(s.a[vocab - 1]) == 0.0
        table = model.emb.embedding[...]
        w, b = model.head.kernel[...], model.head.bias[...]

        def loss_of_z(z):  # z: the embedding's output
            out = jnp.tanh(z) @ w + b[None, None]
            return 0.5 * jnp.mean(jnp.sum(jnp.reshape(out - y, (n, -1)) ** 2, -1))

        delta = n * np.asarray(jax.grad(loss_of_z)(table[ids])).reshape(-1, d)
        np.testing.assert_allclose(s.g, delta.T @ delta / (n * t), rtol=1e-5, atol=1e-9)


def test_embedding_kfac_update_equals_the_dense_one_hot_kernel_update():
    vocab, d = 6, 3
    model = EmbedNet(vocab, d, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(0), (4, 5), 0, vocab)
    y = jax.random.normal(jax.random.key(1), (4, 5, 2))
    _, grads, stats = _capture(model, ids, y)
    params = nnx.state(model, nnx.Param)
    tx = lo.kfac(0.1, dimension_numbers=lof.kfac_dimension_numbers(model))
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    # The reference: the same factors given in full (A = diag(counts) / n as a matrix).
    full = jax.tree.map(lambda x: x, stats, is_leaf=lambda x: isinstance(x, lo.KfacFactors))
    full["emb"]["embedding"] = lo.KfacFactors(
        jnp.diag(stats["emb"]["embedding"].a), stats["emb"]["embedding"].g
    )
    ref = lo.kfac(0.1)
    ur, _ = jax.jit(ref.update)(grads, ref.init(params), params, kfac_stats=full)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ur)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_embedding_input_factor_is_never_materialized_vocab_by_vocab():
    vocab = 3001
    model = EmbedNet(vocab, 4, tied=True, dtype=jnp.float32)
    ids = jnp.zeros((2, 3), jnp.int32)
    f = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy")
    tx = lo.kfac(0.1, dimension_numbers=lof.kfac_dimension_numbers(model))
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    assert state[0].factors["emb"]["embedding"][0].shape == (1, vocab)

    def step(params, state):
        m = nnx.merge(nnx.graphdef(model), params)
        _, grads, stats = f(m, ids, ids)
        return tx.update(grads, state, params, kfac_stats=stats)

    jaxpr = jax.make_jaxpr(step)(params, state)
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert shapes and not [s for s in shapes if s.count(vocab) >= 2], "a V x V array"


# ------------------------------------------------------------------ capture: weight reuse


def test_tied_embedding_statistics_are_the_sum_rule_by_hand():
    with jax.enable_x64(True):
        vocab, d, n, t = 5, 3, 4, 3
        model = EmbedNet(vocab, d, tied=True)
        ids = jax.random.randint(jax.random.key(0), (n, t), 0, vocab)
        labels = jax.random.randint(jax.random.key(1), (n, t), 0, vocab)
        _, _, stats = _capture(model, ids, labels, "softmax_cross_entropy")
        s = stats["emb"]["embedding"]
        table = model.emb.embedding[...]

        def loss(z, logit_pert):
            q = jnp.tanh(z)
            return lof.softmax_cross_entropy(q @ table.T + logit_pert, labels)

        z = table[ids]
        q = np.asarray(jnp.tanh(z)).reshape(-1, d)
        dz, dl = jax.grad(loss, argnums=(0, 1))(z, jnp.zeros((n, t, vocab), F64))
        d_look = n * np.asarray(dz).reshape(-1, d)  # the lookup's output gradients
        d_att = n * np.asarray(dl).reshape(-1, vocab)  # attend's output gradients (logits)
        counts = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab)
        # Table orientation (V, d): the V side sums the lookup's one-hot rows and attend's
        # logit gradients; the d side averages the lookup's gradients and attend's queries
        # over the rows of both uses.
        want_a = (counts + np.sum(d_att**2, 0)) / n
        want_g = (d_look.T @ d_look + q.T @ q) / (2 * n * t)
        np.testing.assert_allclose(s.a, want_a, rtol=1e-5)
        np.testing.assert_allclose(s.g, want_g, rtol=1e-5, atol=1e-10)


class Twice(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0), param_dtype=F64)

    def __call__(self, x):
        return self.lin(jnp.tanh(self.lin(x)))


def test_layer_called_twice_gets_the_rows_of_both_calls():
    with jax.enable_x64(True):
        model = Twice()
        n = 6
        x = jax.random.normal(jax.random.key(0), (n, 3), F64)
        y = jax.random.normal(jax.random.key(1), (n, 3), F64)
        _, _, stats = _capture(model, x, y)
        w, b = model.lin.kernel[...], model.lin.bias[...]

        def loss(e1, e2):
            h = jnp.tanh(x @ w + b[None] + e1)
            return lof.mse(h @ w + b[None] + e2, y)

        zero = jnp.zeros((n, 3), F64)
        d1, d2 = (n * np.asarray(d) for d in jax.grad(loss, argnums=(0, 1))(zero, zero))
        h = np.asarray(jnp.tanh(x @ w + b[None]))
        xs = np.concatenate([np.asarray(x), h])
        xs = np.concatenate([xs, np.ones((2 * n, 1))], 1)  # the folded bias's constant 1
        ds = np.concatenate([d1, d2])
        np.testing.assert_allclose(stats["lin"]["kernel"].a, xs.T @ xs / n, rtol=1e-5)
        np.testing.assert_allclose(stats["lin"]["kernel"].g, ds.T @ ds / (2 * n), rtol=1e-5)
        # The sum of the uses' own blocks when their B are equal: A = A_1 + A_2, B = B_1 = B_2.
        a1, a2 = xs[:n].T @ xs[:n] / n, xs[n:].T @ xs[n:] / n
        np.testing.assert_allclose(stats["lin"]["kernel"].a, a1 + a2, rtol=1e-5)


# ------------------------------------------------------------------ training


class TinyLM(nnx.Module):
    """embed -> LayerNorm -> Linear -> tanh -> LayerNorm -> attend (tied head)."""

    def __init__(self, vocab=11, d=8):
        rngs = nnx.Rngs(0)
        self.emb = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, ids):
        h = self.emb(ids)
        h = h + jnp.tanh(self.mlp(self.ln1(h)))
        return self.emb.attend(self.ln2(h))


def test_tiny_lm_trains_with_kfac_under_jit_with_every_leaf_preconditioned():
    vocab = 11
    model = TinyLM(vocab)
    ids = jax.random.randint(jax.random.key(0), (8, 6), 0, vocab)
    targets = (ids * 3 + 1) % vocab  # a fixed token-to-token map the model can learn
    grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "softmax_cross_entropy")
    stats = nnx.eval_shape(lambda m: grad_fn(m, ids, targets)[2], model)
    params = nnx.state(model, nnx.Param)
    # No silent fallback: every param leaf has its own block (or rides in its kernel's).
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    entries = dict(
        jax.tree_util.tree_flatten_with_path(
            stats, is_leaf=lambda x: isinstance(x, (lo.KfacFactors, lo.KfacDiagonal, lo.FoldedBias))
        )[0]
    )
    kinds = {
        jax.tree_util.keystr(p[:-1] if str(p[-1]) == ".value" else p): type(e).__name__
        for p, e in entries.items()
    }
    assert len(kinds) == len(flat) == 6  # RMSNorm has no bias
    assert kinds["['emb']['embedding']"] == "KfacFactors"
    assert kinds["['ln1']['scale']"] == kinds["['ln2']['scale']"] == "KfacDiagonal"

    opt = nnx.Optimizer(
        model, lo.kfac(0.1, dimension_numbers=lof.kfac_dimension_numbers(model)), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, opt):
        loss, grads, stats = grad_fn(model, ids, targets)
        opt.update(model, grads, kfac_stats=stats)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.25 * losses[0], losses[::8]
    report = lo.failure_report(opt.opt_state)
    assert report.skipped == 0 and report.failed == 0
    # The fallback's second moment is never used: nu holds the norms' Fisher EMAs only.
    nu = opt.opt_state[0].nu
    np.testing.assert_array_equal(nu["mlp"]["kernel"][...], 0.0)
    assert float(jnp.min(nu["ln1"]["scale"][...])) > 0.0


def test_kfac_dimension_numbers_for_embeddings_and_norms():
    model = TinyLM()
    specs = lof.kfac_dimension_numbers(model)(nnx.state(model, nnx.Param))
    assert specs["emb"]["embedding"].get_value() == lo.DiagonalFactors(
        lo.DimensionNumbers(((0,), (1,))), (0,)
    )
    assert specs["ln1"]["scale"].get_value() is None
    assert specs["ln1"]["bias"].get_value() is None


def test_norm_with_features_on_the_examples_axis_is_refused_by_path():
    class Bad(nnx.Module):
        def __init__(self):
            self.norm = nnx.LayerNorm(4, reduction_axes=-1, feature_axes=0, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.norm(x)

    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="layer norm: its features include axis 0"):
        lof.kfac_value_and_grad(lambda m, x: m(x), "mse")(Bad(), x, x)


def test_kfacs_default_layout_keeps_embedding_tables_diagonal_and_matches_the_model_layout():
    model = TinyLM()
    ids = jax.random.randint(jax.random.key(0), (4, 5), 0, 11)
    _, grads, stats = _capture(model, ids, ids, "softmax_cross_entropy")
    params = nnx.state(model, nnx.Param)
    default, spelled = (
        lo.kfac(0.1),
        lo.kfac(0.1, dimension_numbers=lof.kfac_dimension_numbers(model)),
    )
    sd = default.init(params)
    assert sd[0].factors["emb"]["embedding"][0].shape == (1, 11)
    ud, _ = jax.jit(default.update)(grads, sd, params, kfac_stats=stats)
    us, _ = jax.jit(spelled.update)(grads, spelled.init(params), params, kfac_stats=stats)
    for a, b in zip(jax.tree.leaves(ud), jax.tree.leaves(us)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_diagonal_blocks_under_multi_steps_are_refused_by_path():
    params = {"ln": {"scale": jnp.ones(2)}}
    tx = lo.multi_steps(lo.kfac(0.1), 2)
    stats = {"ln": {"scale": lo.KfacDiagonal(jnp.ones(2))}}
    with pytest.raises(ValueError, match=r"\['ln'\]\['scale'\]: KfacDiagonal.*multi_steps"):
        tx.update(params, tx.init(params), params, kfac_stats=stats)
