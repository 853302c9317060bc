"""One process of a 2-process × 4-device JAX run; started by ``tests/test_multihost.py``.

Usage::

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    python -m tests._multiprocess_worker PORT PROCESS_ID NUM_PROCESSES CKPT_DIR
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m tests._multiprocess_worker reshard CKPT_DIR

Each process joins ``jax.distributed`` on ``localhost:PORT`` (CPU collectives:
gloo, jax's default on CPU), so the 8 devices of both processes form one global
``(4, 2)`` mesh with ``Explicit`` axes. Every base alias then runs ``STEPS``
sharded steps (refreshes included: ``precondition_frequency=2``) on params placed
with :func:`layerwise_optax.state_shardings`'s layout; process 0 also runs the
same steps on one of its own devices (the single-process reference; every
process runs it, so that the processes stay in step) and prints one JSON line
per alias with the largest relative difference.

Then the sharded checkpoint round trip, each process writing its own shards:
the state after ``STEPS`` steps is saved with orbax on the ``(4, 2)`` mesh,
restored onto an ``(8, 1)`` mesh with the target shardings of
``state_shardings`` for that mesh, and continued for ``MORE`` steps; it must
equal the uninterrupted run on the ``(4, 2)`` mesh.

``reshard`` (one process, 8 devices) restores the ``(4, 2)`` state onto
``(8, 1)`` and onto a 4-device ``(2, 2)`` mesh, and moves the saved layout onto
a 3-device mesh that cannot hold it (:func:`layerwise_optax.restore_state`'s
``ValueError``).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

STEPS = 5
MORE = 2
# FSDP over 'data' and tensor parallelism over 'model', mixed per leaf; square
# and rectangular (rank-deficient after one gradient) factors alike.
SHAPES = {
    "dense1": ((16, 16), P("data", "model")),
    "dense2": ((32, 32), P("model", None)),
    "rect": ((64, 48), P("data", "model")),
    "bias": ((32,), P("model")),
    "conv": ((2, 2, 4, 16), P(None, None, None, "model")),
}


def _params():
    rng = np.random.default_rng(0)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, (s, _) in SHAPES.items()}


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return {n: rng.standard_normal(s).astype(np.float32) for n, (s, _) in SHAPES.items()}


def _global(tree, shardings):
    """Host arrays (the same on every process) as global arrays on ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings
    )


def _fetch(tree, mesh):
    """A global tree gathered to every process as NumPy float64 arrays."""
    full = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0), np.float64), full)


def _mesh(shape, devices=None):
    return jax.make_mesh(
        shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2, devices=devices
    )


def _sharded_run(tx, mesh, steps, state=None, first=0):
    import layerwise_optax as lo

    specs = {n: spec for n, (_, spec) in SHAPES.items()}
    param_sh = {n: NamedSharding(mesh, spec) for n, spec in specs.items()}
    state_sh = lo.state_shardings(tx, _params(), specs, mesh=mesh)
    with jax.set_mesh(mesh):
        params = _global(_params(), param_sh)
        if state is None:
            state = jax.jit(tx.init, out_shardings=state_sh)(params)
        update = jax.jit(tx.update, out_shardings=(param_sh, state_sh))
        outs = []
        for t in range(first, first + steps):
            u, state = update(_global(_grads(t), param_sh), state, params)
            outs.append(_fetch(u, mesh))
    return outs, state, state_sh


def _local_run(tx, steps):
    device = jax.local_devices()[0]
    params = jax.device_put(_params(), device)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    outs = []
    for t in range(steps):
        u, state = update(jax.device_put(_grads(t), device), state, params)
        outs.append(jax.tree.map(lambda x: np.asarray(x, np.float64), u))
    return outs


def _checkpoint_case(name, tx, state, ckpt_dir, mesh, uninterrupted=None):
    """Save the (4, 2) mesh's state (each process its shards); restore onto ``mesh``; continue."""
    import orbax.checkpoint as ocp

    import layerwise_optax as lo
    from tests._helpers import max_rel_err

    path = f"{ckpt_dir}/{name}_{'x'.join(map(str, mesh.devices.shape))}"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, lo.checkpointable(state))
    ckpt.wait_until_finished()
    if uninterrupted is None:
        uninterrupted, _, _ = _sharded_run(tx, _mesh((4, 2)), MORE, state, first=STEPS)

    specs = {n: spec for n, (_, spec) in SHAPES.items()}
    shardings = lo.state_shardings(tx, _params(), specs, mesh=mesh)
    # The state's layout on the new mesh: the owner layout's group stacks are
    # padded to a multiple of its device count.
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(tx.init, _params())
    # orbax reads each array at its saved shape (each process only its shards);
    # restore_state cuts or pads the group stacks to the new layout's lengths.
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    raw = ckpt.restore(path, lo.checkpointable(target))
    restored = lo.restore_state(abstract, raw, shardings)
    misplaced = [
        jax.tree_util.keystr(p)
        for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(shardings)
        )
        if not x.sharding.is_equivalent_to(s, x.ndim)
    ]
    # Which shards this process holds of the largest restored leaf (its own only).
    biggest = max(jax.tree.leaves(restored), key=lambda x: x.size)
    local = {d.id for d in jax.local_devices()}
    own = all(s.device.id in local for s in biggest.addressable_shards)
    resumed, _, _ = _sharded_run(tx, mesh, MORE, restored, first=STEPS)
    return uninterrupted, dict(
        alias=name,
        mode="checkpoint",
        mesh=list(mesh.devices.shape),
        max_rel_err=max_rel_err(resumed, uninterrupted),
        misplaced=misplaced,
        only_own_shards=own,
        addressable_of_biggest=len(biggest.addressable_shards),
    )


def main(port, process_id, num_processes, ckpt_dir):
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None,
    )
    from tests._helpers import OPTIMIZERS, SLOW_VARIANTS, build, max_rel_err

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.device_count() == 8 and jax.local_device_count() == 8 // num_processes
    mesh = _mesh((4, 2))
    print(json.dumps(dict(mode="setup", processes=jax.process_count())), flush=True)
    for name, factory, kwargs in OPTIMIZERS:
        if name in SLOW_VARIANTS:
            continue
        tx = build(name, factory, kwargs)
        outs, state, _ = _sharded_run(tx, mesh, STEPS)
        # Every process runs the single-device reference too: the processes must
        # reach each collective within gloo's 30 s rendezvous timeout, so they
        # do the same work (one alone at it made the other time out under load).
        reference = _local_run(tx, STEPS)
        record = dict(alias=name, mode="multiprocess", process=process_id)
        record["max_rel_err"] = max_rel_err(outs, reference)
        print(json.dumps(record), flush=True)
        if ckpt_dir != "-":
            _, record = _checkpoint_case(name, tx, state, ckpt_dir, _mesh((8, 1)))
            print(json.dumps(record), flush=True)
    jax.distributed.shutdown()


def reshard_main(ckpt_dir):
    """One process, 8 devices: (4, 2) → (8, 1) and 8 → 4 devices; and a mesh too small."""
    import layerwise_optax as lo
    from tests._helpers import OPTIMIZERS, SLOW_VARIANTS, build

    assert jax.device_count() == 8, jax.devices()
    for name, factory, kwargs in OPTIMIZERS:
        if name in SLOW_VARIANTS:
            continue
        tx = build(name, factory, kwargs)
        _, state, _ = _sharded_run(tx, _mesh((4, 2)), STEPS)
        uninterrupted = None
        for shape, devices in (((8, 1), None), ((2, 2), jax.devices()[:4])):
            uninterrupted, record = _checkpoint_case(
                name, tx, state, ckpt_dir, _mesh(shape, devices), uninterrupted
            )
            print(json.dumps(record), flush=True)
    # The saved layout moved as it is onto a 3-device mesh: the owner layout's
    # stacks of 8 blocks over 3 devices.
    tx = lo.shampoo(1e-2)
    _, state, saved = _sharded_run(tx, _mesh((4, 2)), 1)
    small = _mesh((3, 1), jax.devices()[:3])
    moved = jax.tree.map(lambda s: NamedSharding(small, s.spec), saved)
    try:
        with jax.set_mesh(_mesh((4, 2))):  # the saved (owner) layout
            like = jax.eval_shape(tx.init, _params())
        lo.restore_state(like, state, moved)
        message = None
    except ValueError as e:
        message = str(e)
    print(json.dumps(dict(mode="too_small", message=message)), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "reshard":
        reshard_main(sys.argv[2])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
