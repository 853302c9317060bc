"""Runs every base alias on a simulated 8-device mesh; prints one JSON line per alias.

Started by ``tests/test_sharding.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is fixed
when JAX starts, so it cannot run inside the pytest process).
Usage: ``python -m tests._sharded_worker auto,explicit,mix,pmap,errors,spread,owner,traffic,routes,owner_pmap``
(any subset; ``owner_pmap_<alias>`` runs one alias's every pmap owner-layout case).
"""

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import layerwise_optax as lo
from tests._helpers import OPTIMIZERS, SLOW_VARIANTS, build, max_rel_err

STEPS = 5
# FSDP over 'data' and tensor parallelism over 'model', mixed per leaf. Square
# factors: a single gradient then gives full-rank statistics, so that comparing with
# the single-device run measures round-off, not the (damping-amplified) round-off
# of a rank-deficient factor's null space.
SHAPES = {
    "dense1": ((16, 16), P("data", "model")),
    "dense2": ((32, 32), P("model", None)),
    "bias": ((32,), P("model")),
    "conv": ((2, 2, 4, 16), P(None, None, None, "model")),
    "embed": ((16, 16), P("data", None)),
}


def _params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {n: 0.1 * jax.random.normal(k, s) for (n, (s, _)), k in zip(SHAPES.items(), keys)}


def _grads(params, step):
    keys = jax.random.split(jax.random.key(100 + step), len(params))
    return {n: jax.random.normal(k, p.shape) for (n, p), k in zip(params.items(), keys)}


def _run(tx, params, place=lambda t: t, init=None, update=None):
    init = init or jax.jit(tx.init)
    update = update or jax.jit(tx.update)
    state = init(place(params))
    outs = []
    for t in range(STEPS):
        u, state = update(place(_grads(params, t)), state, place(params))
        outs.append(u)
    return outs, state


def mesh_case(name, factory, kwargs, axis_type, reference):
    params = _params()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    shardings = {n: NamedSharding(mesh, spec) for n, (_, spec) in SHAPES.items()}
    tx = build(name, factory, kwargs)
    promised = lo.state_shardings(
        tx, params, {n: spec for n, (_, spec) in SHAPES.items()}, mesh=mesh
    )
    with jax.set_mesh(mesh):
        init = jax.jit(tx.init, out_shardings=promised)
        update = jax.jit(tx.update, out_shardings=(shardings, promised))
        outs, state = _run(tx, params, lambda t: jax.device_put(t, shardings), init, update)
    wrong = [
        jax.tree_util.keystr(path)
        for path, leaf, want in zip(
            *zip(*jax.tree_util.tree_flatten_with_path(state)[0]),
            jax.tree.leaves(promised),
        )
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim)
    ]
    sharded_moments = sum(
        1 for leaf in jax.tree.leaves(state) if leaf.ndim and not leaf.sharding.is_fully_replicated
    )
    return dict(
        alias=name,
        mode=str(axis_type),
        max_rel_err=max_rel_err(outs, reference),
        update_specs={n: str(u.sharding.spec) for n, u in outs[-1].items()},
        wrong_state_shardings=wrong,
        sharded_state_leaves=sharded_moments,
    )


# Issue 20 item 7: muon crashed (``ShardingTypeError: select cases must have the
# same shardings``) on this mix under Explicit axes, with the state made by a plain
# ``tx.init`` (no out_shardings): its Adam moments were replicated, the gradient not.
MIX = {"w": ((64, 48), P("data", "model")), "b": ((48,), P("model"))}


def mix_case(name, factory, kwargs):
    """Plain eager ``init`` (from sharded and from unsharded params), jitted updates."""
    params = {
        n: jax.random.normal(jax.random.key(i), s) for i, (n, (s, _)) in enumerate(MIX.items())
    }
    grads = [jax.tree.map(lambda x, t=t: jnp.cos(x + t), params) for t in range(2)]
    tx = build(name, factory, kwargs)
    state = tx.init(params)
    reference = []
    for g in grads:
        u, state = tx.update(g, state, params)
        reference.append(u)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    shardings = {n: NamedSharding(mesh, spec) for n, (_, spec) in MIX.items()}
    out = dict(alias=name, mode="mix")
    for init_from in ("sharded", "plain"):
        with jax.set_mesh(mesh):
            p = jax.device_put(params, shardings)
            state = tx.init(p if init_from == "sharded" else params)
            outs = []
            update = jax.jit(tx.update)
            for g in grads:
                u, state = update(jax.device_put(g, shardings), state, p)
                outs.append(u)
        out[f"{init_from}_max_rel_err"] = max_rel_err(outs, reference)
        out[f"{init_from}_update_specs"] = {n: str(x.sharding.spec) for n, x in outs[-1].items()}
    return out


def pmap_case(name, factory, kwargs, reference):
    params = _params()
    tx = build(name, factory, kwargs)
    n = jax.local_device_count()

    def replicate(t):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)

    init = jax.pmap(tx.init, axis_name="batch")

    # Each device sees its own gradient shard; the mean over 'batch' is the
    # full-batch gradient (the reference uses it directly).
    def step(g, s, p):
        return tx.update(jax.lax.pmean(g, "batch"), s, p)

    update = jax.pmap(step, axis_name="batch")
    state = init(replicate(params))
    outs = []
    for t in range(STEPS):
        g = _grads(params, t)
        noise = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), (n,) + x.shape), g)
        noise = jax.tree.map(lambda z: z - z.mean(0, keepdims=True), noise)
        per_device = jax.tree.map(lambda x, z: x[None] + z, g, noise)
        u, state = update(per_device, state, replicate(params))
        outs.append(jax.tree.map(lambda x: x[0], u))
        same = all(bool(jnp.all(x == x[:1])) for x in jax.tree.leaves(u))
        assert same, "devices disagree"
    return dict(alias=name, mode="pmap", max_rel_err=max_rel_err(outs, reference))


def pmap_stats_case():
    """K-FAC inside pmap averages per-device statistics over ``axis_name``."""
    n = jax.local_device_count()
    params = {"w": jnp.zeros((6, 4))}
    keys = jax.random.split(jax.random.key(3), 2)

    def spd(k, d):
        x = jax.random.normal(k, (n, d, 2 * d))
        return jnp.einsum("nij,nkj->nik", x, x) / (2 * d)

    a, b = spd(keys[0], 6), spd(keys[1], 4)
    grads = {"w": jax.random.normal(jax.random.key(4), (6, 4))}
    single = lo.kfac(1e-2)
    state = single.init(params)
    stats = {"w": lo.KfacFactors(a.mean(0), b.mean(0))}
    reference = []
    for _ in range(STEPS):
        u, state = jax.jit(single.update)(grads, state, params, kfac_stats=stats)
        reference.append(u)
    tx = lo.kfac(1e-2, axis_name="batch")

    def step(g, s, p, a, b):
        return tx.update(g, s, p, kfac_stats={"w": lo.KfacFactors(a, b)})

    update = jax.pmap(step, axis_name="batch")
    rep = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), (grads, params))
    state = jax.pmap(tx.init)(rep[1])
    outs = []
    for _ in range(STEPS):
        u, state = update(rep[0], state, rep[1], a, b)
        outs.append(jax.tree.map(lambda x: x[0], u))
    return dict(mode="pmap_stats", max_rel_err=max_rel_err(outs, reference))


def errors_case():
    """Bad partition specs, checked by state_shardings: (case, message) pairs."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = {"layer": {"w": jnp.zeros((6, 8))}}
    tx = lo.shampoo(1e-2)
    out = []
    for case, spec in (
        ("missing_axis", P("data", "tensor")),
        ("too_many_entries", P("data", None, "model")),
        ("not_divisible", P("data", "model")),
    ):
        try:
            lo.state_shardings(tx, params, {"layer": {"w": spec}}, mesh=mesh)
            out.append((case, None))
        except ValueError as e:
            out.append((case, str(e)))
    return dict(mode="errors", results=out)


# Issue 15: rectangular, rank-deficient leaves (3 x 200 has rank <= 3 per step, so
# its 200 x 200 factor is nearly all null space at the first refreshes) and a
# vector, FSDP over 'data' and tensor-parallel over 'model'.
OWNER_SHAPES = {
    "w": ((64, 48), P("data", "model")),
    "v": ((3, 200), P(None, "data")),
    "b": ((48,), P("model")),
}
OWNER_MESHES = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (4, 2)}
# Every device count under both axis types (the slow tier's ``owner`` mode), or a
# cover of both axis types and of one, a few and all devices (``owner_quick_<alias>``).
OWNER_GRID = tuple((n, t) for n in OWNER_MESHES for t in (AxisType.Auto, AxisType.Explicit))
OWNER_GRID_QUICK = ((1, AxisType.Auto), (2, AxisType.Explicit), (8, AxisType.Auto))


def _layout_aliases():
    """Aliases whose factory takes ``state_layout`` (the owner layout's)."""
    import inspect

    return [
        (name, factory, kwargs)
        for name, factory, kwargs in OPTIMIZERS
        if name not in SLOW_VARIANTS and "state_layout" in inspect.signature(factory).parameters
    ]


def _per_device_bytes(state):
    totals = {}
    for x in jax.tree.leaves(state):
        for shard in x.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return max(totals.values())


def _replicated_reference(name, factory, kw, params, grads):
    """The replicated layout's updates and final state on one device (the owner cases' reference)."""
    tx = build(name, factory, {**kw, "state_layout": "replicated"})
    state = tx.init(params)
    reference = []
    for g in grads:
        u, state = jax.jit(tx.update)(g, state, params)
        reference.append(u)
    return reference, state


def _owner_variants(factory):
    """``(variant, shapes, extra kwargs)``: one block per leaf, then many blocks per group.

    ``plain``: the issue's leaves, one block each, so each group has fewer blocks
    than devices (padded; ``'auto'`` keeps whichever layout stores less per
    device). ``many``: 12 and 13 blocks per leaf with ``block_size=16`` where the
    optimizer blocks, else twelve same-shaped layers: the stacks split over
    the devices.
    """
    import inspect

    yield "plain", OWNER_SHAPES, {}
    if "block_size" in inspect.signature(factory).parameters:
        yield "many", OWNER_SHAPES, {"block_size": 16}
    else:
        layers = {f"w{i}": ((32, 24), P("data", "model")) for i in range(12)}
        yield "many", {**layers, "b": OWNER_SHAPES["b"]}, {}


def owner_case(name, factory, kwargs, grid=OWNER_GRID):
    """Default layout (owner under a mesh) on the ``grid``'s meshes vs one device, replicated.

    ``grid``: ``(devices, axis type)`` pairs, the mesh of :data:`OWNER_MESHES` each.
    """
    from layerwise_optax import _owner

    out = dict(alias=name, mode="owner")
    for variant, shapes, extra in _owner_variants(factory):
        params, grads, kw = _owner_problem(name, factory, kwargs, shapes, extra)
        reference, state = _replicated_reference(name, factory, kw, params, grads)
        out[f"{variant}_ref_counts"] = [int(c) for c in lo.failure_counts(state)]
        out[f"{variant}_ref_bytes"] = _per_device_bytes(state)
        out[f"{variant}_specs"] = {k: str(spec) for k, (_, spec) in shapes.items()}
        tx = build(name, factory, kw)
        for n, axis_type in grid:
            mesh = jax.make_mesh(
                OWNER_MESHES[n],
                ("data", "model"),
                axis_types=(axis_type,) * 2,
                devices=jax.devices()[:n],
            )
            specs = {k: spec for k, (_, spec) in shapes.items()}
            shardings = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}
            promised = lo.state_shardings(tx, params, specs, mesh=mesh)
            with jax.set_mesh(mesh):
                p = jax.device_put(params, shardings)
                state = jax.jit(tx.init, out_shardings=promised)(p)
                update = jax.jit(tx.update, out_shardings=(shardings, promised))
                outs = []
                for g in grads:
                    u, state = update(jax.device_put(g, shardings), state, p)
                    outs.append(u)
            key = f"{variant}_{n}_{axis_type}"
            layout = _owner.layout_of(state)
            out[f"layout_{key}"] = None if layout is None else [layout.devices, list(layout.axes)]
            out[f"err_{key}"] = max_rel_err(outs, reference)
            out[f"bytes_{key}"] = _per_device_bytes(state)
            out[f"counts_{key}"] = [int(c) for c in lo.failure_counts(state)]
            out[f"specs_{key}"] = {k: str(x.sharding.spec) for k, x in outs[-1].items()}
    return out


def _owner_problem(name, factory, kwargs, shapes, extra):
    """Params, 5 gradients (one NaN at step 3) and the options of an owner-layout run."""
    params = {
        n: jax.random.normal(jax.random.key(i), s) for i, (n, (s, _)) in enumerate(shapes.items())
    }
    grads = [
        {
            n: jax.random.normal(jax.random.key(100 * t + i), x.shape)
            for i, (n, x) in enumerate(params.items())
        }
        for t in range(STEPS)
    ]
    first = next(iter(params))
    grads[3][first] = grads[3][first].at[1, 2].set(jnp.nan)
    kw = {**kwargs, "precondition_frequency": 2, **extra}
    if name == "psgd_kron":
        kw.pop("precondition_frequency")
    return params, grads, kw


def owner_pmap_case(name, factory, kwargs, variants, counts):
    """The owner layout inside ``jax.pmap`` on ``counts`` devices vs one device, replicated.

    ``init`` runs inside the pmap (``owner_axes='batch'``), so each device's state
    holds its own share of every group stack; the gradients are the same on every
    device (as after a ``pmean``).
    """
    from layerwise_optax import _owner

    out = dict(alias=name, mode="owner_pmap")
    for variant, shapes, extra in _owner_variants(factory):
        if variant not in variants:
            continue
        params, grads, kw = _owner_problem(name, factory, kwargs, shapes, extra)
        reference, state = _replicated_reference(name, factory, kw, params, grads)
        out[f"{variant}_ref_counts"] = [int(c) for c in lo.failure_counts(state)]
        out[f"{variant}_ref_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state))
        tx = build(name, factory, {**kw, "state_layout": "owner", "owner_axes": "batch"})
        for n in counts:
            devices = jax.devices()[:n]

            def replicate(t, n=n):
                return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)

            state = jax.pmap(tx.init, axis_name="batch", devices=devices)(replicate(params))
            update = jax.pmap(tx.update, axis_name="batch", devices=devices)
            outs = []
            agree = True
            for g in grads:
                u, state = update(replicate(g), state, replicate(params))
                agree &= all(bool(jnp.all(x == x[:1])) for x in jax.tree.leaves(u))
                outs.append(jax.tree.map(lambda x: x[0], u))
            key = f"{variant}_{n}"
            layout = _owner.layout_of(state)
            out[f"layout_{key}"] = [layout.devices, list(layout.axes), layout.mapped]
            # Per group: (real blocks, padded length, stack length each device holds).
            lengths = set()
            for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _owner.Grouped)):
                if isinstance(node, _owner.Grouped):
                    for g, b in zip(node.layout.groups, node.blocks):
                        for x in jax.tree.leaves(b):
                            lengths.add((g.size, g.padded, x.shape[0], x.shape[1]))
            out[f"stacks_{key}"] = sorted(lengths)
            out[f"err_{key}"] = max_rel_err(outs, reference)
            out[f"agree_{key}"] = agree
            # Each device holds entry [i] of every state array (leading pmap axis).
            out[f"bytes_{key}"] = sum(x.nbytes // n for x in jax.tree.leaves(state))
            # The counts of every device (the failed refreshes are summed over them).
            out[f"counts_{key}"] = sorted(
                {
                    tuple(
                        int(c) for c in lo.failure_counts(jax.tree.map(lambda x, i=i: x[i], state))
                    )
                    for i in range(n)
                }
            )
    return out


def owner_pmap_kfac_case():
    """K-FAC's owner-layout problem of ``tests/test_owner.py`` (folded bias, a group in
    which one kernel has no statistics, batch axes, a NaN step, bad statistics) in
    the pmap owner layout on 4 devices vs one device, replicated."""
    from tests.test_owner import _kfac_problem

    params, spec, grads, stats = _kfac_problem(5, nan_at=3, bad_stats_at=1)
    kw = {"precondition_frequency": 2, "dimension_numbers": spec}
    ref = lo.kfac(1e-2, **kw, state_layout="replicated")
    state = ref.init(params)
    reference = []
    for g, st in zip(grads, stats):
        u, state = jax.jit(ref.update)(g, state, params, kfac_stats=st)
        reference.append(u)
    ref_counts = [int(c) for c in lo.failure_counts(state)]
    tx = lo.kfac(1e-2, **kw, state_layout="owner", owner_axes="batch")
    four = jax.devices()[:4]

    def rep(t):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (4,) + x.shape), t)

    state = jax.pmap(tx.init, axis_name="batch", devices=four)(rep(params))
    update = jax.pmap(
        lambda g, s, p, k: tx.update(g, s, p, kfac_stats=k), axis_name="batch", devices=four
    )
    outs = []
    for g, st in zip(grads, stats):
        u, state = update(rep(g), state, rep(params), rep(st))
        outs.append(jax.tree.map(lambda x: x[0], u))
    counts = [int(c) for c in lo.failure_counts(jax.tree.map(lambda x: x[0], state))]
    return dict(
        mode="owner_pmap_kfac",
        max_rel_err=max_rel_err(outs, reference),
        counts=counts,
        ref_counts=ref_counts,
    )


def owner_pmap_errors_case():
    """Bad input of the pmap owner layout: (case, message) pairs."""
    params = {"w": jnp.ones((6, 4))}
    grads = {"w": jnp.ones((6, 4))}

    def rep(t, n):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), t)

    def attempt(fn):
        try:
            fn()
            return None
        except ValueError as e:
            return str(e)

    owner = lo.shampoo(1e-2, state_layout="owner", owner_axes="batch")
    bare = lo.shampoo(1e-2, state_layout="owner")
    other = lo.soap(1e-2, state_layout="owner", owner_axes="model")
    four = jax.devices()[:4]
    state = jax.pmap(owner.init, axis_name="batch", devices=four)(rep(params, 4))
    out = {
        "no_owner_axes": attempt(
            lambda: jax.pmap(bare.init, axis_name="batch", devices=four)(rep(params, 4))
        ),
        "axis_not_mapped": attempt(
            lambda: jax.pmap(other.init, axis_name="batch", devices=four)(rep(params, 4))
        ),
        "init_outside_pmap": attempt(lambda: owner.init(params)),
        "update_outside_pmap": attempt(
            lambda: owner.update(grads, jax.tree.map(lambda x: x[0], state), params)
        ),
        "other_device_count": attempt(
            lambda: jax.pmap(owner.update, axis_name="batch", devices=jax.devices()[:8])(
                rep(grads, 8), jax.tree.map(lambda x: jnp.concatenate([x, x]), state)
            )
        ),
    }
    # 'auto' inside pmap: replicated unless owner_axes names the mapped axis.
    from layerwise_optax import _owner

    for case, tx in (
        ("auto", lo.shampoo(1e-2)),
        ("auto_owner_axes", lo.shampoo(1e-2, owner_axes="batch")),
    ):
        init = jax.pmap(tx.init, axis_name="batch", devices=four)
        layout = _owner.layout_of(init(rep(params, 4)))
        out[case] = None if layout is None else [layout.devices, layout.mapped]
    return dict(mode="owner_pmap_errors", results=out)


def owner_shard_map_case():
    """The mapped owner layout inside ``jax.shard_map`` (manual 'data' axis, 4 devices).

    The group stacks come out of the shard_map as ``P('data')`` (each device's
    share), everything else replicated; the updates must equal one device's.
    """
    from jax.sharding import PartitionSpec as P

    from layerwise_optax import _owner

    shapes = {"w": ((64, 48), None), "v": ((3, 200), None)}
    params, grads, kw = _owner_problem("shampoo", lo.shampoo, {}, shapes, {"block_size": 16})
    ref = lo.shampoo(1e-2, **kw, state_layout="replicated")
    state = ref.init(params)
    reference = []
    for g in grads:
        u, state = jax.jit(ref.update)(g, state, params)
        reference.append(u)
    tx = lo.shampoo(1e-2, **kw, state_layout="owner", owner_axes="data")
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])

    def specs(tree):
        def one(node):
            if isinstance(node, _owner.Grouped):
                return _owner.Grouped(
                    jax.tree.map(lambda _: P("data"), node.blocks),
                    jax.tree.map(lambda _: P(), node.leaves),
                    node.layout,
                )
            return jax.tree.map(lambda _: P(), node)

        return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, _owner.Grouped))

    # check_vma=False: the state's arrays are per-device shares by construction.
    probe = jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    spec = specs(jax.eval_shape(probe, params))
    init = jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=spec, check_vma=False)
    update = jax.shard_map(
        tx.update, mesh=mesh, in_specs=(P(), spec, P()), out_specs=(P(), spec), check_vma=False
    )
    state = jax.jit(init)(params)
    outs = []
    for g in grads:
        u, state = jax.jit(update)(g, state, params)
        outs.append(u)
    stacks = sorted(
        {
            x.shape[0]
            for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _owner.Grouped))
            if isinstance(n, _owner.Grouped)
            for x in jax.tree.leaves(n.blocks)
        }
    )
    return dict(mode="owner_shard_map", max_rel_err=max_rel_err(outs, reference), stacks=stacks)


def traffic_case():
    """K-FAC's collective bytes per device of an ordinary and a refresh step (owner layout).

    A 64-128-128-10 MLP (one block per layer: every group has fewer blocks than
    the 8 devices) with FSDP specs, as ``benchmarks.sharded_state`` measures it
    (the compiled program's collectives), beside the parameter bytes.
    """
    from benchmarks import sharded_state
    from benchmarks.step_time import make_tree, mlp_shapes

    params = make_tree(mlp_shapes(64, 128, 128, 10), jax.random.key(0))
    mesh = jax.make_mesh((8,), ("data",))
    tx = lo.kfac(1e-3, precondition_frequency=10)
    stats = sharded_state._kfac_stats(params)
    _, collective_bytes = _step_collectives(tx, params, mesh, kfac_stats=stats)
    return dict(
        mode="traffic",
        params_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
        collective_bytes=collective_bytes,
    )


def _random_kfac_stats(params, step):
    """Rank-deficient random K-FAC statistics for K-FAC's default layout of ``params``."""
    from benchmarks import sharded_state

    def cov(key, d):
        x = jax.random.normal(key, (max(d // 2, 1), d))
        return x.T @ x / x.shape[0]

    ident = sharded_state._kfac_stats(params)
    out = []
    for i, s in enumerate(jax.tree.leaves(ident, is_leaf=lambda x: isinstance(x, lo.KfacFactors))):
        if isinstance(s, lo.KfacFactors):
            k = jax.random.split(jax.random.key(1000 * step + i))
            s = lo.KfacFactors(cov(k[0], s.a.shape[0]), cov(k[1], s.g.shape[0]))
        out.append(s)
    treedef = jax.tree.structure(ident, is_leaf=lambda x: isinstance(x, lo.KfacFactors))
    return jax.tree.unflatten(treedef, out)


def kfac_per_factor_case():
    """K-FAC's per-factor owner layout on a 96-128-128-128-10 MLP with FSDP specs.

    Five steps (refreshes at 0, 2, 4; a NaN gradient at step 3) on 8 devices
    (Auto axes) and 2 (Explicit) against one device in the replicated layout;
    the state per device at 1 device (replicated) and 8; and the 8-device state
    after 3 steps restored onto 3 devices (``restore_state`` repads the stacks
    from 8 to 9 entries), continued for 2 steps.
    """
    from benchmarks import sharded_state
    from benchmarks.step_time import make_tree, mlp_shapes
    from layerwise_optax import _owner

    params = make_tree(mlp_shapes(96, 128, 128, 128, 10), jax.random.key(0))
    grads = [
        jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.key(t), x.shape), params)
        for t in range(STEPS)
    ]
    grads[3]["layer1"]["kernel"] = grads[3]["layer1"]["kernel"].at[0, 0].set(jnp.nan)
    stats = [_random_kfac_stats(params, t) for t in range(STEPS)]
    tx = lo.kfac(1e-2, precondition_frequency=2)
    ref_tx = lo.kfac(1e-2, precondition_frequency=2, state_layout="replicated")
    state = ref_tx.init(params)
    reference = []
    for g, st in zip(grads, stats):
        u, state = jax.jit(ref_tx.update)(g, state, params, kfac_stats=st)
        reference.append(u)
    out = dict(
        mode="kfac_per_factor",
        ref_counts=[int(c) for c in lo.failure_counts(state)],
        ref_bytes=_per_device_bytes(state),
    )

    def run(n, axis_type, steps, state=None):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n])
        specs = sharded_state._specs(params, n)
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
        promised = lo.state_shardings(tx, params, specs, mesh=mesh)
        p = jax.device_put(params, shardings)
        if state is not None:
            # As from a checkpoint: restored outside the mesh, placed on its target.
            with jax.set_mesh(mesh):
                like = jax.eval_shape(tx.init, p)
            state = lo.restore_state(like, lo.checkpointable(state), promised)
        with jax.set_mesh(mesh):
            if state is None:
                state = jax.jit(tx.init, out_shardings=promised)(p)
            update = jax.jit(
                lambda g, s, p, k: tx.update(g, s, p, kfac_stats=k),
                out_shardings=(shardings, promised),
            )
            outs = []
            for t in steps:
                u, state = update(jax.device_put(grads[t], shardings), state, p, stats[t])
                outs.append(u)
        return outs, state

    for n, axis_type in ((8, AxisType.Auto), (2, AxisType.Explicit)):
        outs, state = run(n, axis_type, range(STEPS))
        layout = _owner.layout_of(state)
        key = f"{n}_{axis_type}"
        out[f"per_factor_{key}"] = bool(layout is not None and layout.per_factor)
        out[f"err_{key}"] = max_rel_err(outs, reference)
        out[f"bytes_{key}"] = _per_device_bytes(state)
        out[f"counts_{key}"] = [int(c) for c in lo.failure_counts(state)]
    first, state = run(8, AxisType.Auto, range(3))
    rest, state = run(3, AxisType.Auto, range(3, STEPS), state)
    out["resumed_err"] = max_rel_err(first + rest, reference)
    out["resumed_counts"] = [int(c) for c in lo.failure_counts(state)]
    out["resumed_padded"] = [g.padded for g in _owner.layout_of(state).groups]
    return out


def _shard_map_inputs(jaxpr):
    """Per ``shard_map`` in a jaxpr (nested ones included), its per-device input shapes."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append([list(v.aval.shape) for v in eqn.params["jaxpr"].invars])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _shard_map_inputs(inner)
    return found


def spread_case():
    """Which device computes which refresh block, read from the program and the data."""
    from layerwise_optax import _distribute

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    # Blocked layers: 2 x 3 + 3 x 3 + 3 x 1 blocks of 32 (two factors each) and the
    # 10-wide output blocks: 5 groups of same-sized blocks in all.
    params = {
        "l1": jnp.ones((64, 96)),
        "l2": jnp.ones((96, 96)),
        "l3": jnp.ones((96, 10)),
    }
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    out = {}
    roots = {}
    for distribute in (False, True):
        tx = lo.shampoo(
            1e-2,
            block_size=32,
            precondition_frequency=1,
            distribute=distribute,
            state_layout="replicated",
        )
        with jax.set_mesh(mesh):
            state = tx.init(params)
            jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
            _, state = jax.jit(tx.update)(grads, state, params)
        roots[distribute] = state[0].roots
        out[f"local_{distribute}"] = _shard_map_inputs(jaxpr.jaxpr)
    blocks = [x.shape[0] for x in jax.tree.leaves(state[0].stats) if x.ndim == 3 and x.shape[0] > 0]
    out["blocks"] = sum(blocks)
    out["roots_max_abs_diff"] = max(
        float(jnp.max(jnp.abs(a - b))) if a.size else 0.0
        for a, b in zip(jax.tree.leaves(roots[False]), jax.tree.leaves(roots[True]))
    )

    # Every alias with a refresh spreads it in the replicated layout (and only when
    # asked); the owner layout computes where the blocks lie whatever ``distribute``.
    import inspect

    counts = {}
    for name, factory, kwargs in OPTIMIZERS:
        if name in SLOW_VARIANTS or name == "steepest":
            continue
        if "state_layout" in inspect.signature(factory).parameters:
            kwargs = {**kwargs, "state_layout": "replicated"}
        if "distribute" not in inspect.signature(factory).parameters:
            # Dion has nothing to spread: its power iteration runs on the
            # sharded matrices as they lie (no shard_map at all).
            tx = build(name, factory, kwargs)
            with jax.set_mesh(mesh):
                jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params)
            counts[f"{name}_native"] = len(_shard_map_inputs(jaxpr.jaxpr))
            continue
        for distribute in (False, True):
            tx = build(name, factory, {**kwargs, "distribute": distribute})
            with jax.set_mesh(mesh):
                jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params)
            counts[f"{name}_{distribute}"] = len(_shard_map_inputs(jaxpr.jaxpr))
    out["shard_maps"] = counts

    # Owners: each block's entry is replaced by the index of the device that
    # computed it (13 blocks over 8 devices).
    def owner(x):
        idx = jax.lax.axis_index(("data", "model"))
        return jnp.full((x.shape[0],), idx, jnp.int32)

    with jax.set_mesh(mesh):
        owners = jax.jit(lambda x: _distribute.spread(owner, x))(jnp.zeros((13, 4, 4)))
    out["owners"] = [int(o) for o in owners]
    return dict(mode="spread", **out)


def psgd_traffic_case():
    """PSGD-Kron's collective bytes per device of an ordinary and a fitting step (owner layout).

    Two matrices and a vector with FSDP specs on 8 devices (Explicit axes),
    cut into 32-blocks: 64 matrix blocks and 8 vector blocks, so no group
    stack is padded and the owners hold exactly the parameters. Measured as
    ``benchmarks.sharded_state`` does (the compiled program's collectives),
    beside the parameter bytes.
    """
    from layerwise_optax import _owner

    params = {
        "a": jnp.ones((128, 256)),
        "b": jnp.full((256, 128), 0.5),
        "c": jnp.ones((256,)),
    }
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    tx = lo.psgd_kron(1e-3, precond_update_prob=0.5, block_size=32)
    state, collective_bytes = _step_collectives(tx, params, mesh)
    return dict(
        mode="psgd_traffic",
        owner=_owner.layout_of(state[0]) is not None,
        params_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
        collective_bytes=collective_bytes,
    )


def _step_collectives(tx, params, mesh, **extra):
    """One update of ``tx`` with FSDP specs on ``mesh`` compiled: ``(state, collective bytes)``.

    The state is placed as :func:`layerwise_optax.state_shardings` promises;
    the bytes are ``benchmarks.sharded_state.hlo_collective_bytes`` of the
    compiled program; ``extra`` goes to every update (K-FAC's statistics).
    """
    from benchmarks import sharded_state

    specs = sharded_state._specs(params, mesh.size)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    promised = lo.state_shardings(tx, params, specs, mesh=mesh)
    with jax.set_mesh(mesh):
        p = jax.device_put(params, shardings)
        state = jax.jit(tx.init, out_shardings=promised)(p)
        step = jax.jit(
            lambda g, s, p: tx.update(g, s, p, **extra), out_shardings=(shardings, promised)
        )
        hlo = step.lower(p, state, p).compile().as_text()
    return state, sharded_state.hlo_collective_bytes(hlo)


# Leaves for the owner layout's routes (issue 15): sharded on their leading block
# axis with whole blocks per shard (routed), shards cutting blocks (gathered),
# a leading batch axis sharded, another dimension sharded, replicated.
ROUTE_SHAPES = {
    "aligned": ((64, 48), P("data")),
    "cuts_blocks": ((48, 64), P("data")),
    "halves": ((32, 24), P("data")),
    "quarters": ((16, 40), P("data")),
    "stacked": ((8, 16, 24), P("data")),
    "head": ((64, 10), P("data")),
    "columns": ((16, 64), P(None, "data")),
    "bias": ((48,), P()),
}


def routes_case():
    """Every owner-layout alias with and without routes on 8 devices (Explicit axes).

    Five steps (a NaN gradient in one leaf at step 2): the routed updates must
    equal the gathered ones bit for bit (routes move numbers, never combine
    them) and the single-device run within round-off; and the collective bytes
    of Shampoo's ordinary step on an FSDP MLP whose layers' shards hold
    whole blocks, beside the parameter bytes.
    """
    from benchmarks.step_time import make_tree, mlp_shapes
    from layerwise_optax import _owner

    keys = jax.random.split(jax.random.key(3), len(ROUTE_SHAPES))
    params = {n: jax.random.normal(k, s) for (n, (s, _)), k in zip(ROUTE_SHAPES.items(), keys)}

    def grads(t):
        ks = jax.random.split(jax.random.key(50 + t), len(params))
        g = {n: jax.random.normal(k, p.shape) for (n, p), k in zip(params.items(), ks)}
        if t == 2:
            g["aligned"] = g["aligned"].at[0, 0].set(jnp.nan)
        return g

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    shardings = {n: NamedSharding(mesh, spec) for n, (_, spec) in ROUTE_SHAPES.items()}
    original = _owner._route
    counted = []

    def counting(*args):
        route = original(*args)
        if route is not None:
            counted.append(len(route.aligned))
        return route

    aliases = {
        "shampoo": lambda: lo.shampoo(1e-2, block_size=8, precondition_frequency=2),
        "soap": lambda: lo.soap(1e-2, block_size=8, precondition_frequency=2),
        "psgd_kron": lambda: lo.psgd_kron(1e-2, block_size=8, precond_update_prob=1.0),
    }

    def run(make, names, route=None, mesh=None, shardings=None):
        """STEPS updates of ``make()`` on the leaves ``names``, on ``mesh`` if given
        (placed by ``shardings``), ``_owner._route`` replaced by ``route`` meanwhile:
        the updates and the aligned-member count of every route taken."""
        place = (lambda x: jax.device_put(x, shardings)) if mesh is not None else (lambda x: x)
        counted.clear()
        if route is not None:
            _owner._route = route
        try:
            tx = make()
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                p = place({n: params[n] for n in names})
                state = jax.jit(tx.init)(p)
                ups = []
                for t in range(STEPS):
                    g = place({n: grads(t)[n] for n in names})
                    u, state = jax.jit(tx.update)(g, state, p)
                    ups.append(u)
        finally:
            _owner._route = original
        return ups, list(counted)

    out = {}
    for name, make in aliases.items():
        reference, _ = run(make, params)
        on, routes = run(make, params, counting, mesh, shardings)
        off, _ = run(make, params, lambda *a: None, mesh, shardings)
        out[name] = dict(
            identical=all(
                bool(jnp.array_equal(x, y, equal_nan=True))
                for x, y in zip(jax.tree.leaves(on), jax.tree.leaves(off))
            ),
            routed_vs_gathered=max_rel_err(on, off),
            max_rel_err=max_rel_err(on, reference),
            routes=routes,
            specs={n: str(x.sharding.spec) for n, x in on[-1].items()},
        )
    # Two mesh axes, leaves sharded over both (the layout's default axes): the
    # linear device index of the shards, the collectives and the owners agree.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    both = {
        n: NamedSharding(mesh2, P(("data", "model")) if spec != P() else P())
        for n, (_, spec) in ROUTE_SHAPES.items()
        if n in ("aligned", "halves", "quarters", "bias")
    }
    ups, routes = run(aliases["shampoo"], both, counting, mesh2, both)
    reference, _ = run(aliases["shampoo"], both)
    out["shampoo_two_axes"] = dict(
        routes=routes,
        max_rel_err=max_rel_err(ups, reference),
        specs={n: str(x.sharding.spec) for n, x in ups[-1].items()},
    )
    mlp = make_tree(mlp_shapes(256, 256, 256, 10), jax.random.key(0))
    mlp_mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    tx = lo.shampoo(1e-3, block_size=32, precondition_frequency=10)
    _, collective_bytes = _step_collectives(tx, mlp, mlp_mesh)
    return dict(
        mode="routes",
        aliases=out,
        params_bytes=sum(x.nbytes for x in jax.tree.leaves(mlp)),
        collective_bytes=collective_bytes["ordinary"],
    )


def main(modes):
    assert jax.device_count() == 8, jax.devices()
    if "routes" in modes:
        print(json.dumps(routes_case()), flush=True)
    if "errors" in modes:
        print(json.dumps(errors_case()), flush=True)
    if "spread" in modes:
        print(json.dumps(spread_case()), flush=True)
    if "traffic" in modes:
        print(json.dumps(traffic_case()), flush=True)
        print(json.dumps(psgd_traffic_case()), flush=True)
    if "pmap" in modes:
        print(json.dumps(pmap_stats_case()), flush=True)
    if "kfac_per_factor" in modes:
        print(json.dumps(kfac_per_factor_case()), flush=True)
    for name, factory, kwargs in _layout_aliases():
        if "owner" in modes:
            print(json.dumps(owner_case(name, factory, kwargs)), flush=True)
        elif f"owner_quick_{name}" in modes:
            out = owner_case(name, factory, kwargs, OWNER_GRID_QUICK)
            print(json.dumps(out), flush=True)
    if "owner_one_sided" in modes:
        # Shampoo's factor_exponents='one_sided' (groups keyed by their orders) on 8
        # devices, Auto axes, and 2, Explicit.
        grid = ((2, AxisType.Explicit), (8, AxisType.Auto))
        for name, factory, kwargs in _layout_aliases():
            if name == "shampoo":
                kwargs = {**kwargs, "factor_exponents": "one_sided"}
                print(json.dumps(owner_case(name, factory, kwargs, grid)), flush=True)
    if "owner_pmap" in modes:
        # The default tier: Shampoo, many blocks per group (12 and 13, padded to
        # 16 on 8 devices); owner_pmap_<alias> runs the rest.
        print(json.dumps(owner_pmap_errors_case()), flush=True)
        print(json.dumps(owner_shard_map_case()), flush=True)
        for name, factory, kwargs in _layout_aliases():
            if name == "shampoo":
                out = owner_pmap_case(name, factory, kwargs, ("many",), (8,))
                print(json.dumps(out), flush=True)
    for name, factory, kwargs in _layout_aliases():
        # One alias per mode (the slow tier runs them as separate tests).
        if f"owner_pmap_{name}" in modes:
            out = owner_pmap_case(name, factory, kwargs, ("plain", "many"), (2, 4, 8))
            print(json.dumps(out), flush=True)
            if name == "kfac":
                print(json.dumps(owner_pmap_kfac_case()), flush=True)
    for name, factory, kwargs in OPTIMIZERS:
        if name in SLOW_VARIANTS:
            continue
        if "mix" in modes:
            print(json.dumps(mix_case(name, factory, kwargs)), flush=True)
        if not {"pmap", "auto", "explicit"} & set(modes):
            continue
        reference, _ = _run(build(name, factory, kwargs), _params())
        for mode in modes:
            if mode == "pmap":
                out = pmap_case(name, factory, kwargs, reference)
            elif mode in ("auto", "explicit"):
                axis = AxisType.Auto if mode == "auto" else AxisType.Explicit
                out = mesh_case(name, factory, kwargs, axis, reference)
            else:
                continue
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
