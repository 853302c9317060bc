"""The library's optimizers inside optax's wrappers (issue 19, item 7).

``optax.contrib.schedule_free``, ``optax.contrib.sam``, ``optax.apply_if_finite`` and
``optax.MultiSteps`` around the registry's aliases: each either matches a hand-rolled
reference of what the wrapper defines, or (schedule-free, whose iterates have no
simpler reference) trains a tiny problem and keeps its evaluation point distinct.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _registry

_LEFT = jnp.asarray(np.diag(np.logspace(0, 1, 5)), jnp.float32)
_TARGET = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
_PARAMS = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
# The exact Hessian of the kernel's loss is (L^T L) ⊗ I: K-FAC's factors.
_KFAC_STATS = {"w": lo.KfacFactors(_LEFT.T @ _LEFT, jnp.eye(4)), "b": None}


def _loss(p):
    r = _LEFT @ (p["w"] - _TARGET)
    return 0.5 * jnp.sum(r**2) + 0.5 * jnp.sum((p["b"] - 1.0) ** 2)


def _alias(config_id, **overrides):
    entry = _registry.entry_of_config(config_id)
    kwargs = dict(next(c for c in entry.conformance if c.id == config_id).kwargs)
    assert entry.alias is not None
    return entry.alias(**{**kwargs, **overrides}), kwargs["learning_rate"]


def _extra(config_id):
    return {"kfac_stats": _KFAC_STATS} if config_id.startswith("kfac") else {}


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- schedule-free

_SLOW = pytest.mark.slow
SCHEDULE_FREE = ["shampoo", pytest.param("soap", marks=_SLOW), "kfac", "muon"]
SCHEDULE_FREE += [pytest.param("psgd_kron", marks=_SLOW)]


@pytest.mark.parametrize("config_id", SCHEDULE_FREE)
def test_schedule_free_around_each_alias(config_id):
    base, lr = _alias(config_id)
    tx = optax.contrib.schedule_free(base, learning_rate=lr, b1=0.9)
    extra = _extra(config_id)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(_loss)(p)
            u, s = tx.update(g, s, p, **extra)
            return (optax.apply_updates(p, u), s), value

        (p, s), values = jax.lax.scan(step, (params, tx.init(params)), None, length=150)
        return p, s, values

    train, state, values = run(_PARAMS)
    evaluated = optax.contrib.schedule_free_eval_params(state, train)
    first = float(values[0])
    assert float(values[-1]) < 0.2 * first, (first, float(values[-1]))
    assert float(_loss(evaluated)) < 0.2 * first, (first, float(_loss(evaluated)))
    # Schedule-free trains at y = (1 - b1) z + b1 x and evaluates at x: distinct points.
    assert float(jnp.max(jnp.abs(evaluated["w"] - train["w"]))) > 1e-6
    np.testing.assert_allclose(
        np.asarray(train["w"]), np.asarray(0.1 * state.z["w"] + 0.9 * evaluated["w"]), atol=1e-5
    )
    assert lo.failure_report(state).ok
    assert any(e.steps == 150 for e in lo.failure_report(state).entries)


# ----------------------------------------------------------------------------- SAM

_RHO = 0.05


def _adversary():
    return optax.chain(optax.contrib.normalize(), optax.sgd(_RHO))


@pytest.mark.parametrize("config_id", ["shampoo", "muon"])
def test_sam_matches_a_hand_rolled_reference(config_id):
    outer, _ = _alias(config_id)
    steps = 4
    grad = jax.jit(jax.grad(_loss))

    # Tolerances 1e-4: the wrappers sum in other orders (the transparent mode applies
    # cache - params + u), and Shampoo's refreshes amplify last-bit differences.
    # Reference: g at p, ascend to p + rho g / ||g||, the outer optimizer takes the
    # gradient there.
    p, s = _PARAMS, outer.init(_PARAMS)
    outer_update = jax.jit(outer.update)
    for _ in range(steps):
        g = grad(p)
        norm = optax.tree.norm(g)
        g_adv = grad(jax.tree.map(lambda x, d: x + _RHO * d / norm, p, g))
        u, s = outer_update(g_adv, s, p)
        p = optax.apply_updates(p, u)
    reference, reference_state = p, s

    opaque = optax.contrib.sam(outer, _adversary(), sync_period=2, opaque_mode=True)
    p, s = _PARAMS, opaque.init(_PARAMS)
    update = jax.jit(functools.partial(opaque.update, grad_fn=lambda q, _: jax.grad(_loss)(q)))
    for _ in range(steps):
        u, s = update(grad(p), s, p)
        p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p, reference)

    # Transparent mode: adversarial and outer calls alternate; the outer state only
    # moves on the outer calls, so it ends where the reference's does.
    transparent = optax.contrib.sam(outer, _adversary(), sync_period=2)
    p, s = _PARAMS, transparent.init(_PARAMS)
    update = jax.jit(transparent.update)
    for _ in range(2 * steps):
        u, s = update(grad(p), s, p)
        p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p, reference)
    ours = [e for e in lo.failure_report(s.opt_state).entries if e.steps]
    assert ours and all(e.steps == steps for e in ours)
    assert [e.steps for e in lo.failure_report(reference_state).entries] == [
        e.steps for e in lo.failure_report(s.opt_state).entries
    ]


# ----------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize(
    "config_id", ["shampoo", pytest.param("soap", marks=_SLOW), "kfac", "muon"]
)
def test_apply_if_finite_keeps_our_state_and_counts(config_id):
    inner, _ = _alias(config_id)
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    extra = _extra(config_id)
    update = jax.jit(functools.partial(tx.update, **extra)) if extra else jax.jit(tx.update)
    p, s = _PARAMS, tx.init(_PARAMS)
    for _ in range(3):
        u, s = update(jax.grad(_loss)(p), s, p)
        p = optax.apply_updates(p, u)
    before = s
    bad = {"w": jnp.full((5, 4), jnp.nan), "b": jnp.ones(4)}
    u, s = update(bad, s, p)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    _leaves_equal(before.inner_state, s.inner_state)
    assert int(s.notfinite_count) == 1 and int(s.total_notfinite) == 1
    # The library's own counters never saw the step (apply_if_finite discarded it).
    assert lo.failure_report(s).skipped == 0
    # A good step afterwards equals the inner optimizer's from the kept state.
    g = jax.grad(_loss)(p)
    u, s = update(g, s, p)
    u_ref, _ = jax.jit(functools.partial(inner.update, **extra))(g, before.inner_state, p)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u, u_ref)
    assert int(s.notfinite_count) == 0 and int(s.total_notfinite) == 1


# ----------------------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize("config_id", ["shampoo", pytest.param("soap", marks=_SLOW), "kfac"])
def test_multi_steps_with_a_refresh_inside_the_accumulation(config_id):
    # k = 3 mini-steps per update and a refresh every 2 inner steps: the inner
    # optimizer is called (and would refresh) on mini-steps whose state MultiSteps
    # discards. The emitted updates must equal accumulate-then-step by hand.
    inner, _ = _alias(config_id, precondition_frequency=2)
    k, emits = 3, 4
    extra = _extra(config_id)
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    rng = np.random.default_rng(1)
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), _PARAMS)
        for _ in range(k * emits)
    ]
    update = jax.jit(functools.partial(tx.update, **extra))
    inner_update = jax.jit(functools.partial(inner.update, **extra))
    s, s_ref = tx.init(_PARAMS), inner.init(_PARAMS)
    for i, g in enumerate(grads):
        u, s = update(g, s, _PARAMS)
        if (i + 1) % k:
            assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u)), i
            continue
        # The mean in optax's order (a running mean): Shampoo's first refresh turns a
        # last-bit difference of the mean (sum / k) into ~0.5% of the update.
        mean = jax.tree.map(jnp.zeros_like, _PARAMS)
        for n, g_n in enumerate(grads[i + 1 - k : i + 1]):
            mean = jax.tree.map(lambda a, b, n=n: a + (b - a) / (n + 1), mean, g_n)
        u_ref, s_ref = inner_update(mean, s_ref, _PARAMS)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), u, u_ref)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        s.inner_opt_state,
        s_ref,
    )
    assert [e.steps for e in lo.failure_report(s).entries if e.steps] == [emits]
