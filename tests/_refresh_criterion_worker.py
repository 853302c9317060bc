"""Worker of tests/test_refresh_criterion.py: SOAP's refresh_skips on 4 simulated devices.

Run with ``--xla_force_host_platform_device_count=4``; prints one JSON line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

import layerwise_optax as lo
from layerwise_optax import _owner


def main():
    params = {"w": jnp.zeros((8, 6)), "v": jnp.zeros((6, 10))}
    grads = [
        {n: jnp.sin(jnp.arange(p.size) * (t + 1.0)).reshape(p.shape) for n, p in params.items()}
        for t in range(5)
    ]

    def run(layout):
        tx = lo.soap(1e-2, precondition_frequency=1, refresh_tolerance=0.3, state_layout=layout)
        st = tx.init(params)
        up = jax.jit(tx.update)
        us = []
        for g in grads:
            u, st = up(g, st, params)
            us.append(u)
        return us, st

    mesh = jax.make_mesh((4,), ("d",))
    ref_u, ref = run("replicated")
    with jax.set_mesh(mesh):
        out_u, out = run("owner")
        padding = _owner.layout_of(out).padding()
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for x, y in zip(ref_u, out_u)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )
    # pmap mapped layout
    tx = lo.soap(
        1e-2, precondition_frequency=1, refresh_tolerance=0.3, state_layout="owner", owner_axes="i"
    )
    st = jax.pmap(tx.init, axis_name="i")(jax.tree.map(lambda p: jnp.stack([p] * 4), params))
    up = jax.pmap(tx.update, axis_name="i")
    for g in grads:
        gg = jax.tree.map(lambda p: jnp.stack([p] * 4), g)
        _, st = up(gg, st, jax.tree.map(lambda p: jnp.stack([p] * 4), params))
    print(
        json.dumps(
            dict(
                padding=padding,
                replicated=int(ref[0].refresh_skips),
                owner=int(out[0].refresh_skips),
                max_diff=diff,
                pmap=np.asarray(st[0].refresh_skips).tolist(),
            )
        )
    )


if __name__ == "__main__":
    main()
