"""Shardings of optimizer states on a device mesh.

Under ``jax.jit`` with parameters sharded over a :class:`jax.sharding.Mesh`,
every transform of the library runs unchanged: with ``Auto`` mesh axes XLA's
partitioner places the per-axis statistics itself; with ``Explicit`` axes each
leaf's statistics are computed on a gathered copy and its params-shaped outputs
resharded like the parameter (:func:`layerwise_optax._axes.on_gathered`).

:func:`state_shardings` says where each state leaf lives, so that ``init`` and
``update`` can be compiled with ``out_shardings`` and states checkpointed
sharded. The layout:

* leaves shaped like a parameter (moments ``mu``/``nu``, NorMuon's or Adam's
  moments) are sharded like that parameter (FSDP- and tensor-parallel layouts
  shard optimizer memory the same way as the weights);
* in the *owner layout* (the default of the Kronecker optimizers under a mesh,
  :mod:`layerwise_optax._owner`), the per-block state of all leaves is stored
  as stacks of same-shaped blocks, each sharded along its block axis over the
  mesh: ``P(axes)`` on axis 0, so each device holds ``1 / devices`` of it;
* everything else (the factors of the replicated layout, counters, keys) is
  replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from layerwise_optax import _axes, _owner


def _keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(f"{attr}:{getattr(entry, attr)}")
                break
    return tuple(out)


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _as_named(path: str, shape: tuple[int, ...], s: Any, mesh: Mesh | None) -> NamedSharding:
    """Checks one parameter's sharding against its shape and mesh; returns a NamedSharding."""
    on: Mesh | AbstractMesh  # a NamedSharding may carry an abstract mesh
    if isinstance(s, NamedSharding):
        on, spec = s.mesh, s.spec
    elif isinstance(s, PartitionSpec) or s is None:
        if mesh is None:
            raise ValueError(
                f"param {path}: a PartitionSpec needs mesh=...; pass the Mesh or NamedShardings."
            )
        on, spec = mesh, PartitionSpec() if s is None else s
    else:
        raise TypeError(
            f"param {path}: sharding must be a NamedSharding or a PartitionSpec, got "
            f"{type(s).__name__} {s!r}."
        )
    if len(spec) > len(shape):
        raise ValueError(
            f"param {path} with shape {shape}: partition spec {spec} has {len(spec)} entries "
            f"for {len(shape)} axes."
        )
    sizes = dict(on.shape)
    entries = [() if e is None else e if isinstance(e, tuple) else (e,) for e in spec]
    for dim, names in enumerate(entries):
        for name in names:
            if name not in sizes:
                raise ValueError(
                    f"param {path}: mesh axis {name!r} (axis {dim} of its spec {spec}) does not "
                    f"exist; the mesh has axes {tuple(on.axis_names)}."
                )
    for dim, names in enumerate(entries):
        total = math.prod(sizes[name] for name in names)
        if shape[dim] % total:
            raise ValueError(
                f"param {path} with shape {shape}: axis {dim} (size {shape[dim]}) is not "
                f"divisible by mesh axis {'×'.join(names)} (size {total}) of its spec {spec}."
            )
    return NamedSharding(on, spec)


def state_shardings(
    tx: Any,
    params: Any,
    param_shardings: Any,
    *,
    mesh: Mesh | None = None,
) -> Any:
    """The ``NamedSharding`` of every leaf of ``tx``'s state, for sharded params.

    Example::

      mesh = jax.make_mesh((4, 2), ("data", "model"))
      specs = {"w": P("data", "model"), "b": P()}
      shard = lo.state_shardings(tx, params, specs, mesh=mesh)
      state = jax.jit(tx.init, out_shardings=shard)(params)
      step = jax.jit(tx.update, out_shardings=(param_shardings, shard))

    Args:
      tx: Any optax transform (an alias of this library, a chain, ...).
      params: The params, or their ``jax.ShapeDtypeStruct`` stand-ins.
      param_shardings: A tree like ``params`` of ``NamedSharding`` or
        ``PartitionSpec`` (``None`` for replicated).
      mesh: The mesh, needed when ``param_shardings`` holds partition specs.

    Returns:
      A tree like ``jax.eval_shape(tx.init, params)`` (``init`` traced under
      the mesh, so the Kronecker optimizers choose their owner layout) of
      ``NamedSharding``: params-shaped leaves sharded like their parameter, the
      owner layout's block stacks along their block axis over the mesh, the
      rest replicated.

    Raises:
      ValueError: A spec with more entries than the parameter has axes, a mesh
        axis that does not exist, or an axis not divisible by its mesh axes,
        naming the parameter's path and the axis.

    Examples:
      On a one-device mesh (the same code runs on any mesh); the moments shaped like
      ``w`` are sharded like it:

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> tx = lo.shampoo(1e-3)
      >>> mesh = jax.make_mesh((1,), ('data',))
      >>> shardings = lo.state_shardings(tx, params, {'w': P('data'), 'b': P()}, mesh=mesh)
      >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
      >>> {x.sharding.spec == P('data') for x in jax.tree.leaves(state) if x.shape == (4, 3)}
      {True}
    """
    flat_params, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_axes.is_masked)
    try:
        flat_shardings = treedef.flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"param_shardings does not match the params tree: {e}") from None
    named = []
    for (path, p), s in zip(flat_params, flat_shardings):
        where = jax.tree_util.keystr(path)
        named.append((_keys(path), tuple(p.shape), _as_named(where, tuple(p.shape), s, mesh)))
    the_mesh = named[0][2].mesh if named else mesh
    if the_mesh is None:
        raise ValueError("no params and no mesh: nothing to shard.")
    replicated = NamedSharding(the_mesh, PartitionSpec())
    # ``init`` under the mesh: transforms with a state layout choose the owner
    # layout there (``state_layout='auto'``).
    if isinstance(the_mesh, Mesh):
        with jax.set_mesh(the_mesh):
            abstract = jax.eval_shape(tx.init, params)
    else:
        with jax.sharding.use_abstract_mesh(the_mesh):
            abstract = jax.eval_shape(tx.init, params)
    positions = [s for _, _, s in named]

    def place(path, leaf):
        keys = _keys(path)
        best = None
        for p_keys, shape, s in named:
            if tuple(leaf.shape) == shape and _contains(keys, p_keys):
                if best is None or len(p_keys) > len(best[0]):
                    best = (p_keys, s)
        return replicated if best is None else best[1]

    def place_grouped(node: _owner.Grouped) -> _owner.Grouped:
        # Group stacks along the block axis; params-shaped leaves like their param.
        layout = node.layout
        stacked = NamedSharding(the_mesh, layout.spec())
        blocks = jax.tree.map(lambda _: stacked, node.blocks)
        leaves = []
        for i, entry in zip(layout.leaves, node.leaves):
            shape = tuple(flat_params[i][1].shape)
            leaves.append(
                jax.tree.map(
                    lambda x, i=i, shape=shape: positions[i] if x.shape == shape else replicated,
                    entry,
                )
            )
        return _owner.Grouped(blocks, tuple(leaves), layout)

    def place_any(path, leaf):
        if isinstance(leaf, _owner.Grouped):
            return place_grouped(leaf)
        return place(path, leaf)

    return jax.tree_util.tree_map_with_path(
        place_any, abstract, is_leaf=lambda x: isinstance(x, _owner.Grouped)
    )
