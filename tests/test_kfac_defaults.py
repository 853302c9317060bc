"""K-FAC with its default hyperparameters on the paper's problems and an ordinary classifier."""

import jax
import numpy as np
import optax
import pytest

import layerwise_optax as lo

nnx = pytest.importorskip("flax.nnx")
lof = pytest.importorskip("layerwise_optax.flax")


def test_one_sided_kfac_with_default_damping_mode_is_the_papers_single_index_step():
    # Issue 20 item 5: the single-index network (d = 200, N = 400, n = 2000,
    # kappa = 100, tanh, squared error). The pi rule used to take the scale of the
    # output factor that sides='input' never applies (B ~ 1e-6 here), damping A by
    # ~30-90 I: alignment 0.615 (damping 1e-2) and 0.627 (default damping), SGD's
    # 0.609. The damping of A ⊗ I + lambda I is lambda on A: 0.979.
    from layerwise_optax.zoo import _single_index as si

    d, width, n = 200, 400, 2000
    problem = si.single_index_problem(jax.random.key(0), d=d, kappa=100.0)
    k_init, k_data = jax.random.split(jax.random.key(1))
    model = si.TwoLayerNet(d, width, rngs=nnx.Rngs(k_init))
    x, y = si.sample_single_index(problem, k_data, n)
    capture = nnx.jit(lof.kfac_value_and_grad(lambda m, x: m(x), "mse"))
    _, grads, stats = capture(model, x, y)
    params, grads = nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(grads)

    def alignment(tx):
        tx = optax.with_extra_args_support(tx)
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
        v = si.top_right_singular_vector(-np.asarray(u["first"]["kernel"]).T)
        return si.alignment(v, problem.beta)

    sgd = alignment(optax.sgd(1.0))
    for damping in (1e-2, 1e-3):
        got = alignment(lo.kfac(1.0, b1=0.0, factor_decay=0.0, damping=damping, sides="input"))
        assert got >= 0.95, (damping, got, sgd)
    assert sgd < 0.65
