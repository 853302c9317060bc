"""Per-axis pieces of _kron and the shared Shampoo/SOAP phases of _factored, against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerwise_optax import _axes, _factored, _kron
from layerwise_optax._axes import DimensionNumbers as DN
from tests._helpers import np_inv_root, random_spd


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999, 1 - 1e-5, 1 - 1e-6, 1 - 1e-7])
@pytest.mark.parametrize("t", [1, 3, 10, 1000])
def test_ema_debias_matches_float64(decay, t):
    d32 = np.float32(decay)
    want = 1.0 / (1.0 - np.float64(d32) ** t)
    got = float(_kron.ema_debias(jnp.float32(d32), jnp.int32(t)))
    assert abs(got / want - 1) < 3e-7, (got, want)


def test_ema_debias_beats_the_naive_form_and_is_one_for_a_sum():
    # The naive float32 1 - decay^t cancels for decay near 1 (the reason for expm1).
    d32, t = np.float32(1 - 1e-7), 1000
    want = 1.0 / (1.0 - np.float64(d32) ** t)
    naive = float(1.0 / (1.0 - jnp.float32(d32) ** jnp.float32(t)))
    got = float(_kron.ema_debias(jnp.float32(d32), jnp.int32(t)))
    assert abs(naive / want - 1) > 1e-5
    assert abs(got / want - 1) < 3e-7
    assert float(_kron.ema_debias(jnp.float32(1.0), jnp.int32(7))) == 1.0


def test_factor_powers_full_diag_none():
    rng = np.random.default_rng(0)
    plan = _axes.make_plan((4, 3, 6), DN(((0,), (1,), (2,))), max_precond_dim=4, block_size=None)
    assert plan.kinds == ("full", "full", "diag")
    f = (random_spd(rng, 4, 10.0), random_spd(rng, 3, 10.0), rng.uniform(0.5, 2.0, 6))
    got = _kron.factor_powers(
        tuple(jnp.asarray(x, jnp.float32)[None] for x in f), plan, 3, jnp.float32
    )
    np.testing.assert_allclose(got[0][0], np.linalg.matrix_power(f[0], 3), rtol=1e-4)
    np.testing.assert_allclose(got[1][0], np.linalg.matrix_power(f[1], 3), rtol=1e-4)
    np.testing.assert_allclose(got[2][0], f[2] ** 3, rtol=1e-5)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4], ids=lambda c: f"cond{c:g}")
@pytest.mark.parametrize("root", [2, 4])
def test_kl_axis_stats_match_dense_float64(cond, root):
    # G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i from the stored roots L_j^{-1/root};
    # the last axis is diagonal (max_precond_dim=4), so its L is a vector.
    rng = np.random.default_rng(int(cond) + root)
    shape = (4, 3, 6)
    g = rng.standard_normal(shape)
    plan = _axes.make_plan(shape, DN(((0,), (1,), (2,))), max_precond_dim=4, block_size=None)
    ls = [random_spd(rng, 4, cond), random_spd(rng, 3, cond), rng.uniform(1.0 / cond, 1.0, 6)]
    roots = (np_inv_root(ls[0], root), np_inv_root(ls[1], root), ls[2] ** (-1.0 / root))
    invs = [np.linalg.inv(ls[0]), np.linalg.inv(ls[1]), np.diag(1.0 / ls[2])]
    with jax.enable_x64(True):
        got = _kron.kl_axis_stats(
            plan.to_blocks(jnp.asarray(g)), tuple(jnp.asarray(r)[None] for r in roots), plan, root
        )
    for i in range(3):
        others = [invs[j] for j in range(3) if j != i]
        gi = np.moveaxis(g, i, 0).reshape(shape[i], -1)
        want = gi @ np.kron(others[0], others[1]) @ gi.T / (g.size // shape[i])
        want = want if i < 2 else np.diag(want)
        np.testing.assert_allclose(np.asarray(got[i][0]), want, rtol=1e-9 * cond, atol=1e-12)


def test_kl_axis_stats_flip_flop_recovers_the_kronecker_factors():
    # Gradients G = A^{1/2} Z B^{1/2} with Z running over the basis matrices E_kl have
    # second moment exactly A ⊗ B (sum_kl vec(E_kl) vec(E_kl)^T = I). One flip-flop
    # sweep of the KL statistics (L_1 from L_2, then L_2 from the new L_1) lands on
    # L_1 ⊗ L_2 = A ⊗ B, where Shampoo's G G^T statistics are only proportional.
    rng = np.random.default_rng(3)
    a, b = random_spd(rng, 5, 10.0), random_spd(rng, 4, 10.0)
    ah, bh = np_inv_root(a, -2), np_inv_root(b, -2)  # square roots
    plan = _axes.make_plan((5, 4), DN(((0,), (1,))), max_precond_dim=10, block_size=None)
    basis = np.eye(20).reshape(20, 5, 4)
    with jax.enable_x64(True):
        blocks = jnp.asarray(np.stack([ah @ z @ bh for z in basis]))  # (20, 5, 4)

        def expected_stats(ls, i):
            roots = tuple(jnp.asarray(np_inv_root(x, 2))[None] for x in ls)
            out = jax.vmap(lambda x: _kron.kl_axis_stats(x[None], roots, plan, 2)[i])(blocks)
            return np.asarray(out).sum(axis=0)[0]  # sum: E[vec Z vec Z^T] = I

        ls = [np.eye(5), np.eye(4)]
        ls[0] = expected_stats(ls, 0)
        ls[1] = expected_stats(ls, 1)
    got, want = np.kron(ls[0], ls[1]), np.kron(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_on_schedule_runs_the_chosen_branch():
    def refresh(scale):
        return lambda x, y: (x * scale + y, jnp.int32(scale))

    kept = lambda x, y: y  # noqa: E731
    x, y = jnp.float32(2.0), jnp.float32(1.0)
    f = jax.jit(lambda b: _kron.on_schedule(b, [refresh(10), refresh(100)], kept, x, y))
    assert [tuple(map(float, f(b))) for b in (0, 1, 2)] == [(1.0, 0), (21.0, 10), (201.0, 100)]
    g = jax.jit(lambda b: _kron.on_schedule(b, [refresh(10)], kept, x, y))
    assert tuple(map(float, g(jnp.bool_(True)))) == (21.0, 10)
    assert tuple(map(float, g(jnp.bool_(False)))) == (1.0, 0)


def test_accumulate_moments_and_factor_emas():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    plan = _axes.make_plan(g.shape, DN(((0,), (1,))), max_precond_dim=10, block_size=None)
    mu = rng.standard_normal((4, 3)).astype(np.float32)
    stats = (random_spd(rng, 4, 3.0)[None], random_spd(rng, 3, 3.0)[None])
    stats = tuple(jnp.asarray(s, jnp.float32) for s in stats)
    b1, decay = jnp.float32(0.9), jnp.float32(0.95)
    a = _factored.accumulate(jnp.asarray(g), plan, jnp.asarray(mu), stats, b1, decay)
    assert bool(a.ok) and a.nu is None
    np.testing.assert_allclose(a.mu, 0.9 * mu + 0.1 * g, rtol=1e-6)
    g64 = g.astype(np.float64)
    for s, old, new in zip(a.stats, stats, (g64 @ g64.T, g64.T @ g64)):
        np.testing.assert_allclose(s[0], 0.95 * np.asarray(old[0]) + 0.05 * new, rtol=1e-5)
    # A non-finite gradient, or (checked) a non-finite estimate from a valid one,
    # changes nothing.
    bad_g = jnp.asarray(g).at[1, 2].set(jnp.inf)
    overflow = lambda blocks: tuple(jnp.full_like(s, jnp.inf) for s in stats)  # noqa: E731
    for args in ((bad_g, None), (jnp.asarray(g), overflow)):
        b = _factored.accumulate(
            args[0], plan, jnp.asarray(mu), stats, b1, decay, args[1], check_estimates=True
        )
        assert not bool(b.ok)
        np.testing.assert_array_equal(b.mu, mu)
        for s, old in zip(b.stats, stats):
            np.testing.assert_array_equal(s, old)
