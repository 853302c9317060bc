"""Matrix functions against float64 NumPy/SciPy across condition numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerwise_optax import _linalg, linalg
from tests._helpers import np_inv_root, random_psd

CONDS = [1.0, 1e2, 1e4, 1e6, 1e8]


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("p", [1, 2, 4])
def test_inv_root_eigh_float64_exact(cond, p):
    rng = np.random.default_rng(int(cond) % 97 + p)
    a = random_psd(rng, 12, cond)
    with jax.enable_x64(True):
        got = np.asarray(linalg.inv_root_eigh(jnp.asarray(a), p))
    want = np_inv_root(a, p)
    # Backward-stable eigh: relative error of order eps64 * cond.
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-13 * cond + 1e-12, err


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("p", [2, 4])
def test_inv_root_eigh_float32_with_relative_damping(cond, p):
    # In float32 the damped problem is what is well defined: with relative damping
    # 1e-4 the effective condition number is at most 1e4 whatever `cond` is.
    rng = np.random.default_rng(3)
    a = random_psd(rng, 16, cond) * 7.0
    got = np.asarray(
        linalg.inv_root_eigh(jnp.asarray(a, jnp.float32), p, damping=1e-4, relative_damping=True)
    )
    lam_max = np.linalg.eigvalsh(a).max()
    want = np_inv_root(a, p, damping=1e-4 * lam_max)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 2e-3, err


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("p", [2, 4])
def test_inv_root_newton_matches_scipy(cond, p):
    rng = np.random.default_rng(11)
    a = random_psd(rng, 10, cond)
    with jax.enable_x64(True):
        root, residual = linalg.inv_root_newton(jnp.asarray(a), p, max_iters=300, tol=1e-10)
    want = np_inv_root(a, p)
    err = np.linalg.norm(np.asarray(root) - want) / np.linalg.norm(want)
    assert err < 1e-7, err
    assert float(residual) < 1e-7


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
def test_inv_psd_cholesky_float64_exact(cond):
    rng = np.random.default_rng(int(cond) % 89)
    a = random_psd(rng, 12, cond)
    with jax.enable_x64(True):
        got = np.asarray(linalg.inv_psd_cholesky(jnp.asarray(a)))
    want = np.linalg.inv(a)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-13 * cond + 1e-12, err


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("relative", [False, True])
def test_inv_psd_cholesky_float32_damped(cond, relative):
    rng = np.random.default_rng(7)
    a = random_psd(rng, 16, cond) * 3.0
    lam_max = np.linalg.eigvalsh(a).max()
    damping = 1e-4 if relative else 1e-4 * lam_max
    got = np.asarray(
        linalg.inv_psd_cholesky(
            jnp.asarray(a, jnp.float32), damping=damping, relative_damping=relative
        )
    )
    want = np.linalg.inv(a + 1e-4 * lam_max * np.eye(16))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 2e-3, err


@pytest.mark.parametrize(
    "bad",
    [np.diag([1.0, -1.0, 2.0]), np.full((3, 3), np.nan), np.zeros((3, 3))],
    ids=["indefinite", "nan", "zero"],
)
def test_inv_psd_cholesky_failure_is_nan(bad):
    # Not positive definite (or not finite): NaN, so callers keep their previous inverse.
    got = np.asarray(linalg.inv_psd_cholesky(jnp.asarray(bad, jnp.float32)))
    assert np.all(np.isnan(got))
    batch = jnp.stack([jnp.asarray(bad, jnp.float32), jnp.eye(3)])
    out = np.asarray(linalg.inv_psd_cholesky(batch))
    assert np.all(np.isnan(out[0])) and np.allclose(out[1], np.eye(3))


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
def test_inv_root_newton_float32_damped(cond):
    rng = np.random.default_rng(5)
    a = random_psd(rng, 16, cond)
    root, residual = linalg.inv_root_newton(
        jnp.asarray(a, jnp.float32), 4, damping=1e-3, relative_damping=True
    )
    lam_max = np.linalg.eigvalsh(a).max()
    want = np_inv_root(a, 4, damping=1e-3 * lam_max)
    err = np.linalg.norm(np.asarray(root) - want) / np.linalg.norm(want)
    assert err < 5e-3, err
    assert float(residual) < 1e-2


def test_inv_root_newton_warm_start_is_used_and_correct():
    rng = np.random.default_rng(0)
    a = random_psd(rng, 8, 1e3)
    b = a + 1e-3 * random_psd(rng, 8, 10.0)  # a slightly drifted factor
    with jax.enable_x64(True):
        prev, _ = linalg.inv_root_newton(jnp.asarray(a), 4, tol=1e-10)
        warm, res = linalg.inv_root_newton(jnp.asarray(b), 4, warm_start=prev, tol=1e-10)
        bad, res_bad = linalg.inv_root_newton(
            jnp.asarray(b), 4, warm_start=jnp.eye(8) * 1e3, tol=1e-10
        )
    want = np_inv_root(b, 4)
    for got, r in ((warm, res), (bad, res_bad)):  # a useless warm start falls back to cold
        assert np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want) < 1e-6
        assert float(r) < 1e-6


@pytest.mark.parametrize("fn", ["eigh", "newton"])
def test_singular_and_zero_give_finite_bounded_roots(fn):
    rng = np.random.default_rng(1)
    singular = random_psd(rng, 6, 10.0, rank=2)
    zero = np.zeros((6, 6))
    for a in (singular, zero):
        if fn == "eigh":
            r = linalg.inv_root_eigh(jnp.asarray(a, jnp.float32), 4)
        else:
            r, _ = linalg.inv_root_newton(jnp.asarray(a, jnp.float32), 4)
        r = np.asarray(r)
        assert np.all(np.isfinite(r))
        # Bounded by the documented floor: eigenvalues >= eps * lambda_max (or tiny).
        lam_max = max(np.linalg.eigvalsh(a).max(), 0.0)
        floor = max(np.finfo(np.float32).eps * lam_max, np.finfo(np.float32).tiny)
        assert np.abs(r).max() <= 1.01 * floor ** (-1 / 4) * 6


def test_singular_with_damping_matches_reference():
    rng = np.random.default_rng(2)
    a = random_psd(rng, 6, 10.0, rank=2)
    got = np.asarray(linalg.inv_root_eigh(jnp.asarray(a, jnp.float32), 2, damping=1e-2))
    np.testing.assert_allclose(got, np_inv_root(a, 2, 1e-2), rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_gives_nan_not_hang(bad):
    a = np.eye(4)
    a[1, 2] = bad
    x = jnp.asarray(np.stack([a, np.eye(4)]), jnp.float32)
    r = np.asarray(linalg.inv_root_eigh(x, 4))
    assert np.all(np.isnan(r[0])) and np.allclose(r[1], np.eye(4))
    rn, res = linalg.inv_root_newton(x, 4)
    assert np.all(np.isnan(np.asarray(rn)[0])) and np.allclose(
        np.asarray(rn)[1], np.eye(4), atol=1e-5
    )
    q = np.asarray(linalg.eigenbasis(x))
    assert np.all(np.isnan(q[0])) and np.all(np.isfinite(q[1]))
    q2, _ = linalg.refresh_eigenbasis(x, jnp.broadcast_to(jnp.eye(4), x.shape))
    assert np.all(np.isnan(np.asarray(q2)[0])) and np.all(np.isfinite(np.asarray(q2)[1]))


def test_eigh_psd_clips_and_matches_numpy():
    rng = np.random.default_rng(4)
    a = random_psd(rng, 9, 1e3)
    a_noisy = a - 1e-9 * np.eye(9)
    w, v = linalg.eigh_psd(jnp.asarray(a_noisy, jnp.float32))
    assert np.all(np.asarray(w) >= 0)
    np.testing.assert_allclose(
        np.asarray(w), np.clip(np.linalg.eigvalsh(a_noisy), 0, None), atol=1e-6
    )
    recon = (np.asarray(v) * np.asarray(w)) @ np.asarray(v).T
    np.testing.assert_allclose(recon, a, atol=1e-5)


@pytest.mark.parametrize("cond", [1.0, 1e4, 1e8], ids=lambda c: f"cond{c:g}")
def test_eigenbasis_descending_and_diagonalizes(cond):
    rng = np.random.default_rng(6)
    a = random_psd(rng, 10, cond)
    with jax.enable_x64(True):
        q = np.asarray(linalg.eigenbasis(jnp.asarray(a)))
    d = q.T @ a @ q
    np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-12)
    assert np.all(np.diff(np.diag(d)) <= 1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(10), atol=1e-12)


def test_refresh_eigenbasis_is_power_step_plus_qr():
    rng = np.random.default_rng(7)
    a = random_psd(rng, 8, 1e2)
    q0, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    with jax.enable_x64(True):
        q, perm = linalg.refresh_eigenbasis(jnp.asarray(a), jnp.asarray(q0))
    q, perm = np.asarray(q), np.asarray(perm)
    est = np.diag(q0.T @ a @ q0)
    np.testing.assert_array_equal(perm, np.argsort(-est, kind="stable"))
    want, r = np.linalg.qr(a @ q0[:, perm])
    want = want * np.where(np.diag(r) < 0, -1.0, 1.0)
    np.testing.assert_allclose(q, want, atol=1e-10)
    # Iterating converges to the true eigenbasis (up to signs).
    qq = jnp.asarray(q0)
    with jax.enable_x64(True):
        for _ in range(200):
            qq, _ = linalg.refresh_eigenbasis(jnp.asarray(a), qq)
    d = np.asarray(qq).T @ a @ np.asarray(qq)
    assert np.abs(d - np.diag(np.diag(d))).max() < 1e-6


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6], ids=lambda c: f"cond{c:g}")
def test_max_eigenvalue(cond):
    rng = np.random.default_rng(8)
    a = random_psd(rng, 12, cond) * 3.0
    est = float(linalg.max_eigenvalue(jnp.asarray(a, jnp.float32), num_iters=100))
    assert abs(est - 3.0) / 3.0 < 1e-3


def test_batching_jit_and_vmap_agree():
    rng = np.random.default_rng(9)
    a = np.stack([random_psd(rng, 5, c) for c in (1.0, 10.0, 1e3)]).astype(np.float32)
    batched = linalg.inv_root_eigh(jnp.asarray(a), 4, damping=1e-6)
    jitted = jax.jit(lambda x: linalg.inv_root_eigh(x, 4, damping=1e-6))(jnp.asarray(a))
    vmapped = jax.vmap(lambda x: linalg.inv_root_eigh(x, 4, damping=1e-6))(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(batched), np.asarray(jitted), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(vmapped), rtol=1e-5, atol=1e-6)
    newton_b, _ = linalg.inv_root_newton(jnp.asarray(a), 4, damping=1e-6)
    newton_v = jax.vmap(lambda x: linalg.inv_root_newton(x, 4, damping=1e-6)[0])(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(newton_b), np.asarray(newton_v), rtol=1e-4, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(batched[i]), np_inv_root(a[i], 4, 1e-6), rtol=2e-3, atol=1e-4
        )


def test_newton_rejects_non_integer_order():
    with pytest.raises(ValueError, match="p must be a positive int"):
        linalg.inv_root_newton(jnp.eye(3), 2.5)


def test_batched_refresh_inside_cond_does_not_deadlock_on_cpu():
    # Regression: jaxlib 0.10.2's batched CPU eigh deadlocked on 2 cores inside
    # lax.cond (about 3 runs in 4 hung before the one-at-a-time CPU path).
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        import layerwise_optax as lo
        p = {'w': jax.random.normal(jax.random.key(0), (256, 256))}
        g = {'w': jax.random.normal(jax.random.key(1), (256, 256))}
        for tx in (lo.shampoo(1e-3, block_size=128), lo.soap(1e-3, block_size=64)):
            s = tx.init(p)
            for _ in range(2):
                u, s = jax.jit(tx.update)(g, s, p)
            jax.block_until_ready(u)
        print('done')
    """)
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
def test_cholesky_psd_float64_exact_and_lower(cond):
    rng = np.random.default_rng(int(cond) % 83)
    a = random_psd(rng, 12, cond)
    with jax.enable_x64(True):
        got = np.asarray(_linalg.cholesky_psd(jnp.asarray(a), damping=1e-3))
    want = np.linalg.cholesky(a + 1e-3 * np.eye(12))
    np.testing.assert_array_equal(np.triu(got, 1), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "bad",
    [np.diag([1.0, -1.0, 2.0]), np.full((3, 3), np.nan), np.zeros((3, 3))],
    ids=["indefinite", "nan", "zero"],
)
def test_cholesky_psd_failure_is_nan_per_block(bad):
    batch = jnp.stack([jnp.asarray(bad, jnp.float32), 4.0 * jnp.eye(3)])
    out = np.asarray(_linalg.cholesky_psd(batch))
    assert np.all(np.isnan(out[0]))
    np.testing.assert_allclose(out[1], 2.0 * np.eye(3))


@pytest.mark.parametrize("cond", [1e2, 1e3, 1e4, 3e4, 1e5], ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_cholesky_solve_float32_beats_the_explicit_inverse(cond, left):
    # x = (A + delta I)^{-1} b in float32 against a float64 solve with the same
    # float32 inputs, for right-hand sides along the large eigenvalues (b = A h,
    # as a gradient X^T D lies in the span of the inputs). Backward-stable
    # triangular solves: error ~ eps * cond; the explicit inverse loses more.
    rng = np.random.default_rng(int(cond) % 71)
    n, m, damping = 64, 8, 1e-9
    a = random_psd(rng, n, cond).astype(np.float32)
    b = (a.astype(np.float64) @ rng.standard_normal((n, m))).astype(np.float32)
    a64 = a.astype(np.float64) + damping * np.eye(n)
    chol = _linalg.cholesky_psd(jnp.asarray(a)[None], damping=damping)
    if left:
        got = _linalg.cholesky_solve(chol, jnp.asarray(b)[None])[0]
        want = np.linalg.solve(a64, b.astype(np.float64))
        via_inv = _linalg.inv_psd_cholesky(jnp.asarray(a), damping=damping) @ b
    else:
        got = _linalg.cholesky_solve(chol, jnp.asarray(b.T)[None], left=False)[0]
        want = np.linalg.solve(a64, b.astype(np.float64)).T
        via_inv = b.T @ _linalg.inv_psd_cholesky(jnp.asarray(a), damping=damping)
    rel = lambda x: np.linalg.norm(np.asarray(x, np.float64) - want) / np.linalg.norm(want)  # noqa: E731
    assert rel(got) < 2e-7 * cond + 1e-6, rel(got)
    assert rel(got) <= rel(via_inv) * 1.05, (rel(got), rel(via_inv))


def test_cholesky_solve_batched_matches_numpy_in_float64():
    rng = np.random.default_rng(4)
    a = np.stack([random_psd(rng, 6, c) + 1e-3 * np.eye(6) for c in (1.0, 1e3, 1e6)])
    b = rng.standard_normal((3, 6, 5))
    with jax.enable_x64(True):
        chol = _linalg.cholesky_psd(jnp.asarray(a))
        left = np.asarray(_linalg.cholesky_solve(chol, jnp.asarray(b)))
        right = np.asarray(
            _linalg.cholesky_solve(chol, jnp.asarray(np.swapaxes(b, 1, 2)), left=False)
        )
    np.testing.assert_allclose(left, np.linalg.solve(a, b), rtol=1e-8)
    np.testing.assert_allclose(np.swapaxes(right, 1, 2), np.linalg.solve(a, b), rtol=1e-8)


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_matrix_power_matches_numpy(cond, p):
    # Symmetric PSD matrices (the roots KL-Shampoo raises) and a general one.
    rng = np.random.default_rng(int(cond) % 89 + p)
    a = random_psd(rng, 10, cond) * 3.0
    b = rng.standard_normal((10, 10)) / 3.0
    for m in (a, b):
        want = np.linalg.matrix_power(m, p)
        with jax.enable_x64(True):
            got64 = np.asarray(_linalg.matrix_power(jnp.asarray(m), p))
        assert got64.dtype == np.float64
        np.testing.assert_allclose(got64, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        got32 = np.asarray(_linalg.matrix_power(jnp.asarray(m, jnp.float32), p))
        assert got32.dtype == np.float32
        err = np.linalg.norm(got32 - want) / np.linalg.norm(want)
        assert err < 1e-5, err


def test_matrix_power_is_batched_and_rejects_bad_exponents():
    m = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 4, 4)), jnp.float32)
    got = _linalg.matrix_power(m, 3)
    want = np.linalg.matrix_power(np.asarray(m, np.float64), 3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    for bad in (0, -1, 1.5, True, np.float32(2)):
        with pytest.raises(ValueError, match="integer exponent"):
            _linalg.matrix_power(m, bad)


# PSGD's matrix functions: the triangular solve, the factor steps, the balancing.


def _triangular_with_cond(rng, n, cond):
    """An upper triangular ``n x n`` matrix with condition number ``cond`` (R of a QR)."""
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    _, r = np.linalg.qr((u * np.logspace(0, -np.log10(cond), n)) @ v.T)
    return r


def _psgd_bound_ref(a):
    """PSGD's spectral-norm lower bound ``||A² x|| / ||A x||`` (x: the largest row), float64."""
    x = a[np.argmax(np.sum(a * a, axis=1))]
    return np.linalg.norm(a @ (a @ x)) / np.linalg.norm(a @ x)


@pytest.mark.parametrize("cond", CONDS[:4], ids=lambda c: f"cond{c:g}")
def test_solve_upper_transposed_float64_exact(cond):
    rng = np.random.default_rng(int(np.log10(cond)) + 40)
    u = np.stack([_triangular_with_cond(rng, 9, cond) for _ in range(3)])
    b = rng.standard_normal((3, 9, 4))
    # The strictly lower part is not read.
    noisy = u + np.tril(rng.standard_normal((3, 9, 9)), -1)
    with jax.enable_x64(True):
        got = np.asarray(_linalg.solve_upper_transposed(jnp.asarray(noisy), jnp.asarray(b)))
    want = np.linalg.solve(np.swapaxes(u, 1, 2), b)
    assert np.linalg.cond(u[0]) == pytest.approx(cond, rel=1e-6)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-14 * cond + 1e-13, err


@pytest.mark.parametrize("cond", CONDS[:4], ids=lambda c: f"cond{c:g}")
def test_solve_upper_transposed_float32_error_grows_with_cond_only(cond):
    rng = np.random.default_rng(5)
    u = _triangular_with_cond(rng, 16, cond).astype(np.float32)
    b = rng.standard_normal((16, 6)).astype(np.float32)
    got = _linalg.solve_upper_transposed(jnp.asarray(u)[None], jnp.asarray(b)[None])[0]
    assert got.dtype == jnp.float32
    want = np.linalg.solve(u.T.astype(np.float64), b.astype(np.float64))
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    # Forward error at most of order n * eps32 * cond ...
    assert err < 1e-6 * cond + 1e-6, err
    # ... because the solve is backward stable: a tiny normwise residual at every cond.
    x = np.asarray(got, np.float64)
    u64, b64 = u.astype(np.float64), b.astype(np.float64)
    backward = np.linalg.norm(u64.T @ x - b64) / (np.linalg.norm(u64) * np.linalg.norm(x))
    assert backward < 16 * np.finfo(np.float32).eps, backward


def _psgd_step_ref(q, aa, bb, lr):
    """Li (2024) / psgd-jax's triangular factor step, float64."""
    return q - lr * np.triu(aa - bb) / _psgd_bound_ref(aa + bb) @ q


@pytest.mark.parametrize("cond", CONDS[:4], ids=lambda c: f"cond{c:g}")
def test_psgd_step_triangular_matches_a_float64_reference(cond):
    rng = np.random.default_rng(int(np.log10(cond)) + 50)
    n, lr = 7, 0.3
    q = _triangular_with_cond(rng, n, cond)
    a, b = rng.standard_normal((n, 12)), 2.0 * rng.standard_normal((n, 12))
    aa, bb = a @ a.T, b @ b.T
    want = _psgd_step_ref(q, aa, bb, lr)
    with jax.enable_x64(True):
        got64 = np.asarray(
            _linalg.psgd_step_triangular(*(jnp.asarray(x)[None] for x in (q, aa, bb)), lr)
        )[0]
    np.testing.assert_allclose(got64, want, rtol=1e-12, atol=1e-12 * np.abs(q).max())
    got32 = np.asarray(
        _linalg.psgd_step_triangular(
            *(jnp.asarray(x, jnp.float32)[None] for x in (q, aa, bb)), jnp.float32(lr)
        )
    )[0]
    np.testing.assert_allclose(got32, want, rtol=2e-5, atol=2e-5 * np.abs(q).max())
    # The step multiplies Q by an upper triangular factor with diagonal in
    # [1 - lr, 1 + lr] (invertible for lr < 1), so Q stays on the group.
    assert np.array_equal(np.triu(got64), got64)
    factor = want @ np.linalg.inv(q)
    np.testing.assert_allclose(np.tril(factor, -1), 0.0, atol=1e-9 * cond)
    assert np.all(np.abs(np.diag(factor) - 1.0) <= lr + 1e-9)


def test_psgd_step_triangular_fixed_point_and_scale_free():
    rng = np.random.default_rng(6)
    q = jnp.asarray(_triangular_with_cond(rng, 5, 10.0), jnp.float32)[None]
    a = rng.standard_normal((5, 9))
    aa = jnp.asarray(a @ a.T, jnp.float32)[None]
    bb = jnp.asarray(np.eye(5) + 0.5, jnp.float32)[None]
    # Whitened (aa == bb): no step at all.
    np.testing.assert_array_equal(_linalg.psgd_step_triangular(q, aa, aa, 0.5), q)
    base = np.asarray(_linalg.psgd_step_triangular(q, aa, bb, 0.5))
    for c in (1e-20, 1e-3, 1e4, 1e20):
        scaled = _linalg.psgd_step_triangular(q, aa * c, bb * c, 0.5)
        np.testing.assert_allclose(scaled, base, rtol=1e-5, atol=1e-6)


def test_psgd_step_diagonal_matches_a_float64_reference():
    rng = np.random.default_rng(7)
    d = rng.uniform(0.1, 10.0, (3, 6))
    a, b = rng.uniform(0, 5, (3, 6)), rng.uniform(0, 5, (3, 6))
    want = d - 0.2 * (a - b) / np.max(np.abs(a + b), axis=-1, keepdims=True) * d
    with jax.enable_x64(True):
        got = np.asarray(_linalg.psgd_step_diagonal(*(jnp.asarray(x) for x in (d, a, b)), 0.2))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    got32 = _linalg.psgd_step_diagonal(*(jnp.asarray(x, jnp.float32) for x in (d, a, b)), 0.2)
    np.testing.assert_allclose(got32, want, rtol=1e-6)
    # For a diagonal matrix the max-abs entry is its spectral norm: the diagonal
    # step is the triangular step restricted to diagonal factors.
    full = _linalg.psgd_step_triangular(
        *(jnp.asarray(np.stack([np.diag(r) for r in x])) for x in (d, a, b)), 0.2
    )
    np.testing.assert_allclose(np.diagonal(np.asarray(full), axis1=1, axis2=2), got32, rtol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 1e6, 1e15], ids=lambda s: f"spread{s:g}")
def test_balance_factors_equalizes_and_keeps_the_kronecker_product(spread):
    rng = np.random.default_rng(8)
    # Two stack entries; the factors of each are scaled by `spread` apart.
    q1 = np.triu(rng.standard_normal((2, 3, 3))) * np.array([spread, 1.0])[:, None, None]
    q2 = rng.uniform(0.5, 2.0, (2, 4)) / np.array([spread, 3.0])[:, None]  # a diagonal factor
    q3 = np.triu(rng.standard_normal((2, 2, 2))) * np.array([1.0, 1.0 / spread])[:, None, None]

    def kron(a, b, c):
        return np.kron(np.kron(a, np.diag(b)), c)

    for dtype, rtol in ((np.float32, 2e-5), (np.float64, 1e-12)):
        with jax.enable_x64(dtype == np.float64):
            out = [
                np.asarray(f, np.float64)
                for f in _linalg.balance_factors([jnp.asarray(x, dtype) for x in (q1, q2, q3)])
            ]
        for n in range(2):
            maxes = [np.abs(f[n]).max() for f in out]
            want = np.prod([np.abs(f[n]).max() for f in (q1, q2, q3)]) ** (1 / 3)
            np.testing.assert_allclose(maxes, want, rtol=rtol)
            before = kron(q1[n], q2[n], q3[n])
            after = kron(out[0][n], out[1][n], out[2][n])
            np.testing.assert_allclose(
                after, before, rtol=rtol * 10, atol=rtol * np.abs(before).max()
            )


def test_balance_factors_single_and_zero_factors():
    one = jnp.asarray([[3.0, -5.0]])
    assert _linalg.balance_factors([one])[0] is one
    zero, q = jnp.zeros((1, 2, 2)), 4.0 * jnp.eye(2)[None]
    out = _linalg.balance_factors([zero, q])
    assert all(bool(jnp.all(jnp.isfinite(f))) for f in out)
    np.testing.assert_array_equal(out[0], 0.0)


def test_balance_factors_masks_leave_entries_out_of_the_max():
    # A padded block: the real 2 x 2 corner of q1 has max-abs 0.5, its padded
    # diagonal entry 100 must not count; q2's real entries max 8.
    q1 = jnp.asarray([[[0.5, 0.25, 0.0], [0.0, -0.5, 0.0], [0.0, 0.0, 100.0]]])
    q2 = jnp.asarray([[[8.0, 1.0], [0.0, 2.0]]])
    real = jnp.asarray([[True, True, False]])
    out = _linalg.balance_factors([q1, q2], [real[:, :, None] & real[:, None, :], None])
    # Geometric mean of 0.5 and 8 is 2: q1 scaled by 4, q2 by 1/4.
    np.testing.assert_allclose(np.asarray(out[0]), 4.0 * np.asarray(q1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(q2) / 4.0, rtol=1e-6)
    unmasked = _linalg.balance_factors([q1, q2])
    np.testing.assert_allclose(np.abs(np.asarray(unmasked[0])).max(), np.sqrt(800.0), rtol=1e-6)


def _pi_reference(a, b, lam):
    """K-FAC's factored damping in float64, found by minimising the cross terms' trace.

    ``(A + d_A I) ⊗ (B + d_B I) = A ⊗ B + d_B A ⊗ I + d_A I ⊗ B + d_A d_B I``: with
    ``d_A d_B = lam`` fixed, Martens and Grosse pick the split that minimises
    ``tr(d_B A ⊗ I + d_A I ⊗ B)``; found here numerically (no closed form used).
    """
    import scipy.optimize

    ta, tb = np.trace(a) * b.shape[0], np.trace(b) * a.shape[0]

    def cross(log_da):
        da = np.exp(log_da)
        return (lam / da) * ta + da * tb

    res = scipy.optimize.minimize_scalar(cross, bracket=(-30.0, 30.0), tol=1e-12)
    da = np.exp(res.x)
    return da, lam / da


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("lam", [1e-6, 1e-2, 3.0])
def test_pi_damping_minimises_the_cross_terms_float64(cond, lam):
    rng = np.random.default_rng(int(np.log10(cond)) * 7 + int(lam * 1e6) % 13)
    scales = [(1.0, 1.0), (1e3, 1e-2), (1e-4, 10.0)]
    a = np.stack([sa * random_psd(rng, 7, cond) for sa, _ in scales])
    b = np.stack([sb * random_psd(rng, 4, cond) for _, sb in scales])
    with jax.enable_x64(True):
        da, db = _linalg.pi_damping(jnp.asarray(a), jnp.asarray(b), jnp.asarray(lam))
    da, db = np.asarray(da), np.asarray(db)
    assert da.dtype == np.float64 and da.shape == (3,)
    for i in range(3):
        want_a, want_b = _pi_reference(a[i], b[i], lam)
        np.testing.assert_allclose([da[i], db[i]], [want_a, want_b], rtol=1e-5)
    np.testing.assert_allclose(da * db, lam, rtol=1e-13)
    # The float32 path agrees with the float64 one to float32 accuracy.
    da32, db32 = _linalg.pi_damping(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(lam, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(da32), da, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(db32), db, rtol=2e-6)


def test_pi_damping_diagonals_and_empty_factors():
    rng = np.random.default_rng(3)
    a = np.stack([random_psd(rng, 5, 1e3), np.zeros((5, 5))])
    b = np.stack([10.0 * random_psd(rng, 3, 1e2), random_psd(rng, 3, 1e2)])
    with jax.enable_x64(True):
        lam = jnp.asarray(0.04, jnp.float64)
        full = _linalg.pi_damping(jnp.asarray(a), jnp.asarray(b), lam)
        diag_a = np.diagonal(a, axis1=-2, axis2=-1)
        diag_b = np.diagonal(b, axis1=-2, axis2=-1)
        mixed = _linalg.pi_damping(jnp.asarray(diag_a), jnp.asarray(b), lam, a_diagonal=True)
        both = _linalg.pi_damping(
            jnp.asarray(diag_a), jnp.asarray(diag_b), lam, a_diagonal=True, b_diagonal=True
        )
    for got in (mixed, both):
        np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-14)
    # An all-zero factor (before any statistics): the damping is split evenly.
    np.testing.assert_allclose(np.asarray(full)[:, 1], [0.2, 0.2], rtol=1e-14)
    pi2 = (np.trace(a[0]) / 5) / (np.trace(b[0]) / 3)
    np.testing.assert_allclose(np.asarray(full)[:, 0], [0.2 * pi2**0.5, 0.2 / pi2**0.5])


@pytest.mark.parametrize("cond", CONDS, ids=lambda c: f"cond{c:g}")
def test_add_ridge_shifts_the_spectrum_float64(cond):
    rng = np.random.default_rng(int(np.log10(cond)) + 40)
    a = np.stack([random_psd(rng, 6, cond) for _ in range(2)])
    delta = np.asarray([1e-7, 0.5])
    with jax.enable_x64(True):
        got = np.asarray(_linalg.add_ridge(jnp.asarray(a), jnp.asarray(delta)))
        got_diag = np.asarray(
            _linalg.add_ridge(
                jnp.asarray(np.diagonal(a, axis1=-2, axis2=-1)), jnp.asarray(delta), diagonal=True
            )
        )
    np.testing.assert_array_equal(got, a + delta[:, None, None] * np.eye(6))
    np.testing.assert_array_equal(got_diag, np.diagonal(a, axis1=-2, axis2=-1) + delta[:, None])
    for i in range(2):
        np.testing.assert_allclose(
            np.linalg.eigvalsh(got[i]), np.linalg.eigvalsh(a[i]) + delta[i], atol=1e-14
        )


def _matrix_with_condition(rng, m, r, cond):
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return u @ np.diag(np.geomspace(1.0, 1.0 / cond, r)) @ v.T


def _qr_positive(x):
    q, r = np.linalg.qr(x)
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e6], ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("shape", [(12, 5), (7, 7), (30, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cholesky_qr_float64_matches_householder_qr(cond, shape):
    rng = np.random.default_rng(int(cond) % 79 + shape[0])
    x = _matrix_with_condition(rng, *shape, cond) * 3.0
    with jax.enable_x64(True):
        q = np.asarray(linalg.cholesky_qr(jnp.asarray(x)))
    want = _qr_positive(x)  # Cholesky's R has a positive diagonal: no sign freedom
    assert np.linalg.norm(q.T @ q - np.eye(shape[1])) < 1e-12
    assert np.linalg.norm(q - want) < 1e-15 * cond + 1e-13, np.linalg.norm(q - want)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e3], ids=lambda c: f"cond{c:g}")
def test_cholesky_qr_float32_band(cond):
    # The documented float32 band: orthonormal and Householder's factor to a few
    # 1e-5 (Frobenius norm; measured 2e-5 for 40 x 6) up to kappa ~ 1e3.
    rng = np.random.default_rng(4)
    x = _matrix_with_condition(rng, 40, 6, cond)
    q = np.asarray(linalg.cholesky_qr(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.linalg.norm(q.T @ q - np.eye(6)) < 5e-5
    assert np.linalg.norm(q - _qr_positive(x)) < 5e-5 * max(1.0, cond / 10)


def test_cholesky_qr_rank_deficient_and_zero_are_finite_contractions():
    rng = np.random.default_rng(8)
    rank2 = rng.standard_normal((9, 2)) @ rng.standard_normal((2, 4))  # rank 2 of 4
    for x, k in [(rank2, 2), (np.zeros((9, 4)), 0), (np.outer(np.ones(9), np.ones(4)), 1)]:
        q = np.asarray(linalg.cholesky_qr(jnp.asarray(x, jnp.float32)), np.float64)
        assert np.all(np.isfinite(q))
        s = np.linalg.svd(q, compute_uv=False)
        np.testing.assert_allclose(s[:k], 1.0, atol=1e-5)
        np.testing.assert_array_equal(s[k:] < 1e-6, True)  # dropped columns are zero
    # Ill-conditioned beyond the float32 band: still a contraction, never NaN.
    x = _matrix_with_condition(rng, 20, 5, 1e6)
    s = np.linalg.svd(np.asarray(linalg.cholesky_qr(jnp.asarray(x, jnp.float32))), compute_uv=False)
    assert np.all(np.isfinite(s)) and s.max() < 1 + 1e-5
    assert np.all(np.isnan(np.asarray(linalg.cholesky_qr(jnp.full((4, 2), jnp.nan)))))


def test_normalize_columns_with_fallback():
    x = jnp.asarray([[3.0, 0.0, 1e-3], [4.0, 0.0, 0.0]])
    got = np.asarray(_linalg.normalize_columns(x, 1e-8, jnp.full((2, 3), 7.0)))
    np.testing.assert_allclose(got, [[0.6, 7.0, 1e-3 / (1e-3 + 1e-8)], [0.8, 7.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(_linalg.normalize_columns(x, 1.0))[:, 0], [0.5, 2 / 3])
