"""SOAP's adaptive refresh criterion (``refresh_tolerance``, issue 19).

At each scheduled refresh a block keeps its basis ``Q`` when its statistic ``L``
is still (nearly) diagonal in it: refresh only if ``||B - diag B||_F > tol ||B||_F``
with ``B = Q^T L Q`` (Meta's Distributed Shampoo ``tolerance``). The kept
(block, refresh) pairs are counted in ``ScaleBySoapState.refresh_skips``.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerwise_optax as lo
from layerwise_optax import _axes, _kron, _linalg
from tests._helpers import assert_trees_close, run_steps, soap_reference

HP = dict(b1=0.9, b2=0.95, eps=1e-8, factor_decay=0.9)


def _params():
    # Rectangular (both orientations), a conv kernel (3 factors after merging), a
    # vector (no factor) and a leaf longer than max_precond_dim on one axis.
    return {
        "w": jnp.zeros((5, 3)),
        "v": jnp.zeros((3, 6)),
        "conv": jnp.zeros((3, 3, 2, 4)),
        "b": jnp.zeros((4,)),
    }


def _random_grads(params, steps, seed=0):
    return [
        {
            n: jax.random.normal(jax.random.key(100 * seed + 10 * t + i), p.shape)
            for i, (n, p) in enumerate(sorted(params.items()))
        }
        for t in range(steps)
    ]


def _structured_grads(shape, seed=0):
    """Gradients ``U S_t V^T`` with fixed singular vectors, then random ones, then ``U S_t V^T``.

    In the first and last phase the factor statistics stay diagonal in the
    eigenbases of the first step (kept); the random phase moves them (refreshed).
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)

    def structured():
        s = np.zeros((m, n))
        s[np.arange(k), np.arange(k)] = rng.uniform(0.5, 2.0, k) * np.arange(k, 0, -1)
        return (u @ s @ v.T).astype(np.float32)

    def noise():
        return (rng.standard_normal((m, n)) * np.linspace(0.5, 2.0, m)[:, None]).astype(np.float32)

    return (
        [structured() for _ in range(6)]
        + [noise() for _ in range(4)]
        + [structured() for _ in range(4)]
    )


# ------------------------------------------------------------------ None / 0: today's SOAP


def test_none_zero_and_a_traced_zero_are_bit_identical():
    freq = 2  # steps 0 (eigh), 2, 4 (QR) refresh; 1, 3 do not
    params = _params()
    grads = _random_grads(params, 5)
    ref, ref_state = run_steps(lo.soap(1e-2, precondition_frequency=freq), params, grads)
    assert ref_state[0].refresh_skips is None
    zero, zero_state = run_steps(
        lo.soap(1e-2, precondition_frequency=freq, refresh_tolerance=0.0), params, grads
    )
    # Python 0 takes the plain path: same updates, same state tree (no counter).
    assert jax.tree.structure(zero_state) == jax.tree.structure(ref_state)
    # A traced 0 goes through the criterion, which then refreshes every block.
    injected = lo.inject_hyperparams(lo.soap)(
        learning_rate=1e-2, precondition_frequency=freq, refresh_tolerance=0.0
    )
    traced, traced_state = run_steps(injected, params, grads)
    for r, z, t in zip(ref, zero, traced):
        for a, b in ((r, z), (r, t)):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    inner = traced_state.inner_state[0]
    assert int(inner.refresh_skips) == 0
    for x, y in zip(jax.tree.leaves(ref_state[0].bases), jax.tree.leaves(inner.bases)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ the criterion, per block


def test_basis_off_diagonal_matches_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7))
    a = x @ np.swapaxes(x, -1, -2)  # 5 x 5 of rank 5
    q = np.linalg.qr(rng.standard_normal((3, 5, 5)))[0]
    off, total = jax.jit(_linalg.basis_off_diagonal)(
        jnp.asarray(a, jnp.float32), jnp.asarray(q, jnp.float32)
    )
    b = np.swapaxes(q, -1, -2) @ a @ q
    want_off = np.linalg.norm(b - b * np.eye(5), axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(off), want_off, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(total), np.linalg.norm(a, axis=(-2, -1)), rtol=1e-5)


def _stack_plan(stack, n):
    return _axes.make_plan(
        (stack, n),
        _axes.DimensionNumbers(factor_axes=((1,),), batch_axes=(0,)),
        max_precond_dim=1024,
        block_size=None,
    )


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_a_block_diagonal_in_its_basis_keeps_it_and_a_changed_block_is_refreshed(method):
    rng = np.random.default_rng(1)
    n = 4
    q = np.linalg.qr(rng.standard_normal((2, n, n)))[0]
    # Block 0: diagonal in its basis (a small perturbation, 1e-3 relative);
    # block 1: a statistic its basis does not diagonalize.
    s0 = q[0] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ q[0].T
    s0 = s0 + 1e-3 * (q[0][:, :1] @ q[0][:, 1:2].T + q[0][:, 1:2] @ q[0][:, :1].T)
    x = rng.standard_normal((n, n))
    stats = (jnp.asarray(np.stack([s0, x @ x.T]), jnp.float32),)
    prev = (jnp.asarray(q, jnp.float32),)
    plan = _stack_plan(2, n)

    def refresh(tol):
        return jax.jit(
            lambda s, b: _kron.eigenbases_tree(
                {"w": s}, {"w": b}, {"w": plan}, method=method, tolerance=tol
            )
        )(stats, prev)

    bases, perms, failed, kept = refresh(jnp.float32(0.01))
    plain, plain_perms, _, none = refresh(None)
    assert int(failed) == 0 and none["w"] == (None,)
    np.testing.assert_array_equal(np.asarray(kept["w"][0]), [True, False])
    np.testing.assert_array_equal(np.asarray(bases["w"][0][0]), np.asarray(prev[0][0]))
    assert not np.allclose(np.asarray(bases["w"][0][1]), np.asarray(prev[0][1]), atol=1e-2)
    # The refreshed block is the plain refresh's, bit for bit.
    np.testing.assert_array_equal(np.asarray(bases["w"][0][1]), np.asarray(plain["w"][0][1]))
    if method == "qr":
        np.testing.assert_array_equal(np.asarray(perms["w"][0][0]), np.arange(n))
        np.testing.assert_array_equal(
            np.asarray(perms["w"][0][1]), np.asarray(plain_perms["w"][0][1])
        )
    # A looser tolerance keeps both; a batch with nothing to refresh skips its
    # decomposition (lax.cond), and the bases come back unchanged.
    bases, _, _, kept = refresh(jnp.float32(0.99))
    np.testing.assert_array_equal(np.asarray(kept["w"][0]), [True, True])
    np.testing.assert_array_equal(np.asarray(bases["w"][0]), np.asarray(prev[0]))


def test_a_soap_factor_diagonal_in_its_basis_is_not_refreshed():
    # G with orthogonal columns of different norms: G^T G is diagonal in the
    # identity basis (kept at the first refresh), G G^T is not (refreshed).
    rng = np.random.default_rng(2)
    u = np.linalg.qr(rng.standard_normal((5, 3)))[0]
    g = {"w": jnp.asarray(u * np.array([3.0, 2.0, 1.0]), jnp.float32)}
    params = {"w": jnp.zeros((5, 3))}
    tx = lo.scale_by_soap(**HP, precondition_frequency=1, refresh_tolerance=0.01)
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    left, right = state.bases["w"]  # (1, 5, 5) and (1, 3, 3): one block each
    np.testing.assert_array_equal(np.asarray(right[0]), np.eye(3))
    assert not np.allclose(np.asarray(left[0]), np.eye(5), atol=1e-2)
    assert int(state.refresh_skips) == 1
    # The same gradient again: both statistics are now diagonal in their bases.
    _, state = jax.jit(tx.update)(g, state, params)
    assert int(state.refresh_skips) == 3


# ------------------------------------------------------------------ dense float64 reference


@pytest.mark.parametrize("tol", [0.015, 0.12])
@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("shape", [(4, 3), (3, 4)])
def test_matches_the_dense_float64_reference(shape, freq, tol):
    # Rectangular and rank-deficient (the 4 x 4 factor has rank <= 3; first-step
    # null spaces of at most one dimension keep the first eigenbasis unique).
    grads = _structured_grads(shape)
    ratios = []
    want = soap_reference(grads, **HP, freq=freq, tolerance=tol, ratios=ratios)
    # Every decision is clear of the threshold in float64, so float32 agrees on it.
    close = [(t, a, r) for t, a, r in ratios if abs(r - tol) < 0.03 * tol]
    assert not close, close
    kept = sum(r <= tol for _, _, r in ratios)
    assert 0 < kept < len(ratios)  # both decisions happen
    tx = lo.scale_by_soap(**HP, precondition_frequency=freq, refresh_tolerance=tol)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
        u, state = update({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_allclose(
            np.asarray(u["w"]), want[t], rtol=2e-3, atol=2e-4, err_msg=f"step {t}"
        )
    assert int(state.refresh_skips) == kept
    assert int(state.failures.failed) == 0


def test_tolerance_one_keeps_the_identity_bases_so_soap_is_adam():
    # ||B - diag B|| <= ||B|| always: no block is ever refreshed.
    params = _params()
    grads = _random_grads(params, 6)
    ours, state = run_steps(
        lo.soap(1e-2, **HP, precondition_frequency=1, refresh_tolerance=1.0), params, grads
    )
    ref, _ = run_steps(optax.adam(1e-2, b1=HP["b1"], b2=HP["b2"], eps=HP["eps"]), params, grads)
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    # Every full block is kept at each of the 6 refreshes.
    assert int(state[0].refresh_skips) == 6 * _full_blocks(state[0].bases)


def _full_blocks(bases):
    """The number of ``(b, b)`` basis blocks in a SOAP ``bases`` tree."""
    return sum(x.shape[0] for x in jax.tree.leaves(bases) if x.ndim == 3)


# ------------------------------------------------------------------ counter and layouts


def test_counter_with_nnx_state_and_the_owner_layout():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 3, rngs=rngs)
            self.b = nnx.Linear(3, 6, rngs=rngs)

    params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    grads = [
        jax.tree.map(
            lambda p, t=t: jnp.sin(jnp.arange(p.size) * (t + 1.0)).reshape(p.shape), params
        )
        for t in range(5)
    ]
    ref_updates, ref = run_steps(
        lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=0.3, state_layout="replicated"),
        params,
        grads,
    )
    out_updates, out = run_steps(
        lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=0.3, state_layout="owner"),
        params,
        grads,
    )
    assert lo.failure_report(out).ok
    assert int(ref[0].refresh_skips) == int(out[0].refresh_skips) > 0
    for a, b in zip(ref_updates, out_updates):
        assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_owner_layout_on_four_devices_counts_real_blocks_only():
    # 4 devices: each group is padded to a multiple of 4 blocks; padded blocks
    # (identity statistics, always diagonal) must not count, under a mesh and pmap.
    root = pathlib.Path(__file__).resolve().parents[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests._refresh_criterion_worker"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["padding"] > 0
    assert r["replicated"] > 0
    assert r["owner"] == r["replicated"]
    assert r["pmap"] == [r["replicated"]] * 4
    assert r["max_diff"] < 1e-5


def test_injected_tolerance_matches_the_plain_one_and_vmaps():
    params = _params()
    grads = _random_grads(params, 5, seed=1)
    plain, plain_state = run_steps(
        lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=0.2), params, grads
    )
    injected = lo.inject_hyperparams(lo.soap)(
        learning_rate=1e-2, precondition_frequency=1, refresh_tolerance=0.2
    )
    traced, traced_state = run_steps(injected, params, grads)
    for a, b in zip(plain, traced):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    skips = int(plain_state[0].refresh_skips)
    assert skips == int(traced_state.inner_state[0].refresh_skips)

    # vmap over tolerances (lax.cond becomes a select): each matches its own run.
    w, gw = {"w": params["w"]}, [{"w": g["w"]} for g in grads]

    def run(tol):
        tx = lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=tol)
        state = tx.init(w)
        for g in gw:
            _, state = tx.update(g, state, w)
        return state[0].refresh_skips

    _, alone = run_steps(lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=0.2), w, gw)
    counts = jax.jit(jax.vmap(run))(jnp.array([0.0, 0.2, 1.0])).tolist()
    assert counts == [0, int(alone[0].refresh_skips), 2 * len(gw)]


# ------------------------------------------------------------------ with KL-SOAP


def test_kl_soap_with_tolerance_zero_is_kl_soap_bit_for_bit():
    # Python 0 takes the plain path; a traced 0 goes through the criterion and
    # refreshes every block: both are KL-SOAP without it, updates and state.
    params = _params()
    grads = _random_grads(params, 5, seed=2)
    kl = dict(precondition_frequency=2, factor_estimation="kl", damping=1e-3)
    ref, ref_state = run_steps(lo.soap(1e-2, **kl), params, grads)
    zero, zero_state = run_steps(lo.soap(1e-2, **kl, refresh_tolerance=0.0), params, grads)
    injected = lo.inject_hyperparams(lo.soap)(learning_rate=1e-2, **kl, refresh_tolerance=0.0)
    traced, traced_state = run_steps(injected, params, grads)
    inner = traced_state.inner_state[0]
    assert int(inner.refresh_skips) == 0
    for a, b in ((ref, zero), (ref, traced), (ref_state, zero_state)):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    for field in ("stats", "bases", "nu"):
        jax.tree.map(
            lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
            getattr(ref_state[0], field),
            getattr(inner, field),
        )


@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_kl_soap_with_tolerance_one_keeps_every_basis_against_float64(shape):
    # ||B - diag B|| <= ||B|| always: no refresh, not even the first; the bases stay
    # the identity, so the updates are Adam's, and the KL statistics use the
    # inverses diag(diag L_j + δ_j)^{-1} (identity while L_j is all zero).
    hp = dict(b1=0.9, b2=0.95, eps=1e-8, factor_decay=0.9, damping=1e-3)
    grads = _structured_grads(shape, seed=3)[:6]
    tx = lo.scale_by_soap(
        **hp, precondition_frequency=1, factor_estimation="kl", refresh_tolerance=1.0
    )
    params = {"w": jnp.zeros(shape)}
    ours, state = run_steps(tx, params, [{"w": jnp.asarray(g)} for g in grads])
    adam = optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])
    ref, _ = run_steps(adam, params, [{"w": jnp.asarray(g)} for g in grads])
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    assert int(state.refresh_skips) == 2 * len(grads)  # 2 factors x 6 refreshes
    assert int(state.failures.failed) == 0 and int(state.failures.skipped) == 0
    for q, n in zip(state.bases["w"], shape):
        np.testing.assert_array_equal(np.asarray(q[0]), np.eye(n))

    def inverse(s):
        if not np.any(s):
            return np.eye(len(s))
        lam = np.maximum(np.diag(s), 0.0)
        return np.diag(1.0 / (lam + hp["damping"] * lam.max()))

    stats = [np.zeros((n, n)) for n in shape]
    for g in grads:
        g = np.asarray(g, np.float64)
        left, right = inverse(stats[0]), inverse(stats[1])
        new = [g @ right @ g.T / shape[1], g.T @ left @ g / shape[0]]
        stats = [hp["factor_decay"] * s + (1 - hp["factor_decay"]) * x for s, x in zip(stats, new)]
    for got, want in zip(state.stats["w"], stats):
        np.testing.assert_allclose(
            np.asarray(got[0]), want, rtol=2e-4, atol=1e-6 * np.abs(want).max()
        )


def test_kl_soap_with_a_tolerance_runs_and_counts():
    params = _params()
    grads = _random_grads(params, 6, seed=4)
    kl = dict(precondition_frequency=1, factor_estimation="kl")
    ref, _ = run_steps(lo.soap(1e-2, **kl), params, grads)
    ours, state = run_steps(lo.soap(1e-2, **kl, refresh_tolerance=0.1), params, grads)
    assert lo.failure_report(state).ok
    assert 0 < int(state[0].refresh_skips) < 6 * _full_blocks(state[0].bases)
    for u in ours:
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    # Kept bases change the steps (else the criterion would be a no-op here).
    assert any(
        not np.allclose(np.asarray(x), np.asarray(y))
        for a, b in zip(ours, ref)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(
    "bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True, [0.1], jnp.zeros(2)]
)
@pytest.mark.parametrize("factory", [lo.soap, lo.scale_by_soap])
def test_invalid_tolerance_raises_naming_it(factory, bad):
    args = (1e-2,) if factory is lo.soap else ()
    with pytest.raises(ValueError, match="refresh_tolerance"):
        factory(*args, refresh_tolerance=bad)
