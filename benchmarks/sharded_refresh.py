"""Shampoo's refresh and state on a simulated 8-device mesh against one device.

An MLP (784-1024-1024-1024-10 by default) with ``block_size=128`` has a few
hundred 128×128 factor blocks. With a mesh set (``jax.set_mesh``) the refresh
batches the same-sized blocks of all leaves and splits each batch over the
devices (:mod:`layerwise_optax._distribute`). Measured from the compiled
programs, not timed (8 simulated devices share this machine's cores, so wall
time says nothing about a real mesh):

* blocks per device: the local batch shapes of the refresh's ``shard_map``
  bodies, i.e. how many inverse roots each device computes;
* refresh FLOPs per device: XLA's cost analysis of the compiled refresh with the
  Newton root method (matmuls; LAPACK's eigh is a custom call XLA does not
  count), with and without spreading;
* state bytes per device: the addressable shard of every state leaf under
  :func:`layerwise_optax.state_shardings` with FSDP specs (first axis over
  'data') against the whole state on one device.

Run: ``python -m benchmarks.sharded_refresh [--quick] [--out DIR]``; it starts
itself in a subprocess with ``--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

DEVICES = 8


def _measure(sizes, block_size):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import layerwise_optax as lo
    from layerwise_optax import _axes, _kron

    assert jax.device_count() == DEVICES, jax.devices()
    params = {
        f"layer{i}": jax.ShapeDtypeStruct((a, b), jnp.float32)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    plans = _axes.resolve(None, params, max_precond_dim=1024, block_size=block_size)
    # The replicated layout's refresh, spread by ``distribute`` (the owner layout
    # refreshes each device's own blocks without it: benchmarks/sharded_state.py).
    tx = lo.scale_by_shampoo(block_size=block_size, root_method="newton", state_layout="replicated")
    state = jax.eval_shape(tx.init, params)
    stats = state.stats
    blocks = sum(
        x.shape[0] for x in jax.tree.leaves(stats) if x.ndim == 3 and x.shape[-1] == x.shape[-2]
    )

    def refresh(distribute):
        def run(stats, roots):
            return _kron.inverse_roots_tree(
                stats,
                roots,
                plans,
                root=lambda plan: 2 * max(plan.num_factors, 1),
                damping=1e-6,
                relative_damping=True,
                method="newton",
                distribute=distribute,
            )

        return run

    out = {"blocks": blocks, "devices": DEVICES}
    with jax.set_mesh(mesh):
        for distribute in (False, True):
            fn = refresh(distribute)
            jaxpr = jax.make_jaxpr(fn)(stats, state.roots)
            local = [
                [v.aval.shape for v in eqn.params["jaxpr"].invars]
                for eqn in jaxpr.jaxpr.eqns
                if eqn.primitive.name == "shard_map"
            ]
            cost = jax.jit(fn).lower(stats, state.roots).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            key = "spread" if distribute else "replicated"
            out[f"refresh_flops_per_device_{key}"] = float(cost["flops"])
            out[f"blocks_per_device_{key}"] = (
                sum(shapes[0][0] for shapes in local) if local else blocks
            )
            out[f"local_batches_{key}"] = [list(shapes[0]) for shapes in local]
    out["refresh_flops_reduction"] = (
        out["refresh_flops_per_device_replicated"] / out["refresh_flops_per_device_spread"]
    )
    out["largest_share_reduction"] = blocks / out["blocks_per_device_spread"]

    # State memory per device: FSDP over 'data' (first axis), replicated factors.
    specs = {n: P("data", None) for n in params}
    shard = lo.state_shardings(tx, params, specs, mesh=mesh)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_device = 0
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shard)):
        shape = s.shard_shape(x.shape)
        per_device += math.prod(shape) * x.dtype.itemsize
    moments = sum(
        math.prod(x.shape) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shard))
        if not s.is_fully_replicated
    )
    out.update(
        state_bytes_one_device=total,
        state_bytes_per_device=per_device,
        state_bytes_sharded_part=moments,
        state_reduction=total / per_device,
    )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller MLP (CI smoke run)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [64, 96, 96, 10] if args.quick else [784, 1024, 1024, 1024, 10]
    block = 32 if args.quick else 128
    if args.child:
        print(json.dumps(_measure(sizes, block)))
        return
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    cmd = [sys.executable, "-m", "benchmarks.sharded_refresh", "--child"]
    cmd += ["--quick"] if args.quick else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    from benchmarks import harness

    path = harness.write_record(
        args.out,
        "sharded_refresh",
        {"sizes": sizes, "block_size": block, "quick": args.quick},
        results,
    )
    for k, v in results.items():
        if not k.startswith("local_batches"):
            print(f"{k:40s} {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
