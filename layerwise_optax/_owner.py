"""The owner layout: per-block optimizer state sharded over the devices of a mesh.

A Kronecker preconditioner's state is a set of independent per-block parts:
each block of each leaf (:class:`layerwise_optax._axes.LeafPlan`) has its own
factor statistics, roots or inverses, eigenbases, PSGD factors, and its own
share of the moments. Replicated on every device, that state does not shrink
when devices are added. The owner layout stores it the way the refresh already
batches it:

1. the blocks of all leaves with the same block layout (block lengths, factor
   kinds and compute dtype) form one *group*, stacked on a leading axis in leaf
   order (:class:`Group`);
2. each group's stack is padded to a multiple of the device count and sharded
   along that axis over the chosen mesh axes (all of them by default), so every
   device holds ``padded / devices`` blocks of every group. Blocks of one group
   cost the same, so the split is balanced by construction; at most
   ``devices - 1`` padded blocks per group are stored and computed;
3. every per-block step (moments, statistics, refresh, preconditioning) runs on
   the group stacks where they lie: the gradient of a block is sent to its
   owner (:func:`to_groups`), the owner computes, and the preconditioned blocks
   are gathered once and put back into the parameters' shapes
   (:func:`from_groups`). Where the parameters are sharded (FSDP) with whole
   blocks per shard, only the blocks each device's shard needs travel, both
   ways (see the section "routes" below).

A leaf without factors (biases and other vectors under the default policy)
stays as it is: its state is shaped and sharded like the parameter.

K-FAC stacks single factors instead of blocks (:func:`build_per_factor`,
:class:`FactorGroup`; see the section "per-factor layout" below): a layer's
two factors are the only per-block state it has, so grouping whole layers
left too few entries per group to spread over the devices.

The optimizer runs its ordinary per-leaf code on the *grouped tree*
``{'blocks': (stack, ...), 'leaves': (leaf, ...)}``, whose group stacks have
plans with ``per_block=True`` (each block its own unit for the failure policy:
the blocks of a leaf whose gradient is not valid are filled with NaN first, and
padded blocks are filled with NaN too, so they never enter any statistic).
Since a block is computed from the same numbers by the same operations as on
one device, the updates do not depend on the mesh (up to float32 round-off of
reductions the compiler may reorder).

The layout is static: it is decided at ``init`` (:func:`decide`) and carried in
the state's tree structure (:class:`Grouped`), so ``update`` and
:func:`layerwise_optax.state_shardings` read it from the state.

Under ``jax.pmap`` (or ``jax.shard_map``) there is no mesh to shard over: each
device runs its own program. With ``owner_axes`` naming the mapped axis the
layout is *mapped* (:attr:`Layout.mapped`): ``init`` runs inside the pmap and
each device's state arrays hold only its ``padded / devices`` blocks of every
group (:attr:`Group.length`), the blocks at ``lax.axis_index`` times that length.
:func:`to_groups` cuts those blocks out of the whole (replicated) gradient stack
(:func:`share`), the per-block code runs on the local stacks, and
:func:`from_groups` gathers them with ``lax.all_gather(..., tiled=True)``.
:func:`check_mapped` makes ``update`` refuse to run outside such a pmap or over
another device count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from layerwise_optax import _axes, _distribute, _failure

LAYOUTS = ("auto", "owner", "replicated")


@dataclasses.dataclass(frozen=True)
class Group:
    """The blocks of the leaves with one block layout, stacked.

    Attributes:
      key: ``plan.as_batch(1)`` of the members (block lengths and kinds).
      dtype: Compute dtype of the members' gradients (at least float32).
      members: ``(position, blocks)`` per member leaf, in leaf order; ``position``
        indexes the plan nodes of the params tree (:func:`plan_nodes`).
      padded: Stack length, the number of blocks rounded up to a multiple of
        the device count.
    """

    key: _axes.LeafPlan
    dtype: str
    members: tuple[tuple[int, int], ...]
    # Not part of the layout's identity (equality, hash, tree structure): the
    # same groups padded for another device count restore into each other.
    padded: int = dataclasses.field(compare=False)
    # Inside ``jax.pmap`` (mapped layout) each device's state holds
    # ``padded / devices`` blocks; ``None``: the whole stack (a global array).
    local: int | None = dataclasses.field(default=None, compare=False)

    @property
    def size(self) -> int:
        """The number of real (not padded) blocks."""
        return sum(n for _, n in self.members)

    @property
    def length(self) -> int:
        """The stack length a state array holds: ``padded``, or the per-device share."""
        return self.padded if self.local is None else self.local

    @property
    def plan(self) -> _axes.LeafPlan:
        """The plan of the group's stack as stored: one block per entry, ``per_block``."""
        return dataclasses.replace(self.key.as_batch(self.length), per_block=True)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every block of a params tree lives in the owner layout.

    Attributes:
      groups: The groups, ordered by first member.
      leaves: Positions of the leaves without factors, kept params-shaped.
      axes: Mesh axes the stacks are sharded over (inside ``jax.pmap`` or
        ``jax.shard_map``: the mapped axes named by ``owner_axes``).
      devices: Product of those axes' sizes (the padding multiple).
      mapped: The state was built inside ``jax.pmap``/``jax.shard_map``: each
        device's state arrays hold only its own ``padded / devices`` blocks of
        every group (a local stack), found by ``lax.axis_index`` over
        :attr:`axes`; the preconditioned blocks come back with one
        ``lax.all_gather`` per group (:func:`from_groups`).
      per_factor: The groups are :class:`FactorGroup` stacks of single
        Kronecker factors (K-FAC; :func:`build_per_factor`).
    """

    groups: tuple[Group, ...]
    leaves: tuple[int, ...]
    axes: tuple[str, ...]
    devices: int = dataclasses.field(compare=False)
    mapped: bool = False
    # K-FAC's per-factor layout (:func:`build_per_factor`): ``groups`` are
    # :class:`FactorGroup` stacks of single factors, not blocks of leaves.
    per_factor: bool = False

    def plans(self, plans: Any) -> dict[str, tuple[Any, ...]]:
        """The plans of the grouped tree (see the module docstring)."""
        nodes = plan_nodes(plans)
        return {
            "blocks": tuple(g.plan for g in self.groups),
            "leaves": tuple(nodes[i] for i in self.leaves),
        }

    def factor_groups(self) -> tuple[FactorGroup, ...]:
        """:attr:`groups` of a per-factor layout (:attr:`per_factor`)."""
        if not self.per_factor:
            raise ValueError("the layout groups blocks, not single factors.")
        return cast("tuple[FactorGroup, ...]", self.groups)

    def spec(self) -> P:
        """The partition spec of every group stack: axis 0 over :attr:`axes`."""
        return P(self.axes if len(self.axes) != 1 else self.axes[0])

    def padding(self) -> int:
        """Padded blocks stored in all, over every group."""
        return sum(g.padded - g.size for g in self.groups)


@jax.tree_util.register_pytree_with_keys_class
class Grouped:
    """A state field in the owner layout: group stacks and params-shaped leaves.

    A pytree node whose children are ``blocks`` (one entry per group, e.g. a
    factor tuple with a leading stack axis) and ``leaves`` (one entry per leaf
    without factors); the :class:`Layout` is static data, so the layout travels
    with the state's tree structure (checkpoints restore it from the ``like``
    tree).
    """

    def __init__(self, blocks: tuple[Any, ...], leaves: tuple[Any, ...], layout: Layout):
        # Stored as given: tree utilities (orbax's) rebuild a node with other
        # children in place of an empty tuple.
        self.blocks = blocks
        self.leaves = leaves
        self.layout = layout

    def tree_flatten_with_keys(self):
        keys = (jax.tree_util.GetAttrKey("blocks"), jax.tree_util.GetAttrKey("leaves"))
        return tuple(zip(keys, (self.blocks, self.leaves))), self.layout

    def tree_flatten(self):
        return (self.blocks, self.leaves), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], children[1], layout)

    def tree(self) -> dict[str, tuple[Any, ...]]:
        """The grouped tree (a plain dict) the optimizer's per-leaf code works on."""
        return {"blocks": self.blocks, "leaves": self.leaves}

    def __repr__(self) -> str:
        return (
            f"Grouped({len(self.layout.groups)} groups over {self.layout.axes} "
            f"({self.layout.devices} devices), {len(self.layout.leaves)} params-shaped leaves)"
        )


def describe(layout: Layout | None) -> str:
    """One line on a state's layout, for :func:`layerwise_optax.failure_report`.

    A group with fewer blocks than devices cannot be spread: it is padded to one
    block per device, so its per-device state does not shrink (it still works;
    ``block_size`` splits large leaves into more blocks). The line says so.
    """
    if layout is None:
        return "replicated"
    kind = "factor" if layout.per_factor else "block"
    text = (
        f"owner: {len(layout.groups)} {kind} groups over {layout.axes} "
        f"({layout.devices} devices{', mapped (pmap)' if layout.mapped else ''}), "
        f"{layout.padding()} padded blocks"
    )
    small = [g for g in layout.groups if g.size < layout.devices]
    if small:
        text += (
            f"; {len(small)} groups have fewer blocks than devices (padded to one block per "
            "device: their per-device state does not shrink; block_size splits large leaves)"
        )
    return text


def grouped(tree: Any, layout: Layout) -> Grouped | None:
    """A grouped tree (dict) as a :class:`Grouped` state field (``None`` stays)."""
    if tree is None:
        return None
    return Grouped(tree["blocks"], tree["leaves"], layout)


def layout_of(state: Any) -> Layout | None:
    """The :class:`Layout` of a state, or ``None`` for the replicated (per-leaf) one.

    The stack lengths are read from the state's arrays (a state restored for
    another device count carries the lengths of its new layout); a mapped
    layout's (built inside ``jax.pmap``) are its own: its arrays hold one
    device's share, or all of them stacked on a leading device axis outside.
    """
    for x in jax.tree.leaves(state, is_leaf=lambda y: isinstance(y, Grouped)):
        if isinstance(x, Grouped):
            layout = x.layout
            if layout.mapped:
                return layout
            padded = [
                int(np.shape(jax.tree.leaves(b)[0])[0]) if jax.tree.leaves(b) else g.padded
                for g, b in zip(layout.groups, x.blocks)
            ]
            groups = tuple(dataclasses.replace(g, padded=n) for g, n in zip(layout.groups, padded))
            devices = layout.devices
            if any(n % devices for n in padded):
                devices = math.gcd(*padded)
            return dataclasses.replace(layout, groups=groups, devices=devices)
    return None


def _split_leaves(plans: Any, params: Any) -> tuple[list[int], list[tuple[int, Any, str]]]:
    """The leaves (flat indices) kept per leaf, and ``(index, plan, dtype)`` of the rest.

    Masked leaves are left out; a leaf without factors is kept per leaf; every
    preconditioned leaf comes with its compute dtype's name (at least float32).
    """
    arrays = jax.tree.flatten(params, is_leaf=_axes.is_masked)[0]
    leaves, preconditioned = [], []
    for i, (plan, x) in enumerate(zip(plan_nodes(plans), arrays)):
        if _axes.is_masked(plan):
            continue
        if not plan.is_preconditioned:
            leaves.append(i)
            continue
        preconditioned.append((i, plan, jnp.promote_types(x.dtype, jnp.float32).name))
    return leaves, preconditioned


def plan_nodes(plans: Any) -> list[Any]:
    """The plan nodes of a plans tree, unwrapped: a LeafPlan or a mask per position."""
    nodes = jax.tree.flatten(plans, is_leaf=_axes._is_plan_node)[0]
    out = []
    for node in nodes:
        while not _axes.is_plan_leaf(node):
            node = _axes._unwrap(node)[0]
        out.append(node)
    return out


def _mesh_axes(params: Any) -> tuple[Any, tuple[str, ...]] | None:
    """The mesh to lay the state out on: the current one, else the params'.

    Inside ``jax.pmap`` or ``jax.shard_map`` (manual axes) there is none: see
    :func:`_mapped_axes`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        for x in jax.tree.leaves(params):
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding):
                mesh = sharding.mesh
                break
        else:
            return None
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh, tuple(mesh.axis_names)


def decide(choice: str, owner_axes: Sequence[str] | None, plans: Any, params: Any) -> Layout | None:
    """The layout ``init`` builds (``None``: replicated, per leaf).

    Args:
      choice: ``'auto'`` (owner layout when a mesh of more than one device is
        current or carries the params, or inside ``jax.pmap`` when
        ``owner_axes`` names mapped axes of more than one device; else
        replicated), ``'owner'`` (always; on one device the groups are unpadded
        stacks) or ``'replicated'``.
      owner_axes: Mesh axes to shard the stacks over; ``None``: all. Inside
        ``jax.pmap``/``jax.shard_map``: the mapped axes (required for
        ``'owner'``); the layout is then *mapped* (:attr:`Layout.mapped`).
      plans: The params' plans.
      params: The params (their dtypes; their sharding's mesh when no mesh is set).

    Returns:
      A :class:`Layout`, or ``None``.

    Raises:
      ValueError: ``owner_axes`` names an axis the mesh does not have; inside
        ``jax.pmap`` ``'owner'`` without ``owner_axes``, or ``owner_axes``
        naming an axis that is not mapped; ``'owner'`` with ``owner_axes`` but
        neither a mesh nor a pmap.
    """
    if choice == "replicated":
        return None
    manual = _manual_axes()
    if manual:
        # Inside jax.pmap / jax.shard_map: one program per device. 'auto' keeps
        # the replicated layout unless owner_axes names a mapped axis.
        if choice == "auto" and owner_axes is None:
            return None
        axes = _mapped_axes(owner_axes, manual)
        devices = math.prod(jax.lax.axis_size(a) for a in axes)
        if choice == "auto" and devices <= 1:
            return None
        return build(plans, params, axes, devices, mapped=True)
    found = _mesh_axes(params)
    if found is None:
        if owner_axes is not None and choice == "owner":
            raise ValueError(
                f"owner_axes={owner_axes!r} names axes to shard the owner layout over, but "
                "init runs with no mesh set (jax.set_mesh), no params sharded on one, and "
                "outside jax.pmap: call init under the mesh, or inside "
                f"jax.pmap(..., axis_name={owner_axes!r}) for a per-device state."
            )
        return None if choice == "auto" else build(plans, params, (), 1)
    mesh, names = found
    axes = names
    if owner_axes is not None:
        axes = _named_axes(
            owner_axes,
            names,
            lambda a: (
                f"owner_axes={tuple(owner_axes or ())} names mesh axis {a!r}, which the "
                f"mesh does not have; its axes are {names}."
            ),
        )
    devices = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)
    if choice == "auto" and devices <= 1:
        return None
    return build(plans, params, axes, devices)


def _manual_axes() -> tuple[str, ...]:
    """The manual axes of the current trace (inside ``jax.pmap``/``jax.shard_map``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)


def _mapped_axes(owner_axes: Any, manual: tuple[str, ...]) -> tuple[str, ...]:
    """The mapped axes a per-device (pmap) owner layout is split over.

    Raises:
      ValueError: ``owner_axes`` is ``None`` (inside ``pmap`` the layout does not
        guess which mapped axis the devices of the data split are) or names an
        axis that is not mapped here.
    """
    if owner_axes is None:
        raise ValueError(
            "state_layout='owner' inside jax.pmap / jax.shard_map needs owner_axes naming "
            f"the mapped axis to split the blocks over (mapped axes here: {manual}), e.g. "
            "owner_axes='batch' for jax.pmap(..., axis_name='batch')."
        )
    return _named_axes(
        owner_axes,
        manual,
        lambda a: (
            f"owner_axes={owner_axes!r} names axis {a!r}, which is not a mapped "
            f"axis here (jax.pmap's axis_name / shard_map's manual axes: {manual})."
        ),
    )


def _named_axes(owner_axes: Any, available: Sequence[str], message: Any) -> tuple[str, ...]:
    """``owner_axes`` (a name or names) as a tuple; ``ValueError(message(axis))``
    for the first one not in ``available``."""
    axes = (owner_axes,) if isinstance(owner_axes, str) else tuple(owner_axes)
    missing = [a for a in axes if a not in available]
    if missing:
        raise ValueError(message(missing[0]))
    return axes


def check_mapped(layout: Layout) -> None:
    """Raises ``ValueError`` unless ``update`` runs where a mapped layout was built.

    A mapped state holds one device's share of every group, so ``update`` must
    run inside ``jax.pmap`` (or ``shard_map``) over the same axes, of the same
    total size, as ``init``.
    """
    if not layout.mapped:
        return
    manual = _manual_axes()
    missing = [a for a in layout.axes if a not in manual]
    if missing:
        raise ValueError(
            f"the optimizer state was initialized inside jax.pmap in the owner layout over "
            f"axes {layout.axes} ({layout.devices} devices); update must run inside a pmap "
            f"over them too, but axis {missing[0]!r} is not mapped here (mapped: {manual})."
        )
    devices = math.prod(jax.lax.axis_size(a) for a in layout.axes)
    if devices != layout.devices:
        raise ValueError(
            f"the optimizer state was initialized inside jax.pmap in the owner layout over "
            f"axes {layout.axes} of {layout.devices} devices, but update runs over "
            f"{devices} devices: each device holds 1/{layout.devices} of the blocks; "
            "initialize the state under the same device count."
        )


def total_failed(layout: Layout, before: jax.typing.ArrayLike, after: jax.Array) -> jax.Array:
    """The failed-refresh count after a step, summed over a mapped layout's devices.

    Each device of a mapped layout refreshes only its own blocks, so it counts
    only their failures; the step's new failures (``after - before``) are summed
    over the devices so that every device's count is the single-device one.
    """
    if not layout.mapped:
        return after
    axes = layout.axes
    return before + jax.lax.psum(after - before, axes[0] if len(axes) == 1 else axes)


def _device_index(layout: Layout) -> jax.Array:
    """This device's position along a mapped layout's axes (row-major over them)."""
    axes = layout.axes
    return jax.lax.axis_index(axes[0] if len(axes) == 1 else axes)


def share(layout: Layout, group: Group, x: jax.Array) -> jax.Array:
    """A whole group stack (axis 0 ``group.padded`` long) as the state stores it.

    A mapped layout's state holds this device's ``group.length`` entries (cut
    at ``lax.axis_index``); otherwise the stack is laid out along axis 0 over
    the mesh (:func:`_constrain`).
    """
    if not layout.mapped:
        return _constrain(x, layout)
    n = group.length
    return jax.lax.dynamic_slice_in_dim(x, _device_index(layout) * n, n)


def _whole(x: jax.Array, layout: Layout) -> jax.Array:
    """A group stack whole on every device: gathered (mapped) or replicated."""
    if layout.mapped:
        axes = layout.axes
        return jax.lax.all_gather(x, axes[0] if len(axes) == 1 else axes, tiled=True)
    return _replicate(x)


def build(
    plans: Any, params: Any, axes: tuple[str, ...], devices: int, *, mapped: bool = False
) -> Layout:
    """Groups the blocks of every preconditioned leaf by block layout and dtype.

    ``mapped``: the state is built per device inside ``jax.pmap`` (each group's
    ``local`` length is ``padded / devices``).
    """
    members: dict[tuple[Any, str], list[tuple[int, int]]] = {}
    leaves, preconditioned = _split_leaves(plans, params)
    for i, plan, dtype in preconditioned:
        members.setdefault((plan.as_batch(1), dtype), []).append((i, plan.stack))
    groups = []
    for (key, dtype), m in members.items():
        padded = -(-sum(n for _, n in m) // devices) * devices
        groups.append(Group(key, dtype, tuple(m), padded, padded // devices if mapped else None))
    return Layout(tuple(groups), tuple(leaves), tuple(axes), devices, mapped)


def check(layout: Layout, plans: Any, tree: Any) -> None:
    """Raises ``ValueError`` unless ``tree`` has the leaves ``layout`` was built for."""
    expected = build(plans, tree, layout.axes, layout.devices)
    if expected.groups != layout.groups or expected.leaves != layout.leaves:
        raise ValueError(
            "the updates do not match the params the owner-layout state was initialized "
            f"with: groups {[(g.key.blocks, g.size) for g in expected.groups]} expected "
            f"{[(g.key.blocks, g.size) for g in layout.groups]}."
        )


def _constrain(x: jax.Array, layout: Layout) -> jax.Array:
    """A group stack laid out along axis 0 over the layout's axes (when a mesh is current)."""
    mesh = _distribute.current_mesh()
    if mesh is None or not layout.axes or any(a not in mesh.axis_names for a in layout.axes):
        return x
    return _distribute.place(x, layout.spec(), mesh)


def _replicate(x: jax.Array) -> jax.Array:
    """``x`` replicated over the current mesh (no-op without one)."""
    mesh = _distribute.current_mesh()
    return x if mesh is None else _distribute.place(x, P(), mesh)


def _gather_blocks(stack: jax.Array, group: Group, layout: Layout) -> jax.Array:
    """The real blocks of a group stack, replicated over the current mesh.

    A stack with at least one block per device is all-gathered (its padding,
    fewer than one block per device, comes along). A group with fewer blocks
    than devices is padded to one block per device, and an all-gather would
    move ``devices / size`` times the real bytes (8x for a one-layer group on 8
    devices: issue 15's K-FAC step gathered 59.6 MB for 11.65 MB of updates).
    There each device puts its block, if real, into a zero buffer of the real
    blocks only and the buffers are summed over the stack's mesh axes: every
    slot has exactly one nonzero addend, so the sum is exact, and the
    all-reduce is ``size`` blocks long.

    Args:
      stack: A group stack laid out along axis 0 over ``layout.axes``.
      group: Its group.
      layout: The layout.

    Returns:
      Shape ``(padded, ...)`` replicated (all-gather), or ``(size, ...)``
      replicated (few blocks); callers use the first ``size`` blocks.
    """
    mesh = _distribute.current_mesh()
    if (
        mesh is None
        or group.size >= group.padded
        or not layout.axes
        or any(a not in mesh.axis_names for a in layout.axes)
        or math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in layout.axes)
        != group.padded
    ):
        return _replicate(stack)
    axes = layout.axes if len(layout.axes) != 1 else layout.axes[0]

    def put(local):
        # One block per device: this device's is block ``axis_index`` of the stack.
        slot = jnp.arange(group.size) == jax.lax.axis_index(axes)
        slot = jnp.reshape(slot, (group.size,) + (1,) * (local.ndim - 1))
        return jax.lax.psum(jnp.where(slot, local, jnp.zeros_like(local)), axes)

    stack = _distribute.place(stack, layout.spec(), mesh)
    return jax.shard_map(put, mesh=mesh, in_specs=layout.spec(), out_specs=P(), check_vma=False)(
        stack
    )


def to_groups(
    layout: Layout, plans: Any, tree: Any, *, valid: Sequence[Any] | None = None
) -> dict[str, tuple[Any, ...]]:
    """The grouped tree of a params-shaped tree (gradients, updates).

    Each preconditioned leaf's block view is cast to its group's dtype and
    appended to the group's stack; the stacks are padded with NaN blocks (so the
    failure policy keeps them out of every statistic) and laid out along axis 0
    over the mesh. Leaves without factors are passed bare.

    Args:
      layout: The layout.
      plans: The plans of ``tree``.
      tree: A tree like the params.
      valid: Per plan position a bool scalar (``None`` entries allowed); the
        blocks of a leaf whose flag is false are filled with NaN.

    Returns:
      ``{'blocks': (stack per group), 'leaves': (leaf per leaf without factors)}``.
    """
    nodes = plan_nodes(plans)
    xs = _bare_leaves(plans, tree)
    blocks = []
    for g in layout.groups:
        route = _route(layout, g, nodes, xs)
        if route is not None:
            blocks.append(_routed_stack(route, layout, g, nodes, xs, valid))
            continue
        parts = [_member_blocks(g, nodes, xs, valid, k) for k in range(len(g.members))]
        pad = g.padded - g.size
        if pad:
            parts.append(jnp.full((pad,) + g.key.blocks, jnp.nan, g.dtype))
        blocks.append(share(layout, g, jnp.concatenate(parts) if len(parts) > 1 else parts[0]))
    return {"blocks": tuple(blocks), "leaves": tuple(xs[i] for i in layout.leaves)}


def from_groups(layout: Layout, plans: Any, grouped_tree: Any, like: Any) -> Any:
    """A params-shaped tree back from a grouped tree (inverse of :func:`to_groups`).

    Each group stack is gathered once (the one collective of the way back; a
    mapped layout's with ``lax.all_gather`` over its axes),
    sliced into its members' block views and mapped to the leaves' shapes; each
    leaf takes ``like``'s dtype, wrapper and (explicit) sharding. Masked
    positions of ``plans``, and the members of a group or leaves whose entry is
    ``None`` (nothing to send back), keep ``like``'s node.
    """
    nodes, treedef = jax.tree.flatten(plans, is_leaf=_axes._is_plan_node)
    plan_leaves = plan_nodes(plans)
    like_nodes = treedef.flatten_up_to(like)
    out: list[Any] = list(like_nodes)
    likes = _bare_leaves(plans, like)
    for g, stack in zip(layout.groups, grouped_tree["blocks"]):
        if stack is None:
            continue
        route = _route(layout, g, plan_leaves, likes)
        if route is not None:
            # Only the blocks each device's shards need travel (see "routes").
            mine, rest = _routed_leaves(route, layout, g, stack)
            for (_, i, *_), y in zip(route.aligned, mine):
                out[i] = _like(y, like_nodes[i], nodes[i])
            start = 0
            for k in route.gathered:
                i, n = g.members[k]
                out[i] = _like(
                    plan_leaves[i].from_blocks(rest[start : start + n]), like_nodes[i], nodes[i]
                )
                start += n
            continue
        stack = _whole(stack, layout) if layout.mapped else _gather_blocks(stack, g, layout)
        start = 0
        for i, n in g.members:
            y = plan_leaves[i].from_blocks(stack[start : start + n])
            start += n
            out[i] = _like(y, like_nodes[i], nodes[i])
    for i, y in zip(layout.leaves, grouped_tree["leaves"]):
        if y is not None:
            out[i] = _like(y, like_nodes[i], nodes[i])
    return jax.tree.unflatten(treedef, out)


def _like(y: jax.Array, like: Any, node: Any) -> Any:
    """``y`` with the dtype, explicit sharding and wrappers of ``like``."""
    wrappers = []
    while not _axes.is_plan_leaf(node) and type(like) is type(node):
        like, rewrap = _axes._unwrap(like)
        node = _axes._unwrap(node)[0]
        wrappers.append(rewrap)
    y = y.astype(like.dtype)
    spec = _axes._explicit_spec(like)
    if spec is not None:
        y = jax.sharding.reshard(y, spec)
    for rewrap in reversed(wrappers):
        y = rewrap(y)
    return y


def _bare_leaves(plans: Any, tree: Any) -> list[Any]:
    """Per plan position, the leaf of ``tree`` without the plans' wrappers."""
    nodes, treedef = jax.tree.flatten(plans, is_leaf=_axes._is_plan_node)
    out = []
    for node, x in zip(nodes, treedef.flatten_up_to(tree)):
        while not _axes.is_plan_leaf(node) and type(x) is type(node):
            node, x = _axes._unwrap(node)[0], _axes._unwrap(x)[0]
        out.append(x)
    return out


def zeros(layout: Layout, plans: Any, params: Any) -> dict[str, tuple[Any, ...]]:
    """A grouped tree of zeros standing in for the params at ``init``."""
    xs = _bare_leaves(plans, params)
    return {
        "blocks": tuple(jnp.zeros((g.length,) + g.key.blocks, g.dtype) for g in layout.groups),
        "leaves": tuple(jnp.zeros(np.shape(xs[i]), xs[i].dtype) for i in layout.leaves),
    }


def place_state(layout: Layout, tree: Any) -> Any:
    """Lays every group entry of a grouped state tree out along axis 0 (at ``init``)."""
    if tree is None:
        return None
    return {
        "blocks": jax.tree.map(lambda x: _constrain(x, layout), tree["blocks"]),
        "leaves": tree["leaves"],
    }


def real_blocks(layout: Layout) -> tuple[jax.Array, ...]:
    """Per group, the ``(length,)`` bool mask of the real (not padded) blocks this state holds.

    A mapped layout's state holds one device's share of each stack, found by
    ``lax.axis_index``; the padding is at the end of every whole stack.
    """
    out = []
    for g in layout.groups:
        index = jnp.arange(g.length)
        if layout.mapped:
            index = index + _device_index(layout) * g.length
        out.append(index < g.size)
    return tuple(out)


def pad_identity(layout: Layout, factors: Sequence[Any], identity: Sequence[Any]) -> Any:
    """Per group, factor statistics whose padded blocks hold the identity.

    A padded block never enters a statistic (its gradient is NaN), so its
    statistic keeps its initial value; the identity keeps its root, inverse or
    basis finite at every refresh, so padding is never counted as a failure.
    """
    out = []
    for g, real, fs, eyes in zip(layout.groups, real_blocks(layout), factors, identity):
        out.append(
            tuple(
                jnp.where(jnp.reshape(real, (g.length,) + (1,) * (f.ndim - 1)), f, e)
                for f, e in zip(fs, eyes)
            )
        )
    return tuple(out)


def repad(like: Any, restored: dict[tuple[str, ...], Any], key: Any) -> dict[tuple[str, ...], Any]:
    """Restored group stacks cut or padded to the stack lengths of ``like``.

    A state saved in the owner layout on ``D`` devices has its groups padded to a
    multiple of ``D``; restored for another device count the padding differs
    (8 devices to 4: a 3-block group is 8 long in the checkpoint and 4 in the
    new layout). The real blocks come first in every stack, so a longer stack
    is cut and a shorter one is extended with copies of its first block (a valid
    statistic, root or basis, which a padded block keeps for good: its gradient
    is NaN).

    Args:
      like: The expected state (or its ``jax.eval_shape``).
      restored: The restored arrays by path (``key`` of each path entry).
      key: How a path entry becomes a string (the checkpoint module's rule).

    Returns:
      ``restored`` with the group stacks of ``like`` resized; other entries as given.
    """
    out = dict(restored)
    nodes = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda x: isinstance(x, Grouped))[0]
    for path, node in nodes:
        if not isinstance(node, Grouped):
            continue
        prefix = tuple(key(k) for k in path) + ("blocks",)
        for sub, want in jax.tree_util.tree_flatten_with_path(node.blocks)[0]:
            where = prefix + tuple(key(k) for k in sub)
            have = out.get(where)
            if have is None or not np.ndim(have) or np.shape(have)[1:] != tuple(want.shape[1:]):
                continue
            n, m = np.shape(have)[0], want.shape[0]
            if n == m:
                continue
            sharding = getattr(have, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding):
                # Gathered first: a sharded stack cannot be cut where it is split
                # (restore_state places the result on its target afterwards).
                have = jax.device_put(have, jax.sharding.NamedSharding(sharding.mesh, P()))
            if n > m:
                out[where] = have[:m]
            else:
                out[where] = jnp.concatenate([have, jnp.repeat(have[:1], m - n, axis=0)])
    return out


def to_groups_blocks(layout: Layout, per_leaf: Sequence[Any], *, fill: float = 0.0) -> tuple:
    """Per group, per-block arrays of its members stacked like :func:`to_groups` stacks blocks.

    For state or inputs that are not shaped like the params but have one entry
    per block (K-FAC's layer statistics ``(stack, d, d)``): each member's arrays
    are concatenated along axis 0 in member order, padded with ``fill`` to the
    group's padded length and laid out along axis 0 over the mesh, so block
    ``j`` of a stack belongs to the same leaf and block as in the gradient's
    stack.

    Args:
      layout: The layout.
      per_leaf: Per plan position a pytree of arrays whose leading axis is the
        leaf's number of blocks (its plan's ``stack``), or ``None``; the members
        of a group are all ``None`` or all alike in structure.
      fill: The value of padded blocks.

    Returns:
      Per group the stacked pytree, or ``None`` where its members are ``None``.
    """
    out = []
    for g in layout.groups:
        parts = [per_leaf[i] for i, _ in g.members]
        if all(p is None for p in parts):
            out.append(None)
            continue

        def stack(*xs, g=g):
            xs = [
                jax.sharding.reshard(x, P()) if _axes._explicit_spec(x) is not None else x
                for x in xs
            ]
            pad = g.padded - g.size
            if pad:
                xs.append(jnp.full((pad,) + tuple(xs[0].shape[1:]), fill, xs[0].dtype))
            return share(layout, g, jnp.concatenate(xs) if len(xs) > 1 else xs[0])

        out.append(jax.tree.map(stack, *parts))
    return tuple(out)


def leaf_validity(plans: Any, tree: Any) -> list[Any]:
    """Per plan position, the leaf's validity flag (``None`` where masked).

    The failure policy's :func:`layerwise_optax._failure.guard` of each leaf of a
    gradient tree, computed where the leaf lies (a sum, no gather): the
    ``valid`` argument of :func:`to_groups`, and the per-leaf flags a step
    applies after :func:`from_groups` (skipped counts, per-leaf updates).
    """
    return [
        None if _axes.is_masked(plan) else _failure.guard(x)[0]
        for plan, x in zip(plan_nodes(plans), _bare_leaves(plans, tree))
    ]


def position_tree(plans: Any, values: Sequence[Any]) -> Any:
    """A tree like ``plans`` holding one value per plan position (e.g. :func:`leaf_validity`)."""
    treedef = jax.tree.structure(plans, is_leaf=_axes._is_plan_node)
    return jax.tree.unflatten(treedef, list(values))


def _member_ids(group: Group) -> np.ndarray:
    """Per block of ``group``'s stack, the index of its member leaf (padding: ``len(members)``)."""
    counts = [n for _, n in group.members] + [group.padded - group.size]
    return np.repeat(np.arange(len(counts)), counts)


def per_member(group: Group, x: jax.Array, reduce: str, layout: Layout | None = None) -> jax.Array:
    """Per member leaf of ``group``, a reduction of per-block values over its blocks.

    Args:
      group: The group.
      x: Per block of its stack as stored a value, shape ``(group.length,)``
        (sharded or not; a mapped layout's local share is gathered first).
      reduce: ``'sum'`` or ``'all'`` (``x`` bool).
      layout: The layout (needed when it is mapped).

    Returns:
      Shape ``(len(group.members),)``, replicated: padded blocks never enter.
    """
    ids = _member_ids(group)
    num = len(group.members) + 1
    x = _replicate(x) if layout is None else _whole(x, layout)
    if reduce == "sum":
        return jax.ops.segment_sum(x, ids, num_segments=num, indices_are_sorted=True)[:-1]
    if reduce == "all":
        low = jax.ops.segment_min(
            x.astype(jnp.int32), ids, num_segments=num, indices_are_sorted=True
        )
        return low[:-1] > 0
    raise ValueError(f"reduce must be 'sum' or 'all', got {reduce!r}.")


def per_block(layout: Layout, group: Group, values: jax.Array, fill: Any) -> jax.Array:
    """Per block of ``group``'s stack, its member leaf's value (inverse of :func:`per_member`).

    Args:
      layout: The layout (the stack is laid out along axis 0 over its axes).
      group: The group.
      values: Shape ``(len(group.members),)``.
      fill: The value of padded blocks.

    Returns:
      Shape ``(group.length,)``, laid out like the group's stacks.
    """
    values = jnp.concatenate([values, jnp.full((1,), fill, values.dtype)])
    return share(layout, group, values[_member_ids(group)])


# ----------------------------------------------------------------------------- routes
#
# With FSDP specs each device already holds a slice of every sharded leaf. The
# plain way to a group stack gathers every leaf whole (one all-gather of the
# parameters) and the way back gathers the stack whole again (a second one),
# although each device needs only ``1 / devices`` of either (issue 15). A
# *route* moves only what must move, in units of whole blocks or of equal
# slices of their rows:
#
# * a member leaf is *aligned* when it is sharded (``Explicit`` axes) on one
#   dimension over exactly the layout's axes, that dimension leads its block
#   view (the leading batch axis, or the leading axis of the first view
#   dimension of an unbatched leaf) and every shard holds whole blocks or a
#   whole fraction ``1 / q`` of a row of blocks: then device ``t``'s shard is
#   exactly the leaf's blocks ``[t c, (t + 1) c)`` (``c = blocks / devices``),
#   or the ``t mod q``-th slice of the rows of every block of block row
#   ``t div q`` (the usual case at scale: a 4096-wide layer over 256 devices
#   leaves 16 rows per shard, far fewer than a block), cut out locally by a
#   plan of the shard's shape (:func:`_shard_plan`); the blocks travel in
#   *units* of ``1 / lcm(q)`` of their rows (:class:`_Route`);
# * the stack position of every block and its owner are static, so per device
#   pair the blocks to send are known at trace time. The (holder, owner) pairs
#   are split into rounds in which each device sends to at most one device and
#   receives from at most one (:func:`_rounds`); each round is one
#   ``lax.ppermute`` of the units of its pairs, padded to its largest pair;
#   then a static table per device picks each stack unit from the device's
#   own units, the received ones, the gathered members (leaves that are not
#   aligned, gathered whole as before) or a NaN padding block. A group of one
#   aligned leaf moves nothing: its stack is split exactly as the leaf is;
# * the way back is the mirror image: the owners send each holder its blocks,
#   and the blocks of the members that are not aligned are gathered from their
#   owners (an all-gather, or an all-reduce of a zero buffer each owner writes
#   its blocks into when few devices own them).
#
# Leaves on Auto axes (their sharding is not known while tracing) and leaves
# sharded over only some of the layout's axes keep the plain way. The numbers
# are moved, never combined, so a route gives the same stacks bit for bit; the
# updates may differ at float32 round-off where the compiler fuses the rest of
# the step differently (SOAP: below 1e-6 relative in the tests).


@dataclasses.dataclass(frozen=True)
class _Route:
    """How one group's blocks travel between leaf shards and the stack (static).

    Blocks travel in *units*: each block split into ``units`` equal slices
    along its first axis (consecutive rows). A shard that holds whole blocks
    sends them as ``units`` units each; a shard that holds ``1 / q`` of a row of
    blocks (its rows are a slice of the blocks' first axis) sends its *pieces*,
    each ``units / q`` units, and the owner puts the ``q`` pieces of a block
    together by stacking their rows. ``units`` is the least common multiple of
    the members' ``q`` (it divides the block length, as every ``q`` does).

    Attributes:
      aligned: Per aligned member ``(member index, position, shard plan, spec,
        blocks or pieces per device, q)``; ``q == 1``: the shard holds whole
        blocks, ``q > 1``: it holds pieces, ``q`` per block.
      gathered: Member indices (into ``group.members``) of the other members.
      offsets: Stack offset of every member.
      devices: The device count.
      axes: The mesh axes (a name or a tuple, as collectives take them).
      units: Units per block.
    """

    aligned: tuple[tuple[int, int, _axes.LeafPlan, P, int, int], ...]
    gathered: tuple[int, ...]
    offsets: tuple[int, ...]
    devices: int
    axes: Any
    units: int = 1

    def held_units(self, member: tuple[int, int, _axes.LeafPlan, P, int, int]) -> int:
        """Units of one aligned member each device holds."""
        *_, per, q = member
        return per * (self.units // q)

    @property
    def held(self) -> int:
        """Units of aligned members each device holds."""
        return sum(self.held_units(m) for m in self.aligned)

    def unit_shape(self, group: Group) -> tuple[int, ...]:
        """The shape of one unit: a block with ``1 / units`` of its first axis."""
        b = group.key.blocks
        return (b[0] // self.units,) + tuple(b[1:])

    def sources(self, group: Group) -> list[tuple[str, int, int]]:
        """Per unit of the stack (``padded * units`` of them) ``(kind, device, index)``.

        ``kind`` is ``'held'`` (unit ``index`` of the holder ``device``'s held
        units), ``'gathered'`` (unit ``index`` of the gathered members' blocks,
        split into units) or ``'pad'``.
        """
        units = self.units
        out: list[tuple[str, int, int]] = [("pad", 0, 0)] * (group.padded * units)
        start = 0
        for m in self.aligned:
            k, *_, per, q = m
            r = units // q
            base = self.offsets[k]
            for b in range(group.members[k][1]):
                i, j = divmod(b, per)
                for u in range(units):
                    p, s = divmod(u, r)
                    out[(base + b) * units + u] = ("held", q * i + p, start + j * r + s)
            start += self.held_units(m)
        start = 0
        for k in self.gathered:
            base, n = self.offsets[k], group.members[k][1]
            for j in range(n * units):
                out[base * units + j] = ("gathered", 0, start + j)
            start += n * units
        return out


def _shard_plan(plan: _axes.LeafPlan, dim: int, devices: int) -> tuple[_axes.LeafPlan, int] | None:
    """The plan of one shard of a leaf split evenly on ``dim``, and its ``q``, if it fits.

    ``None`` unless ``dim`` is the leaf's leading axis in block-view order and
    a shard's blocks are a contiguous run of the leaf's stack: ``dim`` is the
    leading batch axis, or the leaf is unbatched and ``dim`` leads the first
    view dimension, which is not padded and whose shard is a whole number of
    blocks (``q == 1``) or a whole fraction ``1 / q`` of the block length: the
    shard then holds the ``q``-th parts (*pieces*) of one row of blocks, and
    the returned plan cuts them (a block length of the shard's rows, one block
    on the first dimension).
    """
    size = plan.shape[dim]
    if not plan.perm or plan.perm[0] != dim or size % devices or size < devices:
        return None
    shape = tuple(s // devices if i == dim else s for i, s in enumerate(plan.shape))
    if plan.batch > 1:
        # Batch axes lead the view, and a size > 1 leading axis belongs to them.
        if plan.batch % size:
            return None
        return dataclasses.replace(plan, shape=shape, batch=plan.batch // devices), 1
    if not plan.dims or plan.dims[0] % size or plan.dims[0] != plan.num_blocks[0] * plan.blocks[0]:
        return None
    local = plan.dims[0] // devices
    if local % plan.blocks[0] == 0:
        return dataclasses.replace(
            plan,
            shape=shape,
            dims=(local,) + plan.dims[1:],
            num_blocks=(plan.num_blocks[0] // devices,) + plan.num_blocks[1:],
        ), 1
    if plan.blocks[0] % local:
        return None
    return dataclasses.replace(
        plan,
        shape=shape,
        dims=(local,) + plan.dims[1:],
        blocks=(local,) + plan.blocks[1:],
        num_blocks=(1,) + plan.num_blocks[1:],
    ), plan.blocks[0] // local


def _route(layout: Layout, group: Group, nodes: Sequence[Any], xs: Sequence[Any]) -> _Route | None:
    """The route of a group for leaves ``xs`` (per plan position), or ``None``."""
    mesh = _distribute.current_mesh()
    if (
        layout.mapped
        or mesh is None
        or not layout.axes
        or any(a not in mesh.axis_names for a in layout.axes)
    ):
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    devices = math.prod(sizes[a] for a in layout.axes)
    if devices <= 1 or group.padded % devices:
        return None
    aligned, gathered, offsets, start = [], [], [], 0
    for k, (i, n) in enumerate(group.members):
        offsets.append(start)
        start += n
        spec = _axes._explicit_spec(xs[i]) if xs[i] is not None else None
        cut, where = None, P()
        if spec is not None:
            where = P(*spec)
            used = [(d, e) for d, e in enumerate(spec) if e is not None]
            if len(used) == 1:
                d, entry = used[0]
                if (entry if isinstance(entry, tuple) else (entry,)) == tuple(layout.axes):
                    cut = _shard_plan(nodes[i], d, devices)
        if cut is None:
            gathered.append(k)
        else:
            plan, q = cut
            per = n // devices if q == 1 else math.prod(plan.num_blocks) * plan.batch
            aligned.append((k, i, plan, where, per, q))
    if not aligned:
        return None
    axes = layout.axes if len(layout.axes) != 1 else layout.axes[0]
    units = math.lcm(*(q for *_, q in aligned))
    return _Route(tuple(aligned), tuple(gathered), tuple(offsets), devices, axes, units)


def _rounds(
    route: _Route, pairs: Sequence[tuple[int, int, int, int]]
) -> list[tuple[tuple[tuple[int, int], ...], np.ndarray, dict[tuple[int, int], int]]]:
    """The moving blocks as rounds of ``lax.ppermute``, with their tables.

    The (sender, receiver) edges are split into rounds in which every device
    sends to at most one device and receives from at most one (heaviest edges
    first, so each round's buffer, padded to its heaviest edge, wastes little).

    Args:
      route: The route.
      pairs: ``(sender, receiver, sender index, receiver key)`` per block that
        moves between two devices.

    Returns:
      Per round ``(edges, table, slots)``: the ``(sender, receiver)`` pairs,
      ``table[t]`` the sender indices device ``t`` sends (padded with 0) and
      ``slots[(receiver, key)]`` the entry's position in what the receiver gets.
    """
    edges: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    for t, u, index, key in pairs:
        edges.setdefault((t, u), []).append((index, key))
    order = sorted(edges, key=lambda e: (-len(edges[e]), e))
    out = []
    while order:
        senders, receivers, chosen, rest = set(), set(), [], []
        for t, u in order:
            if t in senders or u in receivers:
                rest.append((t, u))
                continue
            senders.add(t)
            receivers.add(u)
            chosen.append((t, u))
        order = rest
        width = max(len(edges[e]) for e in chosen)
        table = np.zeros((route.devices, width), np.int32)
        slots = {}
        for t, u in chosen:
            for k, (index, key) in enumerate(edges[(t, u)]):
                table[t, k] = index
                slots[(u, key)] = k
        out.append((tuple(chosen), table, slots))
    return out


def _send(x: jax.Array, route: _Route, edges: Sequence[tuple[int, int]]) -> jax.Array:
    """``x`` of every sender of ``edges`` sent to its receiver (a ``ppermute``)."""
    return jax.lax.ppermute(x, route.axes, list(edges))


def _member_blocks(
    group: Group, nodes: Sequence[Any], xs: Sequence[Any], valid: Sequence[Any] | None, k: int
) -> jax.Array:
    """Member ``k``'s block view, whole on every device, NaN where its leaf is not valid."""
    i = group.members[k][0]
    x = xs[i]
    if _axes._explicit_spec(x) is not None:
        x = jax.sharding.reshard(x, P())
    b = nodes[i].to_blocks(x.astype(group.dtype))
    if valid is not None and valid[i] is not None:
        b = jnp.where(valid[i], b, jnp.nan)
    return b


def _routed_stack(
    route: _Route,
    layout: Layout,
    group: Group,
    nodes: Sequence[Any],
    xs: Sequence[Any],
    valid: Sequence[Any] | None,
) -> jax.Array:
    """The group stack of a route, laid out along axis 0 (way in, see above)."""
    mesh = _distribute.current_mesh()
    d, units = route.devices, route.units
    length = group.padded // d * units  # units per device
    unit = route.unit_shape(group)
    sources = route.sources(group)
    held_pairs, table = [], np.zeros((d, length), np.int64)
    # Pool of device u: held units, gathered units, then one buffer per round, then NaN.
    for u in range(d):
        for slot in range(length):
            kind, t, index = sources[u * length + slot]
            if kind == "held" and t != u:
                held_pairs.append((t, u, index, slot))
    rounds = _rounds(route, held_pairs)
    gathered_n = sum(group.members[k][1] for k in route.gathered) * units
    base = route.held + gathered_n
    nan = base + sum(t.shape[1] for _, t, _ in rounds)
    for u in range(d):
        for slot in range(length):
            kind, t, index = sources[u * length + slot]
            if kind == "pad":
                table[u, slot] = nan
            elif kind == "gathered":
                table[u, slot] = route.held + index
            elif t == u:
                table[u, slot] = index
            else:
                offset = base
                for _, tab, slots in rounds:
                    if (u, slot) in slots:
                        table[u, slot] = offset + slots[(u, slot)]
                        break
                    offset += tab.shape[1]
    flags = tuple(
        jnp.asarray(True) if valid is None or valid[i] is None else jnp.asarray(valid[i])
        for _, i, *_ in route.aligned
    )
    parts = [_member_blocks(group, nodes, xs, valid, k) for k in route.gathered]
    gathered = (
        jnp.concatenate(parts)
        if len(parts) > 1
        else parts[0]
        if parts
        else jnp.zeros((0,) + group.key.blocks, group.dtype)
    )
    gathered = gathered.reshape((-1,) + unit)
    send = tuple(jnp.asarray(t) for _, t, _ in rounds)
    index = jnp.asarray(table.astype(np.int32))

    def local(leaves, flags, gathered, send, index):
        me = jax.lax.axis_index(route.axes)
        held = [
            jnp.where(f, plan.to_blocks(x.astype(group.dtype)), jnp.nan).reshape((-1,) + unit)
            for (_, _, plan, *_), x, f in zip(route.aligned, leaves, flags)
        ]
        held = jnp.concatenate(held) if len(held) > 1 else held[0]
        pool = [held, gathered]
        for (edges, _, _), tab in zip(rounds, send):
            pool.append(_send(jnp.take(held, tab[me], axis=0), route, edges))
        pool.append(jnp.full((1,) + unit, jnp.nan, group.dtype))
        out = jnp.take(jnp.concatenate(pool), index[me], axis=0)
        # A block's units are its consecutive rows: stacking them is a reshape.
        return out.reshape((length // units,) + group.key.blocks)

    leaves = tuple(xs[i] for _, i, *_ in route.aligned)
    specs = tuple(m[3] for m in route.aligned)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(specs, P(), P(), P(), P()),
        out_specs=layout.spec(),
        check_vma=False,
    )(leaves, flags, gathered, send, index)


def _routed_leaves(
    route: _Route, layout: Layout, group: Group, stack: jax.Array
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The way back of a route: the aligned members' leaves and the others' blocks.

    Returns:
      The aligned members' leaves (in the group's dtype, laid out as their
      specs), and the gathered members' blocks concatenated, whole on every
      device.
    """
    mesh = _distribute.current_mesh()
    d, units = route.devices, route.units
    length = group.padded // d  # blocks per device
    unit = route.unit_shape(group)
    sources = route.sources(group)
    owner, gathered_at = {}, {}
    for p, (kind, t, index) in enumerate(sources):
        if kind == "held":
            owner[(t, index)] = divmod(p, length * units)
        elif kind == "gathered" and index % units == 0:
            gathered_at[index // units] = divmod(p // units, length)
    held_pairs, back = [], np.zeros((d, route.held), np.int64)
    for t in range(d):
        for h in range(route.held):
            u, slot = owner[(t, h)]
            if u != t:
                held_pairs.append((u, t, slot, h))
    rounds = _rounds(route, held_pairs)
    for t in range(d):
        for h in range(route.held):
            u, slot = owner[(t, h)]
            if u == t:
                back[t, h] = slot
                continue
            offset = length * units
            for _, tab, slots in rounds:
                if (t, h) in slots:
                    back[t, h] = offset + slots[(t, h)]
                    break
                offset += tab.shape[1]
    gathered_n = sum(group.members[k][1] for k in route.gathered)
    owned: list[list[int]] = [[] for _ in range(d)]
    where = np.zeros((gathered_n,), np.int64)
    for g in range(gathered_n):
        u, slot = gathered_at[g]
        owned[u].append(slot)
    width = max((len(o) for o in owned), default=0)
    picks = np.zeros((d, width), np.int64)
    for u, o in enumerate(owned):
        picks[u, : len(o)] = o
    positions = np.full((d, width), gathered_n, np.int64)  # gathered_n: dropped
    for g in range(gathered_n):
        u, slot = gathered_at[g]
        k = owned[u].index(slot)
        where[g] = u * width + k
        positions[u, k] = g
    # A ring all-gather moves ``devices * width`` blocks, an all-reduce about twice its length.
    summed = d * width > 2 * gathered_n
    put = jnp.asarray(positions.astype(np.int32))
    send = tuple(jnp.asarray(t) for _, t, _ in rounds)
    index = jnp.asarray(back.astype(np.int32))
    pick = jnp.asarray(picks.astype(np.int32))

    def local(seg, send, index, pick):
        me = jax.lax.axis_index(route.axes)
        cut = seg.reshape((-1,) + unit)
        pool = [cut]
        for (edges, _, _), tab in zip(rounds, send):
            pool.append(_send(jnp.take(cut, tab[me], axis=0), route, edges))
        held = jnp.take(jnp.concatenate(pool) if len(pool) > 1 else cut, index[me], axis=0)
        leaves, start = [], 0
        for m in route.aligned:
            plan, n = m[2], route.held_units(m)
            blocks = held[start : start + n].reshape(plan.block_shape)
            leaves.append(plan.from_blocks(blocks))
            start += n
        if gathered_n and summed:
            # Few owners hold these blocks: each device writes its own into a
            # zero buffer of them all and the buffers are summed (one addend
            # per slot, so the sum is exact), cheaper than a padded all-gather.
            mine = jnp.take(seg, pick[me], axis=0)
            buffer = jnp.zeros((gathered_n,) + group.key.blocks, seg.dtype)
            gathered = jax.lax.psum(buffer.at[put[me]].set(mine, mode="drop"), route.axes)
        elif gathered_n:
            mine = jnp.take(seg, pick[me], axis=0)
            every = jax.lax.all_gather(mine, route.axes, tiled=True)
            gathered = jnp.take(every, jnp.asarray(where.astype(np.int32)), axis=0)
        else:
            gathered = jnp.zeros((0,) + group.key.blocks, seg.dtype)
        return tuple(leaves), gathered

    stack = _distribute.place(stack, layout.spec(), mesh)
    specs = tuple(m[3] for m in route.aligned)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(layout.spec(), P(), P(), P()),
        out_specs=(specs, P()),
        check_vma=False,
    )(stack, send, index, pick)


# ----------------------------------------------------------------------------- per-factor layout
#
# K-FAC keeps one input factor ``A`` and one output factor ``G`` per layer (per
# block of a stacked layer). Grouped by layer (``build``), a group holds few
# layers and is padded to one layer per device, so at 8 devices the factor
# state shrank only 1.75x on a four-layer MLP (issue 15). The per-factor layout
# stacks single factors instead: every factor of length ``d`` is stored in the
# leading ``d x d`` corner of an ``s x s`` entry of a stack of factors of
# nearby lengths (``s`` the largest, :func:`buckets`), so a group holds the
# ``A`` and ``G`` factors of many layers and spreads over the devices. The
# corner is exact: the rest of a statistic is zero, and the refreshed matrix
# there is the identity, so its inverse is ``blockdiag(M^-1, I)`` and its
# product with an operand that is zero outside the corner gives the corner's
# solve and zeros (tests/test_owner.py checks both).


@dataclasses.dataclass(frozen=True)
class FactorGroup:
    """Single Kronecker factors of nearby lengths, each in the corner of an ``s x s`` entry.

    Attributes:
      dim: The entries' length ``s``; a member factor of length ``d <= s`` is
        stored in the leading ``d x d`` corner.
      dtype: Compute dtype of the members' gradients (at least float32).
      kind: ``'full'`` (entries ``s x s``) or ``'diag'`` (diagonal factors,
        entries of length ``s``; the leading ``d`` hold a member's diagonal).
      members: ``(position, side, count, d)`` per member, in stack order: the
        plan position of the kernel (:func:`plan_nodes`), its factor (``0``:
        the input factor, the first view dimension; ``1``: the output factor),
        the number of blocks of the kernel (its plan's ``stack``: each block
        has its own factor, one stack entry each) and the factor's length.
      padded: Stack length, the number of entries rounded up to a multiple of
        the device count.
    """

    dim: int
    dtype: str
    kind: str
    members: tuple[tuple[int, int, int, int], ...]
    padded: int = dataclasses.field(compare=False)
    local: None = dataclasses.field(default=None, compare=False)

    @property
    def size(self) -> int:
        """The number of real (not padded) entries."""
        return sum(m[2] for m in self.members)

    @property
    def length(self) -> int:
        """The stack length a state array holds."""
        return self.padded

    def lengths(self) -> np.ndarray:
        """Per entry of the stack the real factor length ``d`` (padded entries: 0)."""
        d = [m[3] for m in self.members for _ in range(m[2])]
        return np.asarray(d + [0] * (self.padded - self.size), np.int32)


# The largest ratio of lengths one bucket of factors holds: a factor is padded
# to at most 4/3 of its length, 16/9 of its entries.
BUCKET_RATIO = 4 / 3


def buckets(lengths: Sequence[int], ratio: float = BUCKET_RATIO) -> list[tuple[int, ...]]:
    """Factor lengths partitioned into runs of nearby lengths.

    From the largest length ``s`` down, a bucket takes every length ``d`` with
    ``d * ratio >= s``; the next bucket starts at the largest length left.
    Factors of one bucket are stored padded to its largest length, so a bucket
    gathers the input and output factors of many layers (785, 1024 and 1025
    for a 784-1024-1024 MLP with folded biases) into one stack that spreads
    over the devices. The buckets do not depend on the device count, so a
    state saved on one count restores onto another with only the padding of
    each stack changed (:func:`repad`).

    Args:
      lengths: Factor lengths (repeats allowed).
      ratio: The largest ratio of lengths in a bucket (``>= 1``).

    Returns:
      The buckets, each a tuple of distinct lengths, descending, largest first.
    """
    rest = sorted(set(lengths), reverse=True)
    out = []
    while rest:
        top = rest[0]
        bucket = tuple(d for d in rest if d * ratio >= top)
        out.append(bucket)
        rest = rest[len(bucket) :]
    return out


def build_per_factor(
    plans: Any, params: Any, axes: tuple[str, ...], devices: int, kinds: Any = None
) -> Layout:
    """K-FAC's per-factor layout: the factors of every kernel stacked by bucketed length.

    Every preconditioned position's plan has two view dimensions (the kernel's
    input and output), each with a ``'full'`` or ``'diag'`` factor
    (``kinds(plan)``; default ``plan.kinds``). Per dtype and kind the factor
    lengths are bucketed (:func:`buckets`); a bucket is one
    :class:`FactorGroup`, its members in leaf order, input factor before
    output factor, padded to a multiple of ``devices`` entries.
    """
    kinds = (lambda plan: plan.kinds) if kinds is None else kinds
    found: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
    leaves, preconditioned = _split_leaves(plans, params)
    for i, plan, dtype in preconditioned:
        for side, (d, kind) in enumerate(zip(plan.dims, kinds(plan))):
            found.setdefault((dtype, kind), []).append((i, side, plan.stack, d))
    groups = []
    for (dtype, kind), members in found.items():
        for bucket in buckets([m[3] for m in members]):
            ms = tuple(m for m in members if m[3] in bucket)
            n = sum(m[2] for m in ms)
            padded = -(-n // devices) * devices
            groups.append(FactorGroup(max(bucket), dtype, kind, ms, padded))
    return Layout(
        cast("tuple[Group, ...]", tuple(groups)),
        tuple(leaves),
        tuple(axes),
        devices,
        per_factor=True,
    )


def check_per_factor(layout: Layout, plans: Any, tree: Any, kinds: Any = None) -> None:
    """Raises ``ValueError`` unless ``tree`` has the leaves a per-factor ``layout`` was built for."""
    expected = build_per_factor(plans, tree, layout.axes, layout.devices, kinds)
    if expected.groups != layout.groups or expected.leaves != layout.leaves:
        raise ValueError(
            "the updates do not match the params the owner-layout state was initialized "
            f"with: factor groups {[(g.dim, g.size) for g in expected.factor_groups()]} expected "
            f"{[(g.dim, g.size) for g in layout.factor_groups()]}."
        )


def stack_factors(
    layout: Layout, group: FactorGroup, parts: Sequence[Any], shape: tuple[int, ...], dtype: Any
) -> jax.Array:
    """One stack of a :class:`FactorGroup`: per member an array in the corner of each entry.

    Args:
      layout: The layout.
      group: The group.
      parts: Per member an array ``(count, *dims)`` with ``dims <= shape``
        entrywise, or ``None`` (zeros).
      shape: The entries' shape (e.g. ``(s, s)``; an operand's ``(s, w)``).
      dtype: The stack's dtype.

    Returns:
      Shape ``(group.padded, *shape)``, zero outside the corners and in padded
      entries, laid out along axis 0 over the layout's axes.
    """
    out = []
    for (_, _, count, _), x in zip(group.members, parts):
        if x is None:
            out.append(jnp.zeros((count,) + shape, dtype))
            continue
        if _axes._explicit_spec(x) is not None:
            x = jax.sharding.reshard(x, P())
        x = x.astype(dtype)
        out.append(jnp.pad(x, [(0, 0)] + [(0, n - m) for n, m in zip(shape, x.shape[1:])]))
    pad = group.padded - group.size
    if pad:
        out.append(jnp.zeros((pad,) + shape, dtype))
    return _constrain(jnp.concatenate(out) if len(out) > 1 else out[0], layout)


def factor_flags(layout: Layout, group: FactorGroup, flags: Sequence[Any]) -> jax.Array:
    """Per entry of a :class:`FactorGroup`'s stack its member's flag (padded: false).

    ``flags``: per member a bool scalar (or a Python bool).
    """
    out = [
        jnp.broadcast_to(jnp.asarray(f, jnp.bool_), (m[2],)) for m, f in zip(group.members, flags)
    ]
    pad = group.padded - group.size
    if pad:
        out.append(jnp.zeros((pad,), jnp.bool_))
    return _constrain(jnp.concatenate(out), layout)


def unstack_factors(
    layout: Layout, group: FactorGroup, stack: jax.Array, cuts: Sequence[Any]
) -> list[Any]:
    """Per member its entries of a :class:`FactorGroup` stack, cut, replicated.

    The inverse of :func:`stack_factors`: member ``k``'s ``(count, *cuts[k])``
    leading corners (``None``: not wanted). Under a mesh each device puts the
    corners of the entries it holds into zero buffers of the wanted members'
    shapes and the buffers are summed over the layout's axes: one all-reduce
    of the wanted corners only (no padded entries, no padding around the
    corners), exact since every entry has one nonzero addend.

    Args:
      layout: The layout.
      group: The group.
      stack: A stack of the group, laid out along axis 0 over the layout's axes.
      cuts: Per member the shape of the corner to keep, or ``None``.

    Returns:
      Per member ``(count, *cut)`` replicated, or ``None``.
    """
    starts = np.cumsum([0] + [m[2] for m in group.members])
    mesh = _distribute.current_mesh()
    sizes = {} if mesh is None else dict(zip(mesh.axis_names, mesh.axis_sizes))
    devices = math.prod(sizes.get(a, 0) for a in layout.axes) if layout.axes else 0

    def corner(x, cut):
        return x[(slice(None),) + tuple(slice(0, n) for n in cut)]

    if not devices or any(a not in sizes for a in layout.axes) or group.padded % devices:
        whole = _replicate(stack)
        return [
            None if cut is None else corner(whole[a : a + m[2]], cut)
            for m, a, cut in zip(group.members, starts, cuts)
        ]
    local = group.padded // devices
    axes = layout.axes if len(layout.axes) != 1 else layout.axes[0]

    def put(part):
        me = jax.lax.axis_index(axes)
        out = []
        for m, a, cut in zip(group.members, starts, cuts):
            if cut is None:
                continue
            rows = []
            for r in range(a, a + m[2]):
                held = part[r % local][tuple(slice(0, n) for n in cut)]
                rows.append(jnp.where(me == r // local, held, jnp.zeros_like(held)))
            out.append(jnp.stack(rows))
        return jax.lax.psum(tuple(out), axes)

    stack = _distribute.place(stack, layout.spec(), mesh)
    got = iter(
        jax.shard_map(put, mesh=mesh, in_specs=layout.spec(), out_specs=P(), check_vma=False)(stack)
    )
    return [None if cut is None else next(got) for cut in cuts]
