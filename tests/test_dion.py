"""Dion against a dense float64 NumPy reference, its limits, and its sharded step."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo
from layerwise_optax import _dion

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = {"w": lo.DimensionNumbers(((0,), (1,)))}
SHAPES = [(4, 3), (3, 5), (6, 4)]
RANKS = [1, 2, None]  # None: full rank
F32 = np.finfo(np.float32)


# ----------------------------------------------------------------------------- the reference


def np_cholesky_qr(x, passes=2, shift=10.0):
    """Shifted CholeskyQR2 in float64, with the float32 shift the transform uses;
    the first pass drops (zeros) columns the shift shrinks below norm 1/2."""

    def inv_factor(c, delta):
        return np.linalg.inv(np.linalg.cholesky(c + delta * np.eye(c.shape[0])))

    for k in range(passes):
        c = x.T @ x
        delta = shift * F32.eps * np.trace(c) + F32.tiny
        inv = inv_factor(c, delta)
        if k == 0:
            keep = np.diag(inv @ c @ inv.T) > 0.5  # the column norms of x @ inv.T
            x = x * keep
            inv = inv_factor(c * np.outer(keep, keep), delta)
        x = x @ inv.T
    return x


def np_dion_step(m, q, g, mu, eps=1e-8, scale=1.0):
    """One step of the algorithm, dense float64: ``(update, M, Q, P)``."""
    b = m + g
    p = np_cholesky_qr(b @ q)
    r = b.T @ p
    m_new = b - (1 - mu) * p @ r.T
    norm = np.linalg.norm(r, axis=0, keepdims=True)
    q_new = np.where(norm > 0, r / (norm + eps), q)
    return scale * p @ q_new.T, m_new, q_new, p


def _f64(x):
    return np.asarray(x, np.float64)


def _rel(got, want):
    want = _f64(want)
    scale = np.linalg.norm(want)
    err = np.linalg.norm(_f64(got) - want)
    return err / scale if scale > 0 else err


def _tx(**kw):
    return lo.scale_by_dion(dimension_numbers=SPEC, **kw)


def _rank(shape, rank):
    return min(shape) if rank is None else rank


# ----------------------------------------------------------------------------- dense reference


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"rank{r or 'full'}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_dense_reference_over_steps(shape, rank):
    # Zero gradients at step 1 (B = 0: zero update, Q kept) and mid-run (B = M).
    rng = np.random.default_rng(sum(shape) + (rank or 0))
    grads = [np.zeros(shape)] + [rng.standard_normal(shape) for _ in range(3)]
    grads.insert(3, np.zeros(shape))
    tx = _tx(rank=rank, mu=0.9, scaling="width")
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    assert state.q["w"].shape == (1, shape[1], _rank(shape, rank))
    m, q = np.zeros(shape), _f64(state.q["w"][0])
    scale = max(1.0, shape[1] / shape[0]) ** 0.5
    update = jax.jit(tx.update)
    for i, g in enumerate(grads):
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        want, m, q, _ = np_dion_step(m, q, g, 0.9, scale=scale)
        if i == 0:
            assert np.all(np.asarray(u["w"]) == 0)
        assert _rel(u["w"], want) < 1e-5, (i, _rel(u["w"], want))
        assert _rel(state.mu["w"], m) < 1e-5, (i, _rel(state.mu["w"], m))
        assert _rel(state.q["w"][0], q) < 1e-5, (i, _rel(state.q["w"][0], q))
    assert int(state.count) == len(grads)
    assert [int(c) for c in state.failures] == [0, 0]


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"rank{r or 'full'}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rank_one_gradient(shape, rank):
    # B = G = u v^T: rank(B) = 1 <= r. The update is u v^T (times the scale) and
    # the columns of P past the first are ~0 (shifted Cholesky QR), so nothing is
    # NaN; compared with the reference on this step, from the same state.
    rng = np.random.default_rng(7)
    u_, v_ = rng.standard_normal(shape[0]), rng.standard_normal(shape[1])
    g = 3.0 * np.outer(u_, v_)
    tx = _tx(rank=rank, mu=0.5, scaling="none")
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    q0 = _f64(state.q["w"][0])
    u, state = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, state, params)
    want, m, _, _ = np_dion_step(np.zeros(shape), q0, g, 0.5)
    assert np.all(np.isfinite(np.asarray(u["w"])))
    assert _rel(u["w"], want) < 1e-5, _rel(u["w"], want)
    assert _rel(state.mu["w"], m) < 1e-5, _rel(state.mu["w"], m)
    polar = np.outer(u_ / np.linalg.norm(u_), v_ / np.linalg.norm(v_))
    assert _rel(u["w"], polar) < 1e-5
    assert [int(c) for c in state.failures] == [0, 0]


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_rank_converges_to_the_polar_factor(shape):
    # mu = 0 at full rank leaves M = B - P P^T B = 0, so B = G every step and Dion
    # is a subspace iteration on G: P Q^T -> U V^T. Singular values 3, 1.5, 0.75
    # (ratio 1/2: error ~ 4^-30 after 30 steps). The oracle is the SVD.
    rng = np.random.default_rng(5)
    k = min(shape)
    a, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    b, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    g = a @ np.diag(3.0 * 0.5 ** np.arange(k)) @ b.T
    u_svd, _, vt_svd = np.linalg.svd(g, full_matrices=False)
    tx = _tx(mu=0.0, scaling="none")
    params = {"w": jnp.zeros(shape)}
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(30):
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    assert _rel(u["w"], u_svd @ vt_svd) < 1e-5, _rel(u["w"], u_svd @ vt_svd)
    assert float(jnp.max(jnp.abs(state.mu["w"]))) < 1e-5 * np.abs(g).max()
    # Muon with the cubic Newton-Schulz iteration run to convergence (40 steps) on
    # the first, bias-corrected momentum (= G) computes U V^T too.
    muon = lo.scale_by_muon(
        ns_coeffs="cubic", ns_steps=40, nesterov=False, scaling="none", dimension_numbers=SPEC
    )
    m_u, _ = muon.update({"w": jnp.asarray(g, jnp.float32)}, muon.init(params), params)
    assert _rel(u["w"], m_u["w"]) < 1e-5, _rel(u["w"], m_u["w"])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"rank{r or 'full'}")
def test_error_feedback(shape, rank):
    # After a step M holds B - (1 - mu) P P^T B: mu B at full rank (P P^T B = B),
    # and at r < min(m, n) also the part of B outside span(P), at full weight.
    rng = np.random.default_rng(11)
    mu = 0.8
    tx = _tx(rank=rank, mu=mu)
    params = {"w": jnp.zeros(shape)}
    state, update = tx.init(params), jax.jit(tx.update)
    _, state = update({"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}, state, params)
    g = rng.standard_normal(shape)
    b = _f64(state.mu["w"]) + g
    q = _f64(state.q["w"][0])
    _, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    p, _ = np.linalg.qr(b @ q)  # the same span as Cholesky QR's (signs aside)
    want = b - (1 - mu) * p @ p.T @ b
    assert _rel(state.mu["w"], want) < 1e-5
    if rank is None:
        assert _rel(state.mu["w"], mu * b) < 1e-5
    else:
        assert _rel(state.mu["w"], mu * b) > 1e-2  # the unused part stays whole


def test_batch_axes_are_independent_matrices():
    # A stack (2, 4, 3) with batch axis 0 equals each slice run on its own.
    rng = np.random.default_rng(2)
    spec = {"w": lo.DimensionNumbers(((1,), (2,)), batch_axes=(0,))}
    tx = lo.scale_by_dion(rank=2, dimension_numbers=spec, scaling="none")
    params = {"w": jnp.zeros((2, 4, 3))}
    state = tx.init(params)
    ms, qs = [np.zeros((4, 3))] * 2, [_f64(state.q["w"][i]) for i in range(2)]
    for _ in range(3):
        g = rng.standard_normal((2, 4, 3))
        u, state = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, state, params)
        for i in range(2):
            want, ms[i], qs[i], _ = np_dion_step(ms[i], qs[i], g[i], 0.95)
            assert _rel(u["w"][i], want) < 1e-5


def test_rank_and_rank_fraction():
    assert _dion.dion_rank(64, 48, None, None) == 48
    assert _dion.dion_rank(64, 48, None, 0.25) == 12
    assert _dion.dion_rank(30, 40, None, 0.1) == 3  # not 4 (0.1 * 30 rounds up)
    assert _dion.dion_rank(64, 48, None, 1 / 16) == 3
    assert _dion.dion_rank(4, 3, 5, None) == 3  # capped at min(m, n)
    tx = lo.scale_by_dion(rank_fraction=0.5, dimension_numbers={"a": SPEC["w"], "b": None})
    state = tx.init({"a": jnp.zeros((8, 6)), "b": jnp.zeros(5)})
    assert state.q["a"].shape == (1, 6, 3) and state.q["b"].shape == ()
    with pytest.raises(ValueError, match="rank=2 and rank_fraction=0.5"):
        lo.dion(1e-2, rank=2, rank_fraction=0.5)


def test_seed_fixes_the_initial_factors():
    params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((6, 4))}
    spec = {"w": SPEC["w"], "v": SPEC["w"]}
    q = lambda s: lo.scale_by_dion(seed=s, dimension_numbers=spec).init(params).q  # noqa: E731
    a, b, c = q(0), q(0), q(1)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert not np.allclose(a["w"], c["w"]) and not np.allclose(a["w"], a["v"])
    np.testing.assert_allclose(np.linalg.norm(a["w"][0], axis=0), 1.0, rtol=1e-6)


def test_spec_without_two_factor_groups_names_the_path():
    tx = lo.scale_by_dion(dimension_numbers={"w": lo.DimensionNumbers(((0,), (1,), (2,)))})
    with pytest.raises(ValueError, match=r"\['w'\].*dion needs exactly two factor groups"):
        tx.init({"w": jnp.zeros((2, 3, 4))})


# ----------------------------------------------------------------------------- failure policy


def test_non_finite_gradient_is_skipped_and_overflow_is_failed():
    tx = _tx(rank=2)
    params = {"w": jnp.zeros((4, 3))}
    update = jax.jit(tx.update)
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}
    _, state = update(g, tx.init(params), params)
    u, bad = update({"w": g["w"].at[0, 0].set(jnp.nan)}, state, params)
    assert np.all(np.asarray(u["w"]) == 0)
    assert [int(c) for c in bad.failures] == [1, 0]
    np.testing.assert_array_equal(bad.mu["w"], state.mu["w"])
    np.testing.assert_array_equal(bad.q["w"], state.q["w"])
    # A finite gradient on a huge stored M: B Q overflows, the direction is NaN.
    huge = state._replace(mu={"w": jnp.full((4, 3), 3e38, jnp.float32)})
    u, after = update(g, huge, params)
    assert np.all(np.asarray(u["w"]) == 0)
    assert [int(c) for c in after.failures] == [0, 1]
    np.testing.assert_array_equal(after.mu["w"], huge.mu["w"])
    np.testing.assert_array_equal(after.q["w"], state.q["w"])


def test_alias_routes_vectors_to_adam():
    params = {"w": jnp.ones((8, 8)), "h1": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    tx = lo.dion(1.0, rank=2, dimension_numbers={"w": SPEC["w"], "h1": SPEC["w"], "b": None})
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 2.0, params)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(u["b"], -np.ones(8), rtol=1e-5)  # Adam's first step
    inner = state.inner_states["dion"].inner_state[0]
    assert isinstance(inner, lo.ScaleByDionState) and inner.q["w"].shape == (1, 8, 2)


# ----------------------------------------------------------------------------- sharded

_SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import layerwise_optax as lo

spec = {"w": lo.DimensionNumbers(((0,), (1,)))}
tx = lo.scale_by_dion(rank=8, dimension_numbers=spec)
params = {"w": jnp.zeros((64, 48))}
grads = [{"w": jax.random.normal(jax.random.key(i), (64, 48))} for i in range(3)]
state, ref = tx.init(params), []
for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    ref.append(np.asarray(u["w"]))

mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
rows = {"w": NamedSharding(mesh, P("data", None))}
shard = lo.state_shardings(tx, params, {"w": P("data", None)}, mesh=mesh)
step = jax.jit(tx.update, in_shardings=(rows, shard, rows), out_shardings=(rows, shard))
p = jax.device_put(params, rows)
state = jax.jit(tx.init, out_shardings=shard)(p)
errs = []
for g in grads:
    u, state = step(jax.device_put(g, rows), state, p)
    errs.append(float(np.abs(np.asarray(u["w"]) - ref[len(errs)]).max() / np.abs(ref[0]).max()))
hlo = step.lower(jax.device_put(grads[0], rows), state, p).compile().as_text()
gathers = []
for line in hlo.splitlines():
    m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", line)
    if m:
        dims = [int(d) for d in m.group(2).split(",") if d]
        gathers.append(int(np.prod(dims)) if dims else 1)
print(json.dumps({"errs": errs, "gathers": gathers, "spec": str(u["w"].sharding.spec)}))
"""


def test_sharded_rows_match_single_device_without_gathering_the_leaf():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(out["errs"]) < 1e-5, out
    assert out["spec"] == "P('data', None)", out
    # Only r-sized results are gathered (if any): nothing as large as the leaf.
    assert all(n < 64 * 48 // 2 for n in out["gathers"]), out
