"""skip_step_on_spikes: the window statistics against NumPy float64, skipped steps leave
the inner state untouched bit for bit, composition with the registry's optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _registry
from tests._helpers import build


def _np_guard(losses, norms, *, window, threshold, warmup):
    """NumPy float64 reference: per step (skipped, mean, std) of the accepted history."""
    history, out = [], []
    for x in zip(losses, norms):
        x = np.asarray(x, np.float64)
        recent = np.asarray(history[-window:], np.float64).reshape(-1, 2)
        n = len(recent)
        mean = recent.mean(0) if n else np.zeros(2)
        std = recent.std(0, ddof=1) if n > 1 else np.zeros(2)
        scale = np.maximum(std, 1e-6 * np.abs(mean))
        spike = not np.all(np.isfinite(x)) or (
            n >= warmup and bool(np.any(x - mean > threshold * scale))
        )
        if not spike:
            history.append(x)
        out.append((spike, mean, std))
    return out


def _sgd_guard(**kw):
    return lo.skip_step_on_spikes(optax.sgd(0.1, momentum=0.9), **kw)


def _run(tx, params, losses, grads):
    state = tx.init(params)
    step = jax.jit(tx.update)
    states, updates = [state], []
    for loss, g in zip(losses, grads):
        u, state = step(g, state, params, value=loss)
        states.append(state)
        updates.append(u)
    return states, updates


def test_hand_computed_sequence():
    # window 3, warmup 2, threshold 3, loss only. History after steps 0-2: [1, 2, 1.5],
    # mean 1.5, std 0.5: 10 is 17 sigma above (skipped); 1.6 is 0.2 sigma (kept, it
    # replaces 1 in the ring: [1.6, 2, 1.5]); NaN is skipped however cold; 3.0 is
    # (3.0 - 1.7) / 0.26458 = 4.9 sigma (skipped); 2.4 is 2.65 sigma (kept).
    tx = _sgd_guard(window=3, threshold=3.0, warmup=2, watch=("loss",))
    params = {"w": jnp.ones(2)}
    g = {"w": jnp.ones(2)}
    losses = [1.0, 2.0, 1.5, 10.0, 1.6, float("nan"), 3.0, 2.4]
    states, updates = _run(tx, params, losses, [g] * len(losses))
    skipped = [
        int(b.failures.skipped) - int(a.failures.skipped) for a, b in zip(states, states[1:])
    ]
    assert skipped == [0, 0, 0, 1, 0, 1, 1, 0]
    np.testing.assert_allclose(np.asarray(states[5].history)[:, 0], [1.6, 2.0, 1.5], rtol=1e-7)
    assert int(states[-1].accepted) == 5 and int(states[-1].count) == 8
    for s, u in zip(skipped, updates):
        assert np.all(np.asarray(u["w"]) == 0) == bool(s)


def test_window_statistics_and_skips_match_numpy_float64():
    rng = np.random.default_rng(0)
    steps, window, threshold, warmup = 40, 6, 4.0, 3
    losses = 2.0 + 0.1 * rng.standard_normal(steps)
    scales = 1.0 + 0.05 * rng.standard_normal(steps)
    losses[[9, 20, 21]] += [3.0, 5.0, 4.0]  # two consecutive spikes: the second must still trip
    scales[[14, 30]] *= [8.0, 10.0]
    losses[25] = np.inf
    base = rng.standard_normal((3, 2))
    grads = [{"w": jnp.asarray(base * s, jnp.float32)} for s in scales]
    norms = [float(np.linalg.norm(np.asarray(g["w"], np.float64))) for g in grads]
    ref = _np_guard(losses, norms, window=window, threshold=threshold, warmup=warmup)

    tx = _sgd_guard(window=window, threshold=threshold, warmup=warmup)
    states, _ = _run(tx, {"w": jnp.zeros((3, 2))}, [float(v) for v in losses], grads)
    got = [int(b.failures.skipped) - int(a.failures.skipped) for a, b in zip(states, states[1:])]
    assert got == [int(s) for s, _, _ in ref]
    assert {9, 14, 20, 21, 25, 30} <= set(np.flatnonzero(got).tolist())
    for state, (_, mean, std) in zip(states[:-1], ref):
        m, s = lo_stats(state)
        np.testing.assert_allclose(m, mean, rtol=1e-5)
        np.testing.assert_allclose(s, std, rtol=1e-4, atol=1e-7)


def lo_stats(state):
    from layerwise_optax import _spike

    mean, std = _spike.window_statistics(state.history, state.accepted)
    return np.asarray(mean, np.float64), np.asarray(std, np.float64)


@pytest.mark.parametrize(
    "config_id",
    ["shampoo", "muon"]
    + [pytest.param(c, marks=pytest.mark.slow) for c in ("soap", "kfac", "psgd_kron")],
)
def test_skipped_step_leaves_the_inner_state_bit_identical(config_id):
    entry = _registry.entry_of_config(config_id)
    kwargs = dict(next(c for c in entry.conformance if c.id == config_id).kwargs)
    inner = build(config_id, entry.alias, kwargs)
    tx = lo.skip_step_on_spikes(inner, window=4, warmup=2, threshold=3.0)
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    key = jax.random.key(0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(4):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, i), p.shape), params)
        _, state = step(g, state, params, value=1.0 + 0.01 * i)
    before = state
    spikes = [
        (jax.tree.map(lambda p: 1e3 * jnp.ones(p.shape), params), 1.0),  # gradient-norm spike
        (jax.tree.map(lambda p: 0.1 * jnp.ones(p.shape), params), 1e4),  # loss spike
        ({"w": jnp.full((4, 3), jnp.nan), "b": jnp.zeros(3)}, 1.0),  # non-finite gradient
    ]
    for k, (g, loss) in enumerate(spikes, 1):
        u, state = step(g, state, params, value=loss)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
        for a, b in zip(jax.tree.leaves(before.inner_state), jax.tree.leaves(state.inner_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(before.history), np.asarray(state.history))
        assert int(state.failures.skipped) == k
    report = lo.failure_report(state)
    guard = [e for e in report.entries if e.algorithm == "spike_guard"]
    assert len(guard) == 1 and guard[0].skipped == 3 and guard[0].steps == 7
    assert report.skipped == 3  # the inner transforms never saw the bad steps
    assert len(report.entries) > 1  # the inner states are reported too
    # A normal step afterwards is taken and matches the inner optimizer run alone.
    g = jax.tree.map(lambda p: 0.5 * jnp.ones(p.shape), params)
    u, _ = step(g, state, params, value=1.02)
    u_ref, _ = jax.jit(inner.update)(g, before.inner_state, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jit_vmap_chain_and_inject_hyperparams():
    params = {"w": jnp.ones((3, 2))}
    inner = lo.shampoo(1e-2, precondition_frequency=2)
    chained = optax.chain(lo.skip_step_on_spikes(inner, window=4, warmup=2), optax.scale(1.0))
    injected = lo.inject_hyperparams(lo.skip_step_on_spikes)(
        inner, window=4, warmup=2, threshold=6.0
    )
    assert lo.static_args(lo.skip_step_on_spikes) == ("window", "watch")
    assert injected.init(params).hyperparams["threshold"].dtype == jnp.float32

    def run(tx, scale):
        state = tx.init(params)
        outs = []
        for i in range(5):
            g = {"w": jnp.full((3, 2), 1.0 + 0.01 * i) * jnp.where(i == 4, scale, 1.0)}
            u, state = tx.update(g, state, params, value=jnp.float32(1.0))
            outs.append(u["w"])
        return jnp.stack(outs), lo.failure_counts(state)[0]

    for tx in (chained, injected):
        us, skipped = jax.jit(jax.vmap(lambda s, tx=tx: run(tx, s)))(jnp.asarray([1.0, 100.0]))
        assert skipped.tolist() == [0, 1]
        assert bool(jnp.all(us[1, 4] == 0)) and bool(jnp.any(us[0, 4] != 0))
        np.testing.assert_array_equal(np.asarray(us[0, :4]), np.asarray(us[1, :4]))


def test_checkpoint_resume_is_bit_identical():
    params = {"w": jnp.ones((3, 2))}
    tx = lo.skip_step_on_spikes(lo.soap(1e-2, precondition_frequency=2), window=3, warmup=2)
    grads = [{"w": jnp.full((3, 2), v)} for v in (1.0, 1.1, 0.9, 50.0, 1.05, 1.0)]
    step = jax.jit(tx.update)

    state = tx.init(params)
    for g in grads:
        u_full, state = step(g, state, params, value=1.0)
    state = tx.init(params)
    for g in grads[:4]:
        _, state = step(g, state, params, value=1.0)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
    for g in grads[4:]:
        u_resumed, restored = step(g, restored, params, value=1.0)
    np.testing.assert_array_equal(np.asarray(u_full["w"]), np.asarray(u_resumed["w"]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.shape == b.shape
    assert int(restored.failures.skipped) == 1


def test_missing_loss_raises_and_grad_norm_only_needs_none():
    params = {"w": jnp.ones(2)}
    tx = lo.skip_step_on_spikes(optax.sgd(0.1))
    with pytest.raises(ValueError, match="value=loss"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    tx = lo.skip_step_on_spikes(optax.sgd(0.1), watch=("grad_norm",))
    u, s = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    assert s.history.shape == (100, 1) and float(s.history[0, 0]) == pytest.approx(2**0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=1), "window"),
        (dict(window=0), "window"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=-2.0), "threshold"),
        (dict(warmup=1), "warmup"),
        (dict(watch=("loss", "lr")), "watch"),
        (dict(watch=()), "watch"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.skip_step_on_spikes(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("mode", ["callback", "checkify"])
def test_raise_on_failure_names_a_skipped_step_as_a_spike(mode):
    from jax.experimental import checkify

    params = {"w": jnp.ones((3, 2))}
    guard = lo.skip_step_on_spikes(optax.sgd(0.1), window=3, warmup=2, watch=("loss",))
    tx = lo.raise_on_failure(guard, mode=mode)
    step = jax.jit(tx.update if mode == "callback" else checkify.checkify(tx.update))
    state = tx.init(params)
    g = {"w": jnp.ones((3, 2))}
    for loss in (1.0, 1.1, 0.9):
        out = step(g, state, params, value=loss)
        if mode == "checkify":
            out[0].throw()
            out = out[1]
        state = out[1]
    with pytest.raises(Exception) as info:
        if mode == "callback":
            jax.block_until_ready(step(g, state, params, value=100.0))
        else:
            step(g, state, params, value=100.0)[0].throw()
    message = str(info.value)
    assert "step 4" in message and "skipped step" in message and "spike" in message
    assert "skipped gradient" not in message
