"""Checkpointing an ``nnx.Optimizer`` with orbax: save, restore, continue bit for bit.

The recipe of the README's "Checkpoints" section for Flax NNX: save
``lo.checkpointable(nnx.state(optimizer))`` (orbax refuses the empty per-axis
placeholder arrays: ``Cannot save arrays with zero size``), restore without a
target and rebuild with ``lo.restore_state(nnx.state(fresh_optimizer), raw)``,
then ``nnx.update(fresh_optimizer, state)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layerwise_optax as lo

nnx = pytest.importorskip("flax.nnx")
ocp = pytest.importorskip("orbax.checkpoint")
lof = pytest.importorskip("layerwise_optax.flax")

# Every alias (the base entry of each family in tests/_helpers.OPTIMIZERS), with
# refreshes inside the resumed interval.
ALIASES = {
    "shampoo": lambda: lo.shampoo(3e-2, precondition_frequency=2),
    "soap": lambda: lo.soap(3e-2, precondition_frequency=2),
    "kfac": lambda: lo.kfac(3e-2, precondition_frequency=2),
    "muon": lambda: lo.muon(2e-2),
    "normuon": lambda: lo.normuon(3e-2),
    "dion": lambda: lo.dion(2e-2, rank_fraction=0.5),
    "steepest_descent": lambda: lo.steepest_descent(2e-2),
    "psgd_kron": lambda: lo.psgd_kron(3e-2, precond_update_prob=1.0),
}


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 8, rngs=rngs)
        self.l3 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def _batch(i):
    x = jax.random.normal(jax.random.key(100 + i), (16, 5))
    return x, jnp.sin(x[:, :3]) + 0.1 * x[:, 3:4]


def _make(name):
    model = _MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, ALIASES[name](), wrt=nnx.Param)


def _stepper(name):
    if name == "kfac":
        grad_fn = lof.kfac_value_and_grad(lambda m, x: m(x), "mse")

        @nnx.jit
        def step(model, optimizer, x, y):
            loss, grads, stats = grad_fn(model, x, y)
            optimizer.update(model, grads, kfac_stats=stats)
            return loss

        return step

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    return step


def _run(step, model, optimizer, steps):
    return [float(step(model, optimizer, *_batch(i))) for i in steps]


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# Default tier: the aliases with empty placeholders (Shampoo), statistics passed
# through update (K-FAC) and a PRNG key in the state (PSGD); the others run slow.
_DEFAULT_TIER = {"shampoo", "kfac", "psgd_kron"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if n in _DEFAULT_TIER else [pytest.mark.slow]) for n in ALIASES],
)
def test_nnx_optimizer_checkpoint_resume_is_bit_identical(name, tmp_path):
    step = _stepper(name)
    model, optimizer = _make(name)
    full = _run(step, model, optimizer, range(6))
    full_params, full_opt = nnx.state(model, nnx.Param), nnx.state(optimizer)

    model, optimizer = _make(name)
    first = _run(step, model, optimizer, range(3))
    ckpt = ocp.StandardCheckpointer()
    if any(np.size(x) == 0 for x in jax.tree.leaves(nnx.state(optimizer))):
        # The failure the recipe avoids (issue: plain saving of nnx.state(optimizer)).
        with pytest.raises(ValueError, match="zero size"):
            ckpt.save(tmp_path / "plain", nnx.state(optimizer))
    ckpt.save(
        tmp_path / "ckpt",
        {
            "model": nnx.state(model, nnx.Param),
            "optimizer": lo.checkpointable(nnx.state(optimizer)),
        },
    )
    ckpt.wait_until_finished()
    saved_opt = _bytes(nnx.state(optimizer))

    # A fresh process would build the same model and optimizer, then restore.
    model, optimizer = _make(name)
    raw = ckpt.restore(tmp_path / "ckpt")
    nnx.update(model, lo.restore_state(nnx.state(model, nnx.Param), raw["model"]))
    nnx.update(optimizer, lo.restore_state(nnx.state(optimizer), raw["optimizer"]))
    assert _bytes(nnx.state(optimizer)) == saved_opt
    second = _run(step, model, optimizer, range(3, 6))
    ckpt.close()

    assert first + second == full
    assert _bytes(nnx.state(model, nnx.Param)) == _bytes(full_params)
    assert _bytes(nnx.state(optimizer)) == _bytes(full_opt)
