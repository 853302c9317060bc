"""Reliability: the failure report, ill-conditioned statistics, checkpoint/resume, determinism.

Fault injection over generated inputs is in ``test_properties.py``; configuration
errors are in ``test_config_errors.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental import checkify

import layerwise_optax as lo
from layerwise_optax import _axes, _kron
from tests._helpers import build, mixed_tree, optimizer_params, random_psd

parametrize_opt = pytest.mark.parametrize("name,factory,kwargs", optimizer_params())


def _grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    keys = jax.tree.unflatten(jax.tree.structure(params), list(keys))
    return jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype), params, keys)


# ----------------------------------------------------------------------------- report


def test_failure_report_reads_every_transform_in_a_chain():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "s": jnp.ones(())}
    tx = optax.chain(optax.clip_by_global_norm(1.0), lo.muon(1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = _grads(params, 0)
    _, state = update(g, state, params)
    assert lo.failure_report(state).ok
    bad = {**g, "w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"].at[1].set(jnp.inf)}
    # clip_by_global_norm turns the whole tree non-finite: every leaf is skipped.
    _, state = update(bad, state, params)
    report = lo.failure_report(state)
    assert (report.skipped, report.failed) == (3, 0)
    by_algorithm = {e.algorithm: e for e in report.entries}
    assert by_algorithm["muon"].skipped == 1 and by_algorithm["adam"].skipped == 2
    assert by_algorithm["muon"].steps == 2
    table = str(report)
    assert "muon" in table and "adam" in table and "skipped" in table
    assert set(report.as_dict()) == {e.path for e in report.entries}
    skipped, failed = jax.jit(lo.failure_counts)(state)
    assert (int(skipped), int(failed)) == (3, 0)


def test_failure_report_counts_failed_refreshes():
    # A corrupted statistic (as a bit flip in memory would leave it): its refresh
    # is not finite, so the previous root is kept and the failure counted.
    tx = lo.shampoo(1e-2, precondition_frequency=1)
    params = {"w": jnp.ones((3, 2))}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones((3, 2))}, state, params)
    stats = state[0].stats["w"]
    poisoned = state[0]._replace(stats={"w": (stats[0].at[0, 0, 0].set(jnp.nan), stats[1])})
    state = (poisoned,) + tuple(state[1:])
    _, state = tx.update({"w": jnp.ones((3, 2))}, state, params)
    report = lo.failure_report(state)
    assert report.failed == 1 and report.skipped == 0
    assert np.isfinite(np.asarray(state[0].roots["w"][0])).all()


def test_failure_report_without_library_state():
    report = lo.failure_report(optax.adam(1e-3).init({"w": jnp.ones(3)}))
    assert report.entries == () and report.ok
    assert "no layerwise_optax state" in str(report)


def _raised(mode, step, *args):
    """The message a raise_on_failure step raises, as the user sees it."""
    with pytest.raises(Exception) as info:
        if mode == "callback":
            jax.block_until_ready(step(*args))
        else:
            err, _ = step(*args)
            err.throw()
    return info.value, str(info.value)


@pytest.mark.parametrize("mode", ["callback", "checkify"])
def test_raise_on_failure_names_the_step_the_event_and_the_leaf(mode):
    params = {"enc": {"w": jnp.ones((3, 2))}, "b": jnp.ones(3)}
    tx = lo.raise_on_failure(lo.shampoo(1e-2), mode=mode)
    state = tx.init(params)
    step = tx.update if mode == "callback" else checkify.checkify(tx.update)
    step = jax.jit(step)
    good = {"enc": {"w": jnp.ones((3, 2))}, "b": jnp.ones(3)}
    bad = {"enc": {"w": jnp.full((3, 2), jnp.nan)}, "b": jnp.ones(3)}
    for _ in range(2):
        out = step(good, state, params)
        if mode == "checkify":
            out[0].throw()
            out = out[1]
        state = out[1]
    error, message = _raised(mode, step, bad, state, params)
    if mode == "callback":
        # Under jit the host exception arrives wrapped; its text must survive.
        assert isinstance(error, jax.errors.JaxRuntimeError)
    assert "step 3" in message
    assert "skipped gradient" in message
    assert "['enc']['w']" in message and "['b']" not in message


@pytest.mark.parametrize("mode", ["callback", "checkify"])
def test_raise_on_failure_names_the_failed_refresh_and_its_state(mode):
    # Statistics corrupted as a bad restore would: the next refresh fails.
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    tx = lo.raise_on_failure(lo.shampoo(1e-2, precondition_frequency=1), mode=mode)
    g = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update(g, state, params)
    inner = state[0]
    stats = dict(inner.stats, w=(jnp.full_like(inner.stats["w"][0], jnp.nan), inner.stats["w"][1]))
    state = (inner._replace(stats=stats),) + tuple(state[1:])
    step = tx.update if mode == "callback" else checkify.checkify(tx.update)
    _, message = _raised(mode, jax.jit(step), g, state, params)
    assert "step 2" in message
    assert "failed refresh" in message and "shampoo" in message and "skipped" not in message
    assert "state [0]" in message
    assert ".stats['w'][0]" in message


def test_raise_on_failure_keeps_the_inner_state_and_rejects_bad_mode():
    params = {"w": jnp.ones((3, 2))}
    inner = lo.soap(1e-2)
    wrapped = lo.raise_on_failure(inner)
    assert jax.tree.structure(wrapped.init(params)) == jax.tree.structure(inner.init(params))
    with pytest.raises(ValueError, match="mode"):
        lo.raise_on_failure(inner, mode="print")


# ----------------------------------------------------------------------------- ill-conditioning

N = 16


def _hard_matrices(rng):
    """Condition numbers 1..1e12 at three scales, zero rows, singular and all-zero factors."""
    mats, names = [], []
    for cond in (1.0, 1e3, 1e6, 1e9, 1e12):
        for scale in (1e-20, 1.0, 1e20):
            mats.append(scale * random_psd(rng, N, cond))
            names.append(f"cond{cond:g}x{scale:g}")
    a = random_psd(rng, N, 10.0)
    a[:3, :] = 0.0
    a[:, :3] = 0.0
    mats.append(a)
    names.append("zero_rows")
    v = rng.standard_normal(N)
    mats.append(np.outer(v, v))
    names.append("rank_one")
    mats.append(random_psd(rng, N, 10.0, rank=N // 2))
    names.append("rank_half")
    mats.append(np.zeros((N, N)))
    names.append("all_zero")
    return np.stack(mats).astype(np.float32), names


def _stack_plan(stack):
    """The plan of ``stack`` independent N x N factors (one full dimension)."""
    return _axes.make_plan(
        (stack, N),
        _axes.DimensionNumbers(factor_axes=((1,),), batch_axes=(0,)),
        max_precond_dim=1024,
        block_size=None,
    )


ROOT_METHODS = [
    ("eigh", 2),
    ("eigh", 4),
    ("eigh", 1),
    ("newton", 2),
    ("newton", 4),
    ("cholesky", 1),
]


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
@pytest.mark.parametrize("method,root", ROOT_METHODS, ids=lambda x: str(x))
def test_inverse_roots_finite_and_bounded_on_hard_statistics(method, root, relative):
    rng = np.random.default_rng(0)
    mats, names = _hard_matrices(rng)
    stack = len(mats)
    plan = _stack_plan(stack)
    damping = 1e-6 if relative else 1e-3
    prev = (jnp.broadcast_to(jnp.eye(N), (stack, N, N)),)
    fn = jax.jit(
        lambda s, p: _kron.inverse_roots_tree(
            {"w": s},
            {"w": p},
            {"w": plan},
            root=lambda _: root,
            damping=damping,
            relative_damping=relative,
            method=method,
        )
    )
    roots, failures = fn((jnp.asarray(mats),), prev)
    roots = np.asarray(roots["w"][0], np.float64)
    assert np.isfinite(roots).all()
    eps, tiny = np.finfo(np.float32).eps, np.finfo(np.float32).tiny
    kept = []
    for a, r, name in zip(mats.astype(np.float64), roots, names):
        lam_max = np.linalg.eigvalsh(a)[-1]
        delta = damping * lam_max if relative else damping
        # The smallest damped eigenvalue the library allows: delta, floored at
        # eps * lambda_max (and the smallest normal float for all-zero factors).
        floor = max(delta, eps * lam_max * 0.5, tiny)
        bound = floor ** (-1.0 / root)
        norm = np.linalg.norm(r, 2)
        if method == "cholesky" and np.array_equal(r, np.eye(N)):
            # Cholesky has no eigenvalue floor: an undamped singular factor, or a
            # damping below float32 resolution, fails and keeps the previous root.
            kept.append(name)
            continue
        assert norm <= 1.05 * bound, (name, norm, bound)
        # Symmetric positive definite, as a preconditioner must be.
        assert np.allclose(r, r.T, rtol=1e-3, atol=1e-3 * norm), name
        assert np.linalg.eigvalsh((r + r.T) / 2)[0] > -1e-3 * norm, name
    assert int(failures) == len(kept)
    if method == "cholesky":
        # Relative damping: only the all-zero factor (no scale to damp by).
        # Absolute 1e-3 against eigenvalues of 1e20 is below float32 resolution.
        expected = {"all_zero"} if relative else {"cond1e+09x1e+20", "cond1e+12x1e+20"}
        assert set(kept) == expected, kept
    else:
        assert not kept


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_soap_eigenbases_orthonormal_on_hard_statistics(method):
    rng = np.random.default_rng(1)
    mats, names = _hard_matrices(rng)
    stack = len(mats)
    plan = _stack_plan(stack)
    prev = (jnp.broadcast_to(jnp.eye(N), (stack, N, N)),)
    bases, _, failures, _ = jax.jit(
        lambda s, q: _kron.eigenbases_tree({"w": s}, {"w": q}, {"w": plan}, method=method)
    )((jnp.asarray(mats),), prev)
    assert int(failures) == 0
    for q, name in zip(np.asarray(bases["w"][0], np.float64), names):
        assert np.abs(q.T @ q - np.eye(N)).max() < 1e-4, name


@parametrize_opt
def test_ill_conditioned_gradients_keep_every_optimizer_finite(name, factory, kwargs):
    # Gradient columns scaled over 6 decades (second moments over 12), one
    # exactly zero row and column, and every fourth step a rank-one gradient.
    rng = np.random.default_rng(2)
    scales = np.logspace(0, -6, 12)
    tx = build(name, factory, kwargs)
    params = {"w": jnp.zeros((10, 12)), "conv": jnp.zeros((3, 3, 2, 12))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(12):
        g = {}
        for k, p in params.items():
            x = rng.standard_normal(p.shape) * scales
            if t % 4 == 3:
                x = np.ones(p.shape) * scales
            x[..., 0] = 0.0
            x = x.reshape(p.shape)
            g[k] = jnp.asarray(x, jnp.float32)
        u, state = update(g, state, params)
        for x in jax.tree.leaves(u):
            x = np.asarray(x)
            assert np.isfinite(x).all() and np.abs(x).max() < 1e3
    assert lo.failure_report(state).skipped == 0


# ----------------------------------------------------------------------------- checkpoints


def _run(update, state, params, seeds):
    outs = []
    for s in seeds:
        u, state = update(_grads(params, s), state, params)
        outs.append(u)
    return outs, state


def _bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@parametrize_opt
def test_checkpoint_resume_is_bit_identical(name, factory, kwargs, tmp_path):
    params = mixed_tree(jax.random.key(0))
    # bfloat16 params too: the checkpoint must keep every dtype.
    params["dense"] = params["dense"].astype(jnp.bfloat16)
    tx = build(name, factory, kwargs)
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    # 6 steps; the interrupted run stops after 3. Every alias refreshes inside
    # the resumed interval (frequency 2 or 3, PSGD fits every step, drawing
    # from the key saved in the state).
    full_updates, full_state = _run(update, state0, params, range(6))
    first, mid_state = _run(update, state0, params, range(3))

    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "state"
    checkpointer.save(path, lo.checkpointable(mid_state))
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(tx.init, params)
    restored = lo.restore_state(abstract, checkpointer.restore(path))
    _bitwise_equal(restored, mid_state)
    second, resumed_state = _run(update, restored, params, range(3, 6))
    _bitwise_equal(first + second, full_updates)
    _bitwise_equal(resumed_state, full_state)
    checkpointer.close()


@pytest.mark.parametrize(
    "factory,saved,loaded,fragment",
    [
        (lo.shampoo, dict(block_size=3), dict(), "stats"),
        (lo.shampoo, dict(grafting="sgd"), dict(grafting="adam"), "nu"),
        (lo.soap, dict(max_precond_dim=4), dict(), "bases"),
        (lo.psgd_kron, dict(max_precond_dim=4), dict(), "q"),
        (lo.muon, dict(mu_dtype=jnp.bfloat16), dict(), "mu"),
        (lo.normuon, dict(), dict(), None),
    ],
)
def test_restore_with_other_static_settings_names_the_path(
    factory, saved, loaded, fragment, tmp_path
):
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
    old = factory(1e-2, **saved)
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "state"
    checkpointer.save(path, lo.checkpointable(old.init(params)))
    checkpointer.wait_until_finished()
    new = factory(1e-2, **loaded) if fragment else lo.muon(1e-2)
    abstract = jax.eval_shape(new.init, params)
    with pytest.raises(ValueError, match="does not match this optimizer") as err:
        lo.restore_state(abstract, checkpointer.restore(path))
    message = str(err.value)
    assert "static settings" in message
    if fragment:
        assert fragment in message
    else:  # NorMuon's nu is missing from Muon's state.
        assert "nu" in message and "not in this optimizer's state" in message
    checkpointer.close()


def test_check_state_accepts_metadata_and_eval_shape():
    tx = lo.shampoo(1e-2)
    params = {"w": jnp.ones((6, 5))}
    lo.check_state(jax.eval_shape(tx.init, params), tx.init(params))
    other = jax.eval_shape(lo.shampoo(1e-2, block_size=2).init, params)
    with pytest.raises(ValueError, match=r"stats/w/0: the checkpoint has \(9, 2, 2\) float32"):
        lo.check_state(jax.eval_shape(tx.init, params), other)


# ----------------------------------------------------------------------------- determinism


def test_psgd_randomness_comes_only_from_its_key():
    params = {"w": jnp.zeros((6, 5)), "conv": jnp.zeros((3, 3, 2, 4)), "b": jnp.zeros(5)}
    grads = _grads(params, 1)

    def run(tx, update):
        state = tx.init(params)
        for _ in range(4):
            u, state = update(grads, state, params)
        return u, state

    tx0 = lo.psgd_kron(3e-2, precond_update_prob=0.5, max_precond_dim=1024, seed=0)
    tx1 = lo.psgd_kron(3e-2, precond_update_prob=0.5, max_precond_dim=1024, seed=1)
    update0 = jax.jit(tx0.update)
    # The same seed twice (fresh states), and another seed.
    a, b, c = run(tx0, update0), run(tx0, update0), run(tx1, jax.jit(tx1.update))
    _bitwise_equal(a, b)
    different = [
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a[1][0].q), jax.tree.leaves(c[1][0].q))
    ]
    assert any(different)
