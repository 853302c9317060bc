"""``kfac(diagonal_fallback=False)`` (issue 17 item 4): no params-shaped second moment for
the leaves with a K-FAC layout, the same updates, and a clear error when such a leaf lacks
its factors.

kfac-jax keeps no diagonal-fallback moment (every parameter must belong to a registered
layer); with this option our state is the same size on the benchmark MLP
(``benchmarks/kfac_step.py``).
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "l1": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
        # Rank-deficient statistics below (3 rows for a 5 x 5 input factor).
        "l2": {"kernel": jax.random.normal(k[1], (5, 3)), "bias": jnp.zeros(3)},
        "conv": jax.random.normal(k[2], (2, 2, 3, 4)),
        "norm": {"scale": jnp.ones(3)},
    }


def _stats(i, norm=True):
    k = jax.random.split(jax.random.key(100 + i), 4)
    a1 = jax.random.normal(k[0], (9, 7))
    a2 = jax.random.normal(k[1], (3, 6))
    a3 = jax.random.normal(k[2], (20, 12))
    g3 = jax.random.normal(k[3], (20, 4))
    stats = {
        "l1": {
            "kernel": lo.KfacFactors(a1.T @ a1 / 9, jnp.eye(5)),
            "bias": lo.FoldedBias("l1/kernel"),
        },
        "l2": {
            "kernel": lo.KfacFactors(a2.T @ a2 / 3, 2 * jnp.eye(3)),
            "bias": lo.FoldedBias("l2/kernel"),
        },
        "conv": lo.KfacFactors(a3.T @ a3 / 20, g3.T @ g3 / 20),
    }
    if norm:  # a norm leaf has no K-FAC layout: its own diagonal block, in nu
        stats["norm"] = {"scale": lo.KfacDiagonal(jnp.abs(jax.random.normal(k[0], (3,))))}
    return stats


def _grads(i, params):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + i), p.shape), params)


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _run(tx, params, steps=5, every=1):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for i in range(steps):
        stats = _stats(i) if i % every == 0 else None
        u, state = update(_grads(i, params), state, params, kfac_stats=stats)
        out.append(u)
    return out, state


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"statistics_frequency": 2},
        {"inverse": "eigh", "damping_mode": "exact"},
    ],
    ids=["every_step", "statistics_frequency_2", "eigh"],
)
def test_updates_are_bit_identical_and_the_state_drops_the_kernels_second_moment(kw):
    params = _params()
    with_fb, state_fb = _run(
        lo.kfac(0.1, precondition_frequency=2, **kw),
        params,
        every=kw.get("statistics_frequency", 1),
    )
    without, state = _run(
        lo.kfac(0.1, precondition_frequency=2, diagonal_fallback=False, **kw),
        params,
        every=kw.get("statistics_frequency", 1),
    )
    for a, b in zip(with_fb, without):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    # Exactly the kernels' and folded biases' nu is gone; the norm keeps its EMA.
    kernel_floats = 6 * 5 + 5 + 5 * 3 + 3 + 2 * 2 * 3 * 4
    assert _nbytes(state_fb) - _nbytes(state) == 4 * kernel_floats
    nu = state[0].nu
    assert nu["l1"]["kernel"].shape == (0, 0) and nu["l1"]["bias"].shape == (0,)
    assert nu["conv"].shape == (0, 0, 0, 0)
    np.testing.assert_array_equal(nu["norm"]["scale"], state_fb[0].nu["norm"]["scale"])


def test_owner_layout_on_a_mesh_gives_the_same_updates():
    params = _params()
    mesh = jax.make_mesh((1,), ("data",))
    runs = []
    with jax.set_mesh(mesh):
        for fb in (True, False):
            tx = lo.kfac(0.1, precondition_frequency=2, diagonal_fallback=fb, state_layout="owner")
            runs.append(_run(tx, params, steps=3))
    (ref, state_fb), (got, state) = runs
    for a, b in zip(ref, got):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert _nbytes(state_fb) - _nbytes(state) == 4 * (6 * 5 + 5 + 5 * 3 + 3 + 48)


def test_a_kernel_without_its_factors_is_an_error_naming_it():
    params = _params()
    tx = lo.kfac(0.1, diagonal_fallback=False)
    state = tx.init(params)
    grads = _grads(0, params)
    missing = _stats(0)
    missing["conv"] = None
    with pytest.raises(
        ValueError, match=r"param \['conv'\] no statistics.*diagonal_fallback=False"
    ):
        tx.update(grads, state, params, kfac_stats=missing)
    absent = _stats(0)
    del absent["conv"]
    with pytest.raises(ValueError, match=r"param \['conv'\] no statistics"):
        tx.update(grads, state, params, kfac_stats=absent)
    diagonal = _stats(0)
    diagonal["conv"] = lo.KfacDiagonal(jnp.ones((2, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"\['conv'\]"):
        tx.update(grads, state, params, kfac_stats=diagonal)
    # With the fallback kept, the same statistics are fine (conv takes the fallback).
    tx = lo.kfac(0.1)
    tx.update(grads, tx.init(params), params, kfac_stats=missing)
    # A leaf left to the fallback by its layout keeps its moment and may have None.
    dims = lambda tree: (
        jax.tree.map(lambda _: None, tree)
        | {  # noqa: E731
            "l1": {"kernel": lo.DimensionNumbers(((0,), (1,))), "bias": lo.FoldedBias("l1/kernel")},
            "l2": {"kernel": lo.DimensionNumbers(((0,), (1,))), "bias": lo.FoldedBias("l2/kernel")},
        }
    )
    tx = lo.kfac(0.1, dimension_numbers=dims, diagonal_fallback=False)
    state = tx.init(params)
    assert state[0].nu["conv"].shape == (2, 2, 3, 4) and state[0].nu["l1"]["kernel"].shape == (0, 0)
    u, _ = tx.update(grads, state, params, kfac_stats=missing)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_under_multi_steps_and_inject_hyperparams():
    params = _params()
    results = []
    for fb in (True, False):
        tx = lo.multi_steps(
            lo.inject_hyperparams(lo.kfac)(learning_rate=0.1, diagonal_fallback=fb), 2
        )
        state = tx.init(params)
        for i in range(4):
            # multi_steps keeps only Kronecker statistics: the norm takes the fallback.
            stats = _stats(i, norm=False) | {"norm": {"scale": None}}
            u, state = jax.jit(tx.update)(_grads(i, params), state, params, kfac_stats=stats)
        results.append(u)
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_eight_devices_owner_layout_and_state_shardings():
    """On 8 simulated devices with FSDP specs: the placeholders take the params' specs,
    the updates equal the fallback-keeping run, each device saves its kernels' share."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import layerwise_optax as lo
        k = jax.random.split(jax.random.key(0), 2)
        params = {"l1": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(8)},
                  "l2": {"kernel": jax.random.normal(k[1], (8, 24)), "bias": jnp.zeros(24)}}
        def stats(i):
            kk = jax.random.split(jax.random.key(i), 2)
            a1 = jax.random.normal(kk[0], (9, 17)); a2 = jax.random.normal(kk[1], (4, 9))
            return {"l1": {"kernel": lo.KfacFactors(a1.T @ a1 / 9, jnp.eye(8)),
                           "bias": lo.FoldedBias("l1/kernel")},
                    "l2": {"kernel": lo.KfacFactors(a2.T @ a2 / 4, 2 * jnp.eye(24)),
                           "bias": lo.FoldedBias("l2/kernel")}}
        specs = {"l1": {"kernel": P("data", None), "bias": P(None)},
                 "l2": {"kernel": P("data", None), "bias": P("data")}}
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
        res, per_device = {}, {}
        for fb in (True, False):
            with jax.set_mesh(mesh):
                named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
                ps = jax.tree.map(jax.device_put, params, named)
                tx = lo.kfac(0.1, precondition_frequency=2, diagonal_fallback=fb)
                st = jax.jit(tx.init, out_shardings=lo.state_shardings(tx, ps, named))(ps)
                for i in range(3):
                    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + i), p.shape), ps)
                    u, st = jax.jit(tx.update)(g, st, ps, kfac_stats=stats(i))
                res[fb] = [np.asarray(x) for x in jax.tree.leaves(u)]
                per_device[fb] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(st))
        for a, b in zip(res[True], res[False]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        # Per device: l1's kernel (16 x 8 / 8) and its replicated bias (8), l2's (8 x 24 / 8, 24 / 8).
        assert per_device[True] - per_device[False] == 4 * (16 + 8 + 24 + 3), per_device
        print("ok")
        """
    )
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kfac_jax_sized_state_on_the_benchmark_mlp():
    """The benchmark MLP (784-512-512-10, biases folded): without the fallback moment the
    state is the factors, their inverses, the momentum and scalars, no more."""
    sizes = [(784, 512), (512, 512), (512, 10)]
    params = {
        f"l{i}": {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[1])} for i, s in enumerate(sizes)
    }
    full = jax.eval_shape(lo.kfac(0.1).init, params)
    lean = jax.eval_shape(lo.kfac(0.1, diagonal_fallback=False).init, params)
    n_params = sum(a * b + b for a, b in sizes)

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    assert nbytes(full) - nbytes(lean) == 4 * n_params
    factors = sum((a + 1) ** 2 + b**2 for a, b in sizes)
    # factors + inverses (float32), momentum (params-shaped), a few scalars and flags.
    assert nbytes(lean) - 4 * (2 * factors + n_params) < 200
