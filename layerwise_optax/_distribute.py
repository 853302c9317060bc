"""Spreading batched matrix work over the devices of the current mesh.

The refresh of a Kronecker preconditioner (inverse roots, eigendecompositions)
is a batch of independent small matrix problems, and on one device it is the
cost that grows fastest with model size. Under a mesh set with
:func:`jax.set_mesh`, :func:`spread` splits such a batch evenly over *all*
devices of the mesh with :func:`jax.shard_map`: each device computes its own
slice of the blocks and nothing else (no all-reduce inside the computation), and
the results are gathered once so that every device holds every block again
(Distributed Shampoo does the same with ``pmap``; the PyTorch libraries assign
an owner per matrix).

Callers group *same-sized* blocks of every leaf into one batch first, so that
the per-device shares have equal cost; a batch is padded with copies of its
first block to a multiple of the device count (at most ``devices - 1`` padded
blocks per group, computed and dropped).

Without a mesh, on a mesh of one device, or inside a ``shard_map`` (manual
axes), the function is applied as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


def current_mesh() -> Any:
    """The mesh of :func:`jax.set_mesh` if work can be spread over it, else ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def spread(fn: Callable[..., Any], *arrays: jax.Array, enabled: bool = True) -> Any:
    """``fn(*arrays)`` for a function batched over axis 0, the batch split over devices.

    Args:
      fn: A function of arrays with a common leading batch axis, returning a
        pytree of arrays with that batch axis; it must treat batch entries
        independently.
      *arrays: Its inputs (replicated or sharded; they are resliced).
      enabled: ``False`` applies ``fn`` as is.

    Returns:
      ``fn(*arrays)``, replicated over the mesh.
    """
    mesh = current_mesh() if enabled else None
    if mesh is None:
        return fn(*arrays)
    n = arrays[0].shape[0]
    pad = (-n) % mesh.size
    if pad:
        arrays = tuple(jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in arrays)
    spec = P(tuple(mesh.axis_names))
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        arrays = tuple(jax.sharding.reshard(a, spec) for a in arrays)
    else:
        # Gather first (inputs may be sharded like a parameter, e.g. Muon's
        # momentum): each device then slices its own blocks without communication,
        # instead of the partitioner rematerializing the reshard on its own.
        arrays = tuple(jax.lax.with_sharding_constraint(a, P()) for a in arrays)
    # check_vma=False: the matrix functions start loops from constants (e.g. power
    # iterations), which the varying-axes check would reject; every output is
    # computed from the local slice only.
    out = jax.shard_map(
        fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False
    )(*arrays)

    def gather(y):
        y = jax.sharding.reshard(y, P()) if explicit else jax.lax.with_sharding_constraint(y, P())
        return y[:n]

    return jax.tree.map(gather, out)


class Owned(NamedTuple):
    """Marks a work item of :func:`grouped` as a stack already laid out by owner.

    The owner layout (:mod:`layerwise_optax._owner`) stores each group of
    same-shaped blocks sharded along its stack over the mesh's devices; such a
    stack is computed where it lies (:func:`local`), never concatenated with
    other stacks. Items keyed ``(Owned(...), key)`` are unique by construction.
    """

    leaf: int
    item: int


def local(fn: Callable[..., Any], *arrays: jax.Array, enabled: bool = True) -> Any:
    """``fn(*arrays)`` computed by each device on the blocks it owns.

    The arrays are stacks sharded (or to be sharded) along axis 0 over all axes
    of the current mesh, their length a multiple of the device count (the owner
    layout pads them so). Each device applies ``fn`` to its own slice, and the
    result stays sharded the same way: no collective at all. Without a usable
    mesh (none, one device, manual axes) or when the stack does not divide
    evenly, ``fn`` is applied as is and the partitioner places the work.

    Args:
      fn: A function batched over axis 0, treating stack entries independently.
      *arrays: Its inputs, with a common leading stack axis.
      enabled: ``False`` applies ``fn`` as is.

    Returns:
      ``fn(*arrays)``, sharded along axis 0 like the inputs.
    """
    mesh = current_mesh() if enabled else None
    if mesh is None:
        return fn(*arrays)
    spec = P(tuple(mesh.axis_names))
    if arrays[0].shape[0] % mesh.size:
        # Stacks laid out over some of the axes (``owner_axes``): under Explicit
        # axes (where the batched CPU fallbacks refuse a sharded stack) each
        # device computes the blocks it holds along those axes.
        axes = _explicit_stack_axes(arrays[0], mesh)
        if axes is None:
            return fn(*arrays)
        spec = P(axes)
    arrays = tuple(place(a, spec, mesh) for a in arrays)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False
    )(*arrays)


def _explicit_stack_axes(x: jax.Array, mesh: Any) -> Any:
    """The Explicit mesh axes ``x``'s axis 0 is sharded over (``None``: not so sharded)."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec[0] if spec else None


def place(x: jax.Array, spec: P, mesh: Any) -> jax.Array:
    """``x`` laid out as ``spec`` on the current mesh (Explicit: reshard; Auto: constraint)."""
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def grouped(
    items: list[tuple[Any, tuple[jax.Array, ...]]],
    fn: Callable[[Any], Callable[..., Any]],
    *,
    enabled: bool = True,
) -> list[Any]:
    """Applies a batched function to many stacks, same-keyed stacks batched together.

    Args:
      items: ``(key, arrays)`` per stack; ``arrays`` share a leading stack axis,
        and stacks with equal ``key`` have equal trailing shapes and dtypes.
      fn: ``fn(key)`` is the batched function for that key's stacks.
      enabled: Spread each batch over the mesh's devices (:func:`spread`).

    Returns:
      Per item, in order, ``fn(key)(*arrays)`` (a pytree with the stack axis).
    """
    groups: dict[Any, list[int]] = {}
    for k, (key, _) in enumerate(items):
        groups.setdefault(key, []).append(k)
    out: list[Any] = [None] * len(items)
    for key, members in groups.items():
        if isinstance(key, tuple) and key and isinstance(key[0], Owned):
            (k,) = members
            out[k] = local(fn(key), *items[k][1])  # the owner layout computes where it stores
            continue
        arity = len(items[members[0]][1])
        batch = tuple(jnp.concatenate([items[k][1][a] for k in members]) for a in range(arity))
        result = spread(fn(key), *batch, enabled=enabled)
        start = 0
        for k in members:
            n = items[k][1][0].shape[0]
            out[k] = jax.tree.map(lambda y, start=start, n=n: y[start : start + n], result)
            start += n
    return out
