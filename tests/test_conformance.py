"""The contract every optimizer alias meets (modelled on optax's contrib common tests).

Every entry of ``tests._helpers.OPTIMIZERS`` runs through every test here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _registry
from tests._helpers import (
    EXTRA_ARGS,
    MOMENTUM_ARG,
    OPTIMIZERS,
    PARAM_AND_STATE_HELPERS,
    SLOW_VARIANTS,
    WRAPPERS_AND_SCHEDULES,
    assert_lapack_unbatched,
    assert_recovers,
    assert_tree_finite,
    assert_trees_close,
    build,
    main_state,
    mixed_tree,
    optimizer_params,
    skipped_count,
    with_extra_args,
)

parametrize_opt = pytest.mark.parametrize("name,factory,kwargs", optimizer_params())


def _run_scan(tx, loss, params, steps, extra=None):
    """Runs ``steps`` optimizer steps under one jit; returns final params and losses.

    ``extra(params)`` gives extra update arguments (the problem's K-FAC factors);
    optimizers that do not take them ignore them. Every step also gets the
    problem's exact curvature (``curvature=``: the loss's Hessian, params as the
    model's outputs), which adaptive K-FAC's quadratic model needs.
    """
    curvature = lo.KfacCurvature(lambda p, _: p, lambda z, _: loss(z))

    def step(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, **{"curvature": curvature, **(extra(p) if extra else {})})
        return (optax.apply_updates(p, u), s), value

    @jax.jit
    def run(p):
        (p, s), values = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p, s, values

    return run(params)


def _grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    keys = jax.tree.unflatten(jax.tree.structure(params), list(keys))
    return jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype), params, keys)


# ----------------------------------------------------------------------------- convergence


@parametrize_opt
def test_converges_on_ill_conditioned_matrix_quadratic(name, factory, kwargs):
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    left = jnp.asarray(np.diag(np.logspace(0, 1.5, 6)), jnp.float32)  # cond ~ 30 per side

    def loss(p):
        r = left @ (p["w"] - target)
        return 0.5 * jnp.sum(r**2) + 0.5 * jnp.sum((p["b"] - 1.0) ** 2)

    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
    # The exact Hessian is (L^T L) ⊗ I on the kernel: its K-FAC factors.
    stats = {"w": lo.KfacFactors(left.T @ left, jnp.eye(5)), "b": None}
    tx = build(name, factory, kwargs)
    p, state, losses = _run_scan(tx, loss, params, 600, extra=lambda p: {"kfac_stats": stats})
    assert float(losses[-1]) < 1e-3 * float(losses[0]), (float(losses[0]), float(losses[-1]))
    assert_tree_finite(state)


@parametrize_opt
def test_converges_on_rosenbrock_matrix(name, factory, kwargs):
    # Row 0 holds x, row 1 holds y: sum of (1 - x)^2 + 10 (y - x^2)^2 per column.
    def loss(p):
        x, y = p["w"][0], p["w"][1]
        return jnp.sum((1.0 - x) ** 2 + 10.0 * (y - x**2) ** 2)

    params = {"w": jnp.full((2, 4), -0.5)}
    p, _, losses = _run_scan(build(name, factory, kwargs), loss, params, 1500)
    assert float(losses[-1]) < 1e-2 * float(losses[0]), (float(losses[0]), float(losses[-1]))


@parametrize_opt
def test_trains_a_small_mlp(name, factory, kwargs):
    key = jax.random.key(1)
    kx, kt, k1, k2 = jax.random.split(key, 4)
    x = jax.random.normal(kx, (128, 8)) * jnp.linspace(0.3, 3.0, 8)[None, :]
    teacher = jax.random.normal(kt, (8, 1))
    y = jnp.tanh(x @ teacher)

    def mlp(p, x):
        h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
        return h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]

    params = {
        "l1": {"kernel": jax.random.normal(k1, (8, 16)) / jnp.sqrt(8.0), "bias": jnp.zeros(16)},
        "l2": {"kernel": jax.random.normal(k2, (16, 1)) / 4.0, "bias": jnp.zeros(1)},
    }
    loss = lambda p: jnp.mean((mlp(p, x) - y) ** 2)

    def kfac_stats(p):
        # Empirical K-FAC factors: layer inputs, and per-example output gradients
        # obtained through zero perturbations of each layer's pre-activations.
        def perturbed(e1, e2):
            h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :] + e1)
            out = h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :] + e2
            return jnp.mean((out - y) ** 2), h

        n = x.shape[0]
        (d1, d2), h = jax.grad(perturbed, argnums=(0, 1), has_aux=True)(
            jnp.zeros((n, 16)), jnp.zeros((n, 1))
        )
        d1, d2 = n * d1, n * d2
        # kfac folds each 'bias' into its 'kernel' (homogeneous coordinates): the
        # input factor is over the inputs with a constant 1 appended.
        xh, hh = (jnp.concatenate([v, jnp.ones((n, 1))], 1) for v in (x, h))
        return {
            "kfac_stats": {
                "l1": {
                    "kernel": lo.KfacFactors(xh.T @ xh / n, d1.T @ d1 / n),
                    "bias": lo.FoldedBias("l1/kernel"),
                },
                "l2": {
                    "kernel": lo.KfacFactors(hh.T @ hh / n, d2.T @ d2 / n),
                    "bias": lo.FoldedBias("l2/kernel"),
                },
            }
        }

    _, _, losses = _run_scan(build(name, factory, kwargs), loss, params, 300, extra=kfac_stats)
    assert float(losses[-1]) < 0.1 * float(losses[0]), (float(losses[0]), float(losses[-1]))


# ----------------------------------------------------------------------------- compilation


@parametrize_opt
def test_update_compiles_once(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = mixed_tree(jax.random.key(0))
    init, update = jax.jit(tx.init), jax.jit(tx.update)
    state = init(params)
    for i in range(4):  # crosses refresh and non-refresh steps
        _, state = update(_grads(params, i), state, params)
    assert update._cache_size() == 1
    assert init._cache_size() == 1


@parametrize_opt
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_state_is_stable_across_steps_and_through_cond(name, factory, kwargs, dtype):
    # optax's contract (state_shape_dtype_shard_stability): params, gradients and
    # (via jax_enable_x64) Python hyperparameters in each float dtype; the update runs
    # inside lax.cond, which demands identical structure, shapes and dtypes in both
    # branches. x64 is switched on only inside this test.
    with jax.enable_x64(dtype == "float64"):
        tx = build(name, factory, kwargs)
        params = {"w": jnp.zeros((5, 4), dtype), "b": jnp.zeros(4, dtype)}
        state = tx.init(params)
        ref = jax.tree.map(lambda x: (x.shape, x.dtype), state)

        @jax.jit
        def step(state, g, i):
            updates, new = jax.lax.cond(
                i % 2 == 0,
                lambda s: tx.update(g, s, params),
                lambda s: (jax.tree.map(jnp.zeros_like, g), s),
                state,
            )
            return updates, new

        for i in range(3):
            g = _grads(params, i)
            updates, state = step(state, g, jnp.asarray(i))
            assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == ref
            assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))
        assert_tree_finite(updates)


# ----------------------------------------------------------------------------- optax wrappers


@parametrize_opt
def test_inject_hyperparams_gives_identical_results(name, factory, kwargs):
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    b1 = MOMENTUM_ARG.get(name, "b1")
    plain = build(name, factory, kwargs, **{b1: 0.8})
    injected = with_extra_args(
        lo.inject_hyperparams(factory)(**{**kwargs, b1: 0.8}), EXTRA_ARGS.get(name)
    )
    s1, s2 = plain.init(params), injected.init(params)
    assert set(s2.hyperparams) >= {"learning_rate", b1}
    u1f, u2f = jax.jit(plain.update), jax.jit(injected.update)
    for i in range(4):
        g = _grads(params, i)
        u1, s1 = u1f(g, s1, params)
        u2, s2 = u2f(g, s2, params)
        assert_trees_close(u1, u2, rtol=1e-5, atol=1e-7)
    assert_trees_close(s1, s2.inner_state, rtol=1e-5, atol=1e-6)
    # A traced hyperparameter can be changed in the state without recompiling.
    s2.hyperparams["learning_rate"] = jnp.zeros_like(s2.hyperparams["learning_rate"])
    u, _ = u2f(_grads(params, 9), s2, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
    assert u2f._cache_size() == 1


# XLA folds products with compile-time constants into new constants (its algebraic
# simplifier) and LLVM fuses multiply-adds into FMAs differently for constants and
# runtime values, so plain (constant) and injected (runtime) hyperparameters can
# differ in the last bit of a jitted result even when the library's arithmetic is
# the same. With both off, the compiled program computes exactly what the library
# wrote, and the two must agree bit for bit.
_AS_WRITTEN = {"xla_backend_optimization_level": 0, "xla_disable_hlo_passes": "algsimp"}


def _compiled_as_written(fn, *args):
    return jax.jit(fn).lower(*args).compile(_AS_WRITTEN)


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, (ta, tb)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], lb):
        assert x.dtype == y.dtype, (jax.tree_util.keystr(path), x.dtype, y.dtype)
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


@parametrize_opt
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_plain_and_injected_hyperparameters_agree_bit_for_bit(name, factory, kwargs, x64):
    # One arithmetic for a Python float and the traced value inject_hyperparams puts in
    # its state (float32, or float64 under x64): ``1 - b2`` once differed by 1.3e-5
    # relative per step in Shampoo and SOAP. Four steps cross refresh and non-refresh
    # steps; under x64 the params, gradients and injected hyperparameters are float64.
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        params = {"w": jnp.zeros((5, 4), dtype), "b": jnp.zeros(4, dtype)}
        kw = {**kwargs, MOMENTUM_ARG.get(name, "b1"): 0.8}
        plain = build(name, factory, kw)
        injected = with_extra_args(lo.inject_hyperparams(factory)(**kw), EXTRA_ARGS.get(name))
        s1, s2 = plain.init(params), injected.init(params)
        assert all(
            h.dtype == dtype
            for k, h in s2.hyperparams.items()
            if jnp.issubdtype(h.dtype, jnp.floating)
        )
        g0 = _grads(params, 0)
        u1f = _compiled_as_written(plain.update, g0, s1, params)
        u2f = _compiled_as_written(injected.update, g0, s2, params)
        for i in range(4):
            g = _grads(params, i)
            u1, s1 = u1f(g, s1, params)
            u2, s2 = u2f(g, s2, params)
            _assert_trees_equal((u1, s1), (u2, s2.inner_state))


@parametrize_opt
def test_constant_schedule_equals_constant_learning_rate(name, factory, kwargs):
    params = {"w": jnp.zeros((5, 4))}
    lr = kwargs["learning_rate"]
    a = build(name, factory, kwargs)
    b = build(name, factory, kwargs, learning_rate=optax.constant_schedule(lr))
    sa, sb = a.init(params), b.init(params)
    for i in range(3):
        g = _grads(params, i)
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(g, sb, params)
        assert_trees_close(ua, ub, rtol=1e-6, atol=0)


@parametrize_opt
def test_decaying_schedule_is_applied(name, factory, kwargs):
    params = {"w": jnp.zeros((5, 4))}
    sched = optax.linear_schedule(kwargs["learning_rate"], 0.0, 2)
    tx = build(name, factory, kwargs, learning_rate=sched)
    s = tx.init(params)
    for i in range(3):
        u, s = tx.update(_grads(params, i), s, params)
    assert float(jnp.abs(u["w"]).max()) == 0.0


@parametrize_opt
def test_ignores_unknown_extra_args(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = {"w": jnp.zeros((5, 4))}
    s = tx.init(params)
    u, _ = tx.update(_grads(params, 0), s, params, value=jnp.ones([]), some_other_arg=3)
    assert_tree_finite(u)


@parametrize_opt
def test_multisteps_accumulates(name, factory, kwargs):
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    tx = optax.MultiSteps(build(name, factory, kwargs), every_k_schedule=3)
    inner = build(name, factory, kwargs)
    s, si = tx.init(params), inner.init(params)
    update = jax.jit(tx.update)
    grads = [_grads(params, i) for i in range(3)]
    for i, g in enumerate(grads):
        u, s = update(g, s, params)
        if i < 2:
            assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
    mean_g = jax.tree.map(lambda *xs: sum(xs) / 3, *grads)
    want, _ = inner.update(mean_g, si, params)
    assert_trees_close(u, want, rtol=1e-4, atol=1e-6)


@parametrize_opt
def test_masked_and_partition(name, factory, kwargs):
    params = {"a": jnp.zeros((5, 4)), "b": jnp.zeros((3, 3)), "c": jnp.zeros(4)}
    grads = [_grads(params, i) for i in range(3)]
    sub = lambda t: {"a": t["a"], "c": t["c"]}
    # Reference: the optimizer on the unmasked leaves alone.
    ref = build(name, factory, kwargs)
    sr = ref.init(sub(params))
    masked = optax.masked(build(name, factory, kwargs), {"a": True, "b": False, "c": True})
    part = optax.partition(
        {"ours": build(name, factory, kwargs), "sgd": optax.sgd(0.1)},
        {"a": "ours", "b": "sgd", "c": "ours"},
    )
    sm, sp = masked.init(params), part.init(params)
    for g in grads:
        want, sr = ref.update(sub(g), sr, sub(params))
        um, sm = masked.update(g, sm, params)
        up, sp = part.update(g, sp, params)
        assert_trees_close(sub(um), want, rtol=1e-5, atol=1e-7)
        assert_trees_close(sub(up), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(um["b"]), np.asarray(g["b"]))  # passed through
        np.testing.assert_allclose(np.asarray(up["b"]), -0.1 * np.asarray(g["b"]), rtol=1e-6)


@parametrize_opt
def test_vmap_over_independent_states(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    seeds = 3
    batched_params = jax.tree.map(lambda p: jnp.stack([p] * seeds), params)
    states = jax.vmap(tx.init)(batched_params)
    singles = [tx.init(params) for _ in range(seeds)]
    vupdate = jax.jit(jax.vmap(tx.update))
    for i in range(3):
        gs = [_grads(params, 10 * s + i) for s in range(seeds)]
        bg = jax.tree.map(lambda *xs: jnp.stack(xs), *gs)
        bu, states = vupdate(bg, states, batched_params)
        for s in range(seeds):
            u, singles[s] = tx.update(gs[s], singles[s], params)
            assert_trees_close(jax.tree.map(lambda x: x[s], bu), u, rtol=1e-4, atol=1e-6)
    # Under vmap every LAPACK call still factors one matrix (a batched call can
    # hang a 2-core CPU: linalg.one_at_a_time_on_cpu).
    assert_lapack_unbatched(jax.vmap(tx.update), bg, states, batched_params, expect_calls=False)


# ----------------------------------------------------------------------------- dtypes and shapes


@parametrize_opt
def test_bf16_params_give_bf16_updates_and_f32_factors(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), mixed_tree(jax.random.key(0)))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(3):
        u, state = update(_grads(params, i), state, params)
    for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
        assert x.dtype == jnp.bfloat16 and x.shape == p.shape
    inner = main_state(name, state)
    for x in jax.tree.leaves(getattr(inner, "stats", getattr(inner, "factors", None))):
        assert x.dtype == jnp.float32
    assert_tree_finite(u)


@parametrize_opt
def test_mu_dtype_is_honoured(name, factory, kwargs):
    tx = build(name, factory, kwargs, mu_dtype=jnp.bfloat16)
    params = {"w": jnp.zeros((5, 4))}
    state = tx.init(params)
    _, state = tx.update(_grads(params, 0), state, params)
    assert main_state(name, state).mu["w"].dtype == jnp.bfloat16


@parametrize_opt
def test_mixed_tree_shapes_and_policy(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = mixed_tree(jax.random.key(0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(4):
        u, state = update(_grads(params, i), state, params)
        assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
        assert_tree_finite(u)
    inner = main_state(name, state)
    stats = getattr(inner, "stats", getattr(inner, "factors", None))
    if stats is None:  # Muon keeps no factors: nothing more to check.
        return
    # Scalars and vectors have no factors (K-FAC: a bias is a kernel with a unit
    # input); the 5000 axis a diagonal, never a dense one.
    assert all(x.size == 0 for x in stats["scalar"])
    if name.startswith("kfac"):
        assert [x.shape for x in stats["bias"]] == [(1, 1, 1), (1, 7, 7)]
    else:
        assert all(x.size == 0 for x in stats["bias"])
    block = kwargs.get("block_size")
    if name.startswith("kfac"):
        assert stats["long"][0].shape == (1, 5000)  # inputs: diagonal above 4096
        assert stats["conv"][0].shape == (1, 36, 36)  # (kh, kw, c_in) patches
    elif kwargs.get("factor_exponents") == "one_sided":
        # Only the shorter side keeps a factor: the 5000 axis none at all.
        assert [x.shape for x in stats["long"]] == [(1, 0), (1, 3, 3)]
        assert [x.shape for x in stats["conv"]] == [(1, 0), (1, 8, 8)]
    elif block is None:
        assert stats["long"][0].shape == (1, 5000)  # diagonal
        assert stats["conv"][0].shape == (1, 36, 36)  # (3, 3, 4) merged
    else:
        assert stats["long"][0].shape == (-(-5000 // block), block, block)


@parametrize_opt
def test_recovers_after_non_finite_gradients(name, factory, kwargs):
    tx = build(name, factory, kwargs)
    params = mixed_tree(jax.random.key(0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(3):
        _, state = update(_grads(params, i), state, params)
    for bad in (jnp.nan, jnp.inf):
        g = _grads(params, 7)
        g["dense"] = g["dense"].at[0, 0].set(bad)
        g["scalar"] = jnp.asarray(bad)
        u, state = update(g, state, params)
        assert_tree_finite(u)  # faulty leaves get zero updates, the rest stay finite
    assert skipped_count(name, state) == 4
    assert_recovers(update, state, params, functools.partial(_grads, params))


@parametrize_opt
def test_deterministic(name, factory, kwargs):
    params = mixed_tree(jax.random.key(0))

    def run():
        tx = build(name, factory, kwargs)
        s = tx.init(params)
        for i in range(3):
            u, s = jax.jit(tx.update)(_grads(params, i), s, params)
        return u, s

    a, b = run(), run()
    assert_trees_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- optax's contract
#
# The checks of optax/contrib/_common_test.py, which optax's own optimizers pass, on
# every public alias. Per alias, optax's 15 cases map to: extra arguments and no
# recompilation (test_contract_accepts_extra_args_without_recompiling); convergence on
# four targets (test_contract_converges, slow tier: 30 000 steps each, as optax); the
# optimizer built by optax.inject_hyperparams, here without any static_args
# (test_contract_inject_hyperparams_without_static_args); update dtype and
# MultiSteps' zero first update for bfloat16 and float32
# (test_contract_update_dtype_and_multisteps); state dtype stability through lax.cond
# for float16, bfloat16, float32 and float64 (test_state_is_stable_across_steps_and_
# through_cond above); learning-rate schedules
# (test_constant_schedule_equals_constant_learning_rate above).


# Each alias with the settings optax's table would give it: its registry entry's
# ``contract`` keyword arguments (K-FAC, fed identity factors so heavy-ball SGD, and
# steepest descent, normalized steps, get smaller rates for the Rosenbrock target's
# curvature ~1000). Read at call time, so a registered entry takes part.
def _contract(alias):
    """``(alias factory, kwargs)`` of a registry entry's contract settings."""
    entry = _registry.get(alias)
    return entry.alias, dict(entry.contract)


CONTRACT = {e.name: _contract(e.name) for e in _registry.entries() if e.contract is not None}
parametrize_contract = pytest.mark.parametrize("alias", list(CONTRACT))


def _contract_tx(alias, factory=None, **overrides):
    fn, kwargs = _contract(alias)
    tx = (factory or fn)(**{**kwargs, **overrides})
    entry = _registry.get(alias)
    extra = functools.partial(entry.extra_args, contract=True)
    return with_extra_args(tx, extra if entry.conformance_extra_args else None)


def _parabola(dtype):
    target = jnp.array([1.0, -1.0, 1.0], dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype), target, lambda p: jnp.sum((p - target) ** 2)


def _rosenbrock(dtype):
    def loss(p):
        return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

    return jnp.zeros(2, dtype), jnp.array([1.0, 1.0], dtype), loss


def _matrix_parabola(dtype):
    target = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return jnp.zeros((2, 2), dtype), target, lambda p: jnp.sum((p - target) ** 2)


def _mixed_tensors(dtype):
    a, b = jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
    init = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
    return init, (a, b), lambda p: jnp.sum((p[0] - a) ** 2) + jnp.sum((p[1] - b) ** 2)


@parametrize_contract
def test_contract_accepts_extra_args_without_recompiling(alias):
    tx = _contract_tx(alias)
    p0, _, loss = _rosenbrock(jnp.float32)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p, unexpected_extra_args_your_optimizer_doesnt_expect=1)
        return optax.apply_updates(p, u), s

    p, s = p0, tx.init(p0)
    for _ in range(2):
        p, s = step(p, s)
    assert_tree_finite(p)
    p, s = step(p0, tx.init(p0))
    step(p, s)
    assert step._cache_size() == 1


@pytest.mark.slow
@parametrize_contract
@pytest.mark.parametrize(
    "target", [_parabola, _rosenbrock, _matrix_parabola, _mixed_tensors], ids=lambda t: t.__name__
)
def test_contract_converges(alias, target):
    tx = _contract_tx(alias)
    p0, want, loss = target(jnp.float32)

    @jax.jit
    def run(p):
        def step(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=30_000)[0][0]

    assert_trees_close(run(p0), want, rtol=3e-2, atol=3e-2)


@parametrize_contract
def test_contract_inject_hyperparams_without_static_args(alias):
    # How optax users write it: no static_args. Traceable integers (refresh periods,
    # seeds) arrive traced; shape-deciding ones default to None, which optax leaves alone.
    factory, kwargs = _contract(alias)
    injected = _contract_tx(alias, optax.inject_hyperparams(factory))
    plain = _contract_tx(alias)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    s1 = jax.jit(plain.init)(params)
    s2 = jax.jit(injected.init)(params)
    traced = {"seed"} if alias == "psgd_kron" else set(kwargs) - {"precond_update_prob"}
    assert set(s2.hyperparams) >= traced | {"learning_rate"}, sorted(s2.hyperparams)
    u1, s1 = jax.jit(plain.update)(grads, s1, params)
    u2, s2 = jax.jit(injected.update)(grads, s2, params)
    assert_trees_close(u2, u1, rtol=1e-5, atol=0)
    assert_trees_close(s2.inner_state, s1, rtol=1e-5, atol=1e-5)


@parametrize_contract
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract_update_dtype_and_multisteps(alias, dtype):
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    tx = _contract_tx(alias)
    u, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert u.dtype == params.dtype
    multi = optax.MultiSteps(_contract_tx(alias), every_k_schedule=4)
    u, _ = jax.jit(multi.update)(grads, jax.jit(multi.init)(params), params)
    assert u.dtype == params.dtype and not np.any(np.asarray(u, np.float32))


@pytest.mark.skip(
    reason="optax.tree.map_params is not supported: the per-axis factor trees (stats, roots, "
    "bases) hold per-leaf tuples derived from the params' shapes, which map_params would treat "
    "as parameter copies. Decision recorded per STYLE.md 8.3."
)
def test_map_params():  # pragma: no cover
    pass


def test_every_public_alias_is_in_the_conformance_list():
    # Every public alias (registry entries marked public; test_public_api checks they
    # are exactly the public factories) has a default-tier conformance configuration
    # and contract settings.
    aliases = {e.name: e.alias for e in _registry.entries() if e.public and e.alias is not None}
    registered = {f for n, f, _ in OPTIMIZERS if n not in SLOW_VARIANTS}
    for name, fn in aliases.items():
        assert fn in registered, f"{name} has no default-tier conformance configuration"
    assert {f for f, _ in CONTRACT.values()} == set(aliases.values())
    public = {
        n
        for n in lo.__all__
        if not n[0].isupper()
        and not n.startswith(("scale_by", "linalg", "default_", "inject", "static"))
        and n not in PARAM_AND_STATE_HELPERS
        and n not in WRAPPERS_AND_SCHEDULES
    }
    assert public == set(aliases), public
