"""Axis bookkeeping: how each parameter's axes map onto Kronecker factors.

This is the only module that knows about axis permutations, merging and
blocking. Every optimizer asks it for a :class:`LeafPlan` per parameter and then
works on the plan's *block view*, a stacked array of shape
``(num_blocks, b_1, ..., b_k)``:

1. the leaf is transposed so that batch axes come first, then each factor group
   in order, then the identity axes;
2. each factor group is merged (reshaped) into one dimension ``d_i``;
3. every dimension longer than ``block_size`` is zero-padded to a multiple of
   ``block_size`` and split into blocks; blocks and batch slices are stacked on
   the leading axis.

Padding is exact, not an approximation: padded rows of a block are zero in every
gradient, so a block's factor is block-diagonal with a zero corner, every matrix
function we use keeps that structure, and the padded entries are dropped by
:meth:`LeafPlan.from_blocks`. Stacking the blocks lets each refresh run as one
batched matrix call per leaf and axis.

Each dimension of the view has a *kind*:

* ``'full'``: a dense ``b × b`` factor (``2 <= b <= max_precond_dim``);
* ``'diag'``: a diagonal factor, for dimensions longer than
  ``max_precond_dim`` (after blocking);
* ``'none'``: no factor (identity), for unit dimensions, identity axes, and leaves
  whose spec is ``None``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise_optax import _distribute

Kind = Literal["full", "diag", "none"]


class DimensionNumbers(NamedTuple):
    """How a parameter's axes map onto Kronecker factors.

    Attributes:
      factor_axes: Groups of axes; each group is merged (in the given order) into
        one factor dimension. ``((0,), (1,))`` for a dense kernel,
        ``((0, 1, 2), (3,))`` for a conv kernel viewed as a matrix,
        ``((0,), (1,), (2,))`` for full per-axis Shampoo on an order-3 tensor.
      batch_axes: Axes mapped over independently (stacked or scanned layers,
        attention heads): each slice gets its own factors.
      identity_axes: Axes that are contracted in the statistics but never
        preconditioned (one-sided preconditioning, e.g. only the input axis of a
        kernel).

    Examples:
      A stack of 4 layers ``(4, 64, 32)``, each with its own ``64 × 32`` factors,
      given to an optimizer's ``dimension_numbers``:

      >>> import jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> spec = lo.DimensionNumbers(factor_axes=((1,), (2,)), batch_axes=(0,))
      >>> spec
      DimensionNumbers(factor_axes=((1,), (2,)), batch_axes=(0,), identity_axes=())
      >>> tx = lo.shampoo(1e-3, dimension_numbers={'stack': spec})
      >>> state = tx.init({'stack': jnp.zeros((4, 64, 32))})
    """

    factor_axes: tuple[tuple[int, ...], ...]
    batch_axes: tuple[int, ...] = ()
    identity_axes: tuple[int, ...] = ()


DimNumsTree = Any  # a tree of DimensionNumbers | None, matching the params.
DimNumsOrFn = DimNumsTree | Callable[[Any], DimNumsTree]


def is_masked(x: Any) -> bool:
    """Whether ``x`` is an ``optax.MaskedNode`` (a leaf masked out by ``optax.masked``)."""
    return isinstance(x, optax.MaskedNode)


def strip_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A tree path without the trailing ``.value`` of a Flax ``Variable``.

    Leaves of an ``nnx.State`` holding ``nnx.Variable`` wrappers have paths like
    ``['l1']['kernel'].value``; the same leaf of ``nnx.as_pure(state)``,
    ``state.to_pure_dict()`` or a plain dict is ``['l1']['kernel']``. Every place
    that matches tree paths against each other (K-FAC statistics and layouts,
    layer roles) compares stripped paths, so the three kinds of tree agree.
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The canonical key of a tree path: one string per entry of :func:`strip_path`.

    Dict keys, attribute names and sequence indices alike become their plain
    string (``('layers', '0', 'kernel')``), so a path of an ``nnx.State``, of its
    pure form and of a nested dict of the same layers give equal keys.
    """
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in strip_path(path))


def path_string(path: tuple[Any, ...]) -> str:
    """The ``'/'``-joined :func:`path_keys` of a tree path, e.g. ``'layers/0/kernel'``."""
    return "/".join(path_keys(path))


def path_label(path: tuple[Any, ...]) -> str:
    """How error messages name a leaf: ``jax.tree_util.keystr`` of the stripped path."""
    return jax.tree_util.keystr(strip_path(path)) or "<root>"


def _as_tuple(axes: Any) -> tuple[int, ...]:
    if isinstance(axes, (int, np.integer)):
        return (int(axes),)
    return tuple(int(a) for a in axes)


def normalize(spec: Any, shape: tuple[int, ...], path: str = "") -> DimensionNumbers | None:
    """Canonicalizes a spec for a leaf of ``shape``; the single validator.

    Accepts a :class:`DimensionNumbers`, a bare tuple of factor groups (ints or
    tuples of ints), or ``None``. Negative axes are resolved. Every axis must
    appear exactly once across ``factor_axes``, ``batch_axes`` and
    ``identity_axes``.

    Args:
      spec: The spec to normalize.
      shape: The leaf's shape.
      path: The leaf's tree path, used in error messages.

    Returns:
      A canonical :class:`DimensionNumbers`, or ``None``.

    Raises:
      ValueError: If an axis is out of range, repeated, or not covered.
    """
    if spec is None:
        return None
    if not isinstance(spec, DimensionNumbers):
        if isinstance(spec, tuple):
            spec = DimensionNumbers(factor_axes=spec)
        else:
            raise ValueError(
                f"param {path} with shape {shape}: dimension_numbers must be a "
                f"DimensionNumbers, a tuple of axis groups or None, got {spec!r}."
            )
    ndim = len(shape)

    def canon(a: int) -> int:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"param {path} with shape {shape}: dimension_numbers {tuple(spec)} "
                f"name axis {a}, which does not exist."
            )
        return a % ndim

    # An empty group is a unit dimension (e.g. a bias's input side in K-FAC).
    groups = tuple(tuple(canon(a) for a in _as_tuple(g)) for g in spec.factor_axes)
    batch = tuple(canon(a) for a in _as_tuple(spec.batch_axes))
    ident = tuple(canon(a) for a in _as_tuple(spec.identity_axes))
    used = [a for g in groups for a in g] + list(batch) + list(ident)
    if len(used) != len(set(used)):
        raise ValueError(
            f"param {path} with shape {shape}: dimension_numbers {tuple(spec)} "
            "use an axis more than once."
        )
    missing = sorted(set(range(ndim)) - set(used))
    if missing:
        raise ValueError(
            f"param {path} with shape {shape}: dimension_numbers {tuple(spec)} "
            f"do not cover axis {missing[0] if len(missing) == 1 else missing}."
        )
    return DimensionNumbers(groups, batch, ident)


def default_dimension_numbers(
    shape: tuple[int, ...], *, max_precond_dim: int = 1024, merge_small_dims: bool = True
) -> DimensionNumbers | None:
    """The library's default policy for a leaf of ``shape``.

    * fewer than two axes longer than 1 (scalars, vectors, ``(1, n)``): ``None``,
      the optimizer's documented diagonal fallback;
    * otherwise one factor group per axis, and with ``merge_small_dims`` adjacent
      axes are merged left to right while the merged size stays within
      ``max_precond_dim``, always keeping at least two groups. A conv kernel
      ``(3, 3, 64, 128)`` becomes ``((0, 1, 2), (3,))``, a ``576 × 128`` matrix;
      unit axes are absorbed by a neighbour.

    Args:
      shape: The leaf's shape.
      max_precond_dim: Largest dimension a merged group may reach.
      merge_small_dims: Whether to merge adjacent small axes.

    Returns:
      A :class:`DimensionNumbers`, or ``None``.

    Examples:
      >>> import layerwise_optax as lo
      >>> lo.default_dimension_numbers((3, 3, 64, 128)).factor_axes
      ((0, 1, 2), (3,))
      >>> lo.default_dimension_numbers((128,)) is None
      True
    """
    shape = tuple(shape)
    nonunit = [a for a, s in enumerate(shape) if s > 1]
    if len(nonunit) < 2:
        return None
    if not merge_small_dims:
        return DimensionNumbers(tuple((a,) for a in range(len(shape))))
    groups: list[list[int]] = []
    size = 0
    for a, s in enumerate(shape):
        remaining_nonunit = [b for b in nonunit if b > a]
        if not groups:
            groups.append([a])
            size = s
            continue
        closes_last_group = s > 1 and not remaining_nonunit and len(groups) == 1 and size > 1
        if s == 1 or size == 1 or (size * s <= max_precond_dim and not closes_last_group):
            groups[-1].append(a)
            size *= s
        else:
            groups.append([a])
            size = s
    return DimensionNumbers(tuple(tuple(g) for g in groups))


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Static description of one leaf's block view (see the module docstring).

    Attributes:
      shape: The leaf's original shape.
      spec: The normalized spec (``None``: no factors, the whole leaf is one
        ``'none'`` dimension).
      perm: Transpose taking the leaf to (batch, group..., identity) order.
      batch: Product of the batch axes.
      dims: Merged size of each view dimension.
      kinds: ``'full'``, ``'diag'`` or ``'none'`` per view dimension.
      blocks: Block length per view dimension (equal to ``dims`` if unblocked).
      num_blocks: Number of blocks per view dimension.
      per_block: The leaf is a *group* of the owner layout
        (:mod:`layerwise_optax._owner`): a stack of blocks of several leaves,
        sharded along the stack over the mesh's devices. Each block is its own
        unit for the failure policy (:func:`layerwise_optax._failure.guard`),
        the work on it stays on the devices that own its blocks
        (:func:`map_leaves` does not gather it, :func:`map_grouped` computes it
        where it lies), and its stack is never concatenated with another.
      exponents: Per view dimension, the root order ``p`` an optimizer applies
        to that dimension's factor (``0`` where the kind is ``'none'``), set by
        :meth:`with_exponents`; empty (the default): the optimizer's own rule.
        Part of the plan's identity, so owner-layout groups
        (:mod:`layerwise_optax._owner`) never mix exponents.
    """

    shape: tuple[int, ...]
    spec: DimensionNumbers | None
    perm: tuple[int, ...]
    batch: int
    dims: tuple[int, ...]
    kinds: tuple[Kind, ...]
    blocks: tuple[int, ...]
    num_blocks: tuple[int, ...]
    per_block: bool = False
    exponents: tuple[int, ...] = ()

    @property
    def stack(self) -> int:
        """Leading size of the block view: batch slices times blocks."""
        return self.batch * math.prod(self.num_blocks)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of the block view, ``(stack, b_1, ..., b_k)``."""
        return (self.stack,) + self.blocks

    @property
    def num_factors(self) -> int:
        """Number of preconditioned (``'full'`` or ``'diag'``) dimensions."""
        return sum(k != "none" for k in self.kinds)

    @property
    def is_preconditioned(self) -> bool:
        """Whether any dimension has a factor."""
        return self.num_factors > 0

    def to_blocks(self, x: jax.Array) -> jax.Array:
        """Maps a leaf to its block view ``(stack, b_1, ..., b_k)``."""
        x = jnp.reshape(jnp.transpose(x, self.perm), (self.batch,) + self.dims)
        pads = [(0, 0)] + [
            (0, n * b - d) for d, b, n in zip(self.dims, self.blocks, self.num_blocks)
        ]
        if any(p[1] for p in pads):
            x = jnp.pad(x, pads)
        k = len(self.dims)
        split = (self.batch,) + tuple(
            s for n, b in zip(self.num_blocks, self.blocks) for s in (n, b)
        )
        x = jnp.reshape(x, split)
        order = (0,) + tuple(1 + 2 * i for i in range(k)) + tuple(2 + 2 * i for i in range(k))
        return jnp.reshape(jnp.transpose(x, order), self.block_shape)

    def from_blocks(self, y: jax.Array) -> jax.Array:
        """Exact inverse of :meth:`to_blocks` (padding is dropped)."""
        k = len(self.dims)
        y = jnp.reshape(y, (self.batch,) + self.num_blocks + self.blocks)
        order = (0,) + tuple(s for i in range(k) for s in (1 + i, 1 + k + i))
        y = jnp.transpose(y, order)
        y = jnp.reshape(
            y, (self.batch,) + tuple(n * b for n, b in zip(self.num_blocks, self.blocks))
        )
        y = y[(slice(None),) + tuple(slice(0, d) for d in self.dims)]
        permuted = tuple(self.shape[p] for p in self.perm)
        y = jnp.reshape(y, permuted)
        return jnp.transpose(y, np.argsort(self.perm))

    def block_sum_squares(self, x: jax.Array) -> jax.Array:
        """``sum(block**2)`` for every block of ``to_blocks(x)``, shape ``(stack, 1, ..., 1)``.

        Same result as reducing the block view, without materializing it: the
        squares are reduced in the leaf's own layout (a fused reduction), so only
        the small per-block result is transposed.
        """
        k = len(self.dims)
        y = jnp.reshape(jnp.transpose(jnp.square(x), self.perm), (self.batch,) + self.dims)
        pads = [(0, 0)] + [
            (0, n * b - d) for d, b, n in zip(self.dims, self.blocks, self.num_blocks)
        ]
        if any(p[1] for p in pads):
            y = jnp.pad(y, pads)
        split = (self.batch,) + tuple(
            s for n, b in zip(self.num_blocks, self.blocks) for s in (n, b)
        )
        y = jnp.sum(jnp.reshape(y, split), axis=tuple(2 + 2 * i for i in range(k)))
        return jnp.reshape(y, (self.stack,) + (1,) * k)

    def as_batch(self, n: int) -> LeafPlan:
        """The plan of ``n`` independent blocks of this plan's layout, as a leaf of its own.

        The leaf is a stack of blocks, shape ``(n, b_1, ..., b_k)``: the same kinds
        and block lengths, ``batch == stack == n``, one block per dimension, its
        ``to_blocks``/``from_blocks`` the identity. Work on the blocks of several
        leaves with the same layout, concatenated on the stack axis
        (:func:`map_grouped`), runs on it; leaves with equal layouts give equal
        plans (``plan.as_batch(1)`` is a group key).

        Args:
          n: The number of blocks in the stack.

        Returns:
          A :class:`LeafPlan` of shape ``(n,) + blocks``.
        """
        ident = tuple(
            1 + i
            for i, (kind, b) in enumerate(zip(self.kinds, self.blocks))
            if kind == "none" and b > 1
        )
        groups = tuple((1 + i,) for i in range(len(self.blocks)) if 1 + i not in ident)
        return LeafPlan(
            shape=(n,) + self.blocks,
            spec=DimensionNumbers(groups, (0,), ident),
            perm=tuple(range(1 + len(self.blocks))),
            batch=n,
            dims=self.blocks,
            kinds=self.kinds,
            blocks=self.blocks,
            num_blocks=(1,) * len(self.blocks),
            exponents=self.exponents,
        )

    def state_floats(self) -> int:
        """Floats held by one factor set (statistics or roots) of this leaf."""
        total = 0
        for kind, b in zip(self.kinds, self.blocks):
            if kind == "full":
                total += self.stack * b * b
            elif kind == "diag":
                total += self.stack * b
        return total

    def with_kinds(self, kinds: tuple[Kind, ...]) -> LeafPlan:
        """The same block view with other factor kinds per view dimension.

        For transforms whose factors differ from the default rule of
        :func:`make_plan` on the same layout (K-FAC keeps a ``1 x 1`` factor for a
        length-1 dimension, and drops the factor of a side it does not apply).
        The invariants of a plan hold for the result: one kind per view
        dimension, a ``'diag'`` dimension is never blocked, and the identity
        group of a spec (the last view dimension) stays ``'none'``.

        Args:
          kinds: ``'full'``, ``'diag'`` or ``'none'`` per view dimension.

        Returns:
          A :class:`LeafPlan` equal to this one except for ``kinds``.

        Raises:
          ValueError: If ``kinds`` breaks one of the invariants above.
        """
        kinds = tuple(kinds)
        if len(kinds) != len(self.kinds) or any(k not in ("full", "diag", "none") for k in kinds):
            raise ValueError(
                f"kinds must be one of 'full', 'diag', 'none' per view dimension "
                f"({len(self.kinds)} here), got {kinds}."
            )
        for i, k in enumerate(kinds):
            if k == "diag" and self.num_blocks[i] != 1:
                raise ValueError(f"view dimension {i} is blocked, so it cannot be 'diag'.")
        if self.spec is not None and self.spec.identity_axes and kinds[-1] != "none":
            raise ValueError("the identity group (last view dimension) must stay 'none'.")
        return dataclasses.replace(self, kinds=kinds)

    def with_exponents(self, exponents: Sequence[int | None]) -> LeafPlan:
        """The same block view with a root order (or no factor) per view dimension.

        A positive int ``p`` keeps the dimension's factor and records ``p`` in
        :attr:`exponents`; ``None`` drops the factor: the dimension becomes
        ``'none'`` (identity, an empty ``(stack, 0)`` placeholder in the state;
        the dimension is still contracted in the other factors' statistics and
        keeps its blocking). Entries of dimensions that are already ``'none'``
        are recorded as ``0`` whatever they say.

        Args:
          exponents: One entry per view dimension, each ``None`` or an int ``>= 1``.

        Returns:
          A :class:`LeafPlan` equal to this one except for ``kinds`` and ``exponents``.

        Raises:
          ValueError: If the length or an entry is not allowed.
        """
        exponents = tuple(exponents)
        ok = len(exponents) == len(self.kinds) and all(
            e is None or (isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e >= 1)
            for e in exponents
        )
        if not ok:
            raise ValueError(
                f"exponents must be None or an int >= 1 per view dimension "
                f"({len(self.kinds)} here), got {exponents}."
            )
        kinds: tuple[Kind, ...] = tuple(
            "none" if e is None else k for k, e in zip(self.kinds, exponents)
        )
        kept = tuple(0 if k == "none" or e is None else int(e) for k, e in zip(kinds, exponents))
        return dataclasses.replace(self.with_kinds(kinds), exponents=kept)


@functools.lru_cache(maxsize=4096)
def make_plan(
    shape: tuple[int, ...],
    spec: DimensionNumbers | None,
    *,
    max_precond_dim: int,
    block_size: int | None,
) -> LeafPlan:
    """Builds the :class:`LeafPlan` of a leaf from its normalized spec."""
    size = math.prod(shape)
    if spec is None:
        return LeafPlan(shape, None, tuple(range(len(shape))), 1, (size,), ("none",), (size,), (1,))
    batch = math.prod(shape[a] for a in spec.batch_axes)
    dims = [math.prod(shape[a] for a in g) for g in spec.factor_axes]
    kinds: list[Kind] = []
    blocks, nblocks = [], []
    for d in dims:
        b = d if block_size is None else min(d, block_size)
        if d == 1:
            kinds.append("none")
        elif b > max_precond_dim:
            kinds.append("diag")
            b = d  # diagonal factors are never blocked.
        else:
            kinds.append("full")
        blocks.append(b)
        nblocks.append(-(-d // b))
    ident = math.prod(shape[a] for a in spec.identity_axes)
    if spec.identity_axes:
        dims.append(ident)
        kinds.append("none")
        blocks.append(ident)
        nblocks.append(1)
    perm = spec.batch_axes + tuple(a for g in spec.factor_axes for a in g) + spec.identity_axes
    return LeafPlan(
        tuple(shape), spec, perm, batch, tuple(dims), tuple(kinds), tuple(blocks), tuple(nblocks)
    )


_DEFAULT = object()  # marks leaves that use default_dimension_numbers.


def resolve(
    dimension_numbers: DimNumsOrFn | None,
    tree: Any,
    *,
    max_precond_dim: int,
    block_size: int | None = None,
    merge_small_dims: bool = True,
) -> Any:
    """Returns a tree of :class:`LeafPlan` matching ``tree``.

    Args:
      dimension_numbers: ``None`` for :func:`default_dimension_numbers` on every
        leaf; a tree of specs (``DimensionNumbers``, a tuple of groups, or
        ``None`` for no factors) with the structure of ``tree``; or a callable
        ``tree -> spec tree``, called on the tree actually received (params at
        ``init``, updates at ``update``; inside ``optax.masked`` the masked
        leaves are ``optax.MaskedNode``).
      tree: Params or updates. ``optax.MaskedNode`` leaves pass through.
      max_precond_dim: Longest factor dimension; longer ones get diagonal factors.
      block_size: If set, factor dimensions longer than this are split into
        blocks of this length.
      merge_small_dims: Whether the default policy merges small adjacent axes.

    Returns:
      A tree with a :class:`LeafPlan` at each array position.

    Raises:
      ValueError: If the spec tree does not match ``tree`` or a spec does not fit
        its leaf's shape; the message names the leaf's tree path.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
    if dimension_numbers is None:
        specs = [_DEFAULT] * len(leaves_with_path)
    else:
        spec_tree = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
        try:
            specs = treedef.flatten_up_to(spec_tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "dimension_numbers must have the same tree structure as the params "
                f"(a DimensionNumbers or None at every leaf): {e}"
            ) from None
    plans = []
    for (path, leaf), spec in zip(leaves_with_path, specs):
        if is_masked(leaf):
            plans.append(leaf)
            continue
        shape = tuple(np.shape(leaf))
        if spec is _DEFAULT:
            spec = default_dimension_numbers(
                shape, max_precond_dim=max_precond_dim, merge_small_dims=merge_small_dims
            )
        else:
            spec = normalize(spec, shape, path_label(path))
        plans.append(make_plan(shape, spec, max_precond_dim=max_precond_dim, block_size=block_size))
    return jax.tree_util.tree_unflatten(treedef, plans)


def map_leaves(
    fn: Callable[..., Any], plans: Any, tree: Any, *rest: Any, local: bool = False
) -> Any:
    """Maps ``fn(x, plan, *r)`` over the leaves that ``plans`` describes.

    ``plans`` (from :func:`resolve`) fixes the leaf positions, so ``tree`` and
    ``rest`` may hold any subtree there (an array, or a per-leaf tuple of factors).
    ``optax.MaskedNode`` positions are passed through. Where ``plans`` has a
    wrapper node around a leaf (e.g. a ``flax.nnx.Variable`` of the params), the
    inputs may hold the wrapped or the bare subtree (state trees stored by
    :func:`bare`); the output is wrapped like ``plans``. Each leaf runs
    :func:`on_gathered` unless ``local``: for an elementwise ``fn`` (and global
    reductions to scalars), which runs on the shards where they lie.
    """

    def apply(p, x, *r):
        if is_masked(p):
            return p
        if isinstance(p, LeafPlan):
            return fn(x, p, *r) if p.per_block or local else on_gathered(fn, x, p, *r)
        inner, rewrap = _unwrap(p)
        args = [_unwrap(a)[0] if type(a) is type(p) else a for a in (x, *r)]
        return rewrap(apply(inner, *args))

    nodes, treedef = jax.tree.flatten(plans, is_leaf=_is_plan_node)
    columns = [treedef.flatten_up_to(t) for t in (tree, *rest)]
    return jax.tree.unflatten(treedef, [apply(p, *xs) for p, *xs in zip(nodes, *columns)])


def map_grouped(
    prepare: Callable[..., Sequence[tuple[Any, tuple[jax.Array, ...]] | None]],
    batched: Callable[[Any], Callable[..., Any]],
    plans: Any,
    *trees: Any,
    distribute: bool = True,
) -> Any:
    """Batched work over same-keyed stacks of blocks of *all* leaves at once.

    The refresh of a Kronecker preconditioner is a set of independent problems
    on stacks of equal-sized blocks (the factors of every leaf with the same block
    length, PSGD's fits of leaves with the same layout, Muon's same-shaped
    matrices). This is the one loop that forms those batches: per leaf,
    ``prepare(plan, *leaf_inputs)`` lists its work items, each ``None`` (no work)
    or ``(key, arrays)`` with arrays sharing a leading stack axis; items with
    equal ``key`` (equal trailing shapes and dtypes) are concatenated and
    computed by one call of ``batched(key)``, spread over the devices of the
    current mesh when ``distribute`` (:func:`layerwise_optax._distribute.grouped`),
    then split back.

    Args:
      prepare: ``prepare(plan, *xs) -> [None | (key, arrays), ...]`` for each
        :class:`LeafPlan` (``xs``: the leaves of ``trees`` at its position).
      batched: ``batched(key)`` is a function of the concatenated arrays,
        treating stack entries independently, returning a pytree with the stack
        axis.
      plans: The plans (from :func:`resolve`).
      *trees: Inputs with the plans' structure (arrays or per-leaf containers).
      distribute: Spread each batch over the mesh's devices.

    Returns:
      A tree like ``plans``: per plan leaf a tuple aligned with its ``prepare``
      list (``None`` where the item was ``None``, else that item's slice of the
      result); other positions (masked) keep the plan's node.
    """
    plan_leaves, treedef = jax.tree.flatten(plans, is_leaf=is_plan_leaf)
    columns = [treedef.flatten_up_to(t) for t in trees]
    listed: list[Any] = []
    items, where = [], []
    for i, plan in enumerate(plan_leaves):
        if not isinstance(plan, LeafPlan):
            listed.append(plan)
            continue
        work = list(prepare(plan, *(c[i] for c in columns)))
        listed.append([None] * len(work))
        for j, item in enumerate(work):
            if item is not None:
                # A group of the owner layout is a batch of its own, computed where
                # its blocks lie (its key is never equal to another item's).
                key, arrays = item
                items.append(((_distribute.Owned(i, j), key), arrays) if plan.per_block else item)
                where.append((i, j))

    def batched_of(key):
        return (
            batched(key[1])
            if isinstance(key, tuple) and key and isinstance(key[0], _distribute.Owned)
            else batched(key)
        )

    for (i, j), result in zip(where, _distribute.grouped(items, batched_of, enabled=distribute)):
        listed[i][j] = result
    leaves = [tuple(x) if isinstance(p, LeafPlan) else x for p, x in zip(plan_leaves, listed)]
    return jax.tree.unflatten(treedef, leaves)


def keep_masked(plans: Any, new: Any, old: Any) -> Any:
    """``new`` with ``old``'s entries at the positions where ``plans`` is masked.

    :func:`map_leaves` puts the mask node itself there; states that store
    something else at masked positions (e.g. empty factor tuples) keep it.
    """
    plan_leaves, treedef = jax.tree.flatten(plans, is_leaf=is_plan_leaf)
    pairs = zip(plan_leaves, treedef.flatten_up_to(new), treedef.flatten_up_to(old))
    return jax.tree.unflatten(treedef, [o if is_masked(p) else n for p, n, o in pairs])


def _is_wrapper(x: Any) -> bool:
    """Whether ``x`` is a one-child pytree node that is not a container.

    Such nodes wrap a single value and carry metadata (``flax.nnx.Variable``);
    tuples, lists, dicts and other mappings are containers even with one entry.
    """
    if x is None or isinstance(x, (tuple, list, dict, Mapping, LeafPlan, optax.MaskedNode)):
        return False
    children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
    return not jax.tree_util.treedef_is_leaf(treedef) and len(children) == 1


def _is_plan_node(x: Any) -> bool:
    """A plan leaf, or a wrapper node around one (``is_leaf`` of :func:`map_leaves`)."""
    if is_plan_leaf(x):
        return True
    return _is_wrapper(x) and _is_plan_node(_unwrap(x)[0])


def _unwrap(x: Any) -> tuple[Any, Callable[[Any], Any]]:
    """A wrapper's child, and the function that wraps a new child the same way."""
    children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
    return children[0], lambda child: jax.tree_util.tree_unflatten(treedef, [child])


def bare(plans: Any, tree: Any) -> Any:
    """``tree`` with the wrappers that ``plans`` has around its leaves removed.

    Optimizer states store their per-leaf containers (tuples of factors) this way.
    ``flax.nnx.Optimizer`` keeps its state as ``nnx.Variable`` objects, and a
    container held *inside* a ``Variable`` (as ``init`` would make it from
    ``Param``-wrapped params) is rewritten as an ``nnx.State`` after the first
    update, which changes the state's structure and compiles the train step a
    second time. Stored bare, each factor becomes its own ``Variable`` and the
    structure round-trips unchanged. :func:`map_leaves` reads both forms.
    """

    def strip(p, x):
        while _is_wrapper(p) and type(x) is type(p):
            p, x = _unwrap(p)[0], _unwrap(x)[0]
        return x

    nodes, treedef = jax.tree.flatten(plans, is_leaf=_is_plan_node)
    return jax.tree.unflatten(
        treedef, [strip(p, x) for p, x in zip(nodes, treedef.flatten_up_to(tree))]
    )


def _explicit_spec(x: Any) -> Any:
    """``x``'s partition spec when it is sharded over an ``Explicit`` mesh axis, else None."""
    if not isinstance(x, jax.Array):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not any(e is not None for e in getattr(sharding, "spec", ())):
        return None
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types)
        if kind == jax.sharding.AxisType.Explicit
    }
    used = {
        a for e in sharding.spec if e is not None for a in (e if isinstance(e, tuple) else (e,))
    }
    return sharding.spec if used & explicit else None


def select(pred: jax.Array, on_true: Any, on_false: Any) -> jax.Array:
    """``jnp.where(pred, on_true, on_false)`` for operands that may be laid out differently.

    Under ``Explicit`` mesh axes arithmetic between a replicated and a sharded
    array is allowed, but ``select`` demands identical shardings of its cases
    (``ShardingTypeError: select cases must have the same shardings``). This is the
    library's one guard for it, used wherever a freshly computed value (in the
    gradient's layout) is selected against a stored one (in whatever layout the
    state was created or restored with) outside :func:`on_gathered`: the case
    that is not explicitly sharded is resharded to the sharded one's layout
    (``on_true``'s when both are), a local slice with no communication when it
    was replicated. Without explicit shardings this is ``jnp.where``.
    """
    arrays = [a for a in (on_true, on_false) if isinstance(a, jax.Array) and a.ndim]
    target = next((_explicit_spec(a) for a in arrays if _explicit_spec(a) is not None), None)
    if target is None:
        return jnp.where(pred, on_true, on_false)

    def to(a):
        if not isinstance(a, jax.Array) or not a.ndim:
            return a
        spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
        return a if spec == target else jax.sharding.reshard(a, target)

    return jnp.where(to(pred), to(on_true), to(on_false))


def on_gathered(fn: Callable[..., Any], x: Any, plan: Any, *rest: Any) -> Any:
    """``fn(x, plan, *rest)``, on replicated copies where inputs are explicitly sharded.

    With ``Explicit`` mesh axes (the default of ``jax.make_mesh`` in new JAX), the
    block-view reshapes and the factor contractions of a sharded leaf need an
    output sharding for every op. The per-axis statistics contract every other
    axis anyway, so the leaf is gathered once, computed replicated, and the
    params-shaped outputs (updates, moments) are resharded like the input. Under
    ``Auto`` axes (and without a mesh) nothing changes: XLA's partitioner places
    the work itself.
    """
    specs = {}
    for a in jax.tree.leaves((x, rest)):
        spec = _explicit_spec(a)
        if spec is not None:
            specs.setdefault(a.shape, spec)
    if not specs:
        return fn(x, plan, *rest)
    replicate = jax.sharding.PartitionSpec()

    def gather(a):
        return jax.sharding.reshard(a, replicate) if _explicit_spec(a) is not None else a

    out = fn(*jax.tree.map(gather, (x, plan, *rest)))
    return jax.tree.map(
        lambda o: (
            jax.sharding.reshard(o, specs[o.shape])
            if isinstance(o, jax.Array) and o.shape in specs
            else o
        ),
        out,
    )


def is_plan_leaf(x: Any) -> bool:
    """``is_leaf`` for plan trees: a :class:`LeafPlan` or an ``optax.MaskedNode``."""
    return isinstance(x, LeafPlan) or is_masked(x)


def unzip(tree: Any, field: str) -> Any:
    """Extracts one field of the per-leaf NamedTuples returned by :func:`map_leaves`."""

    # Test the type, not the instance: wrappers such as ``flax.nnx.Variable`` forward
    # attribute access to their value, so ``hasattr`` would see through them and the
    # wrapper would be dropped from the output tree.
    def is_out(o):
        return is_masked(o) or (isinstance(o, tuple) and field in getattr(type(o), "_fields", ()))

    return jax.tree.map(lambda o: o if is_masked(o) else getattr(o, field), tree, is_leaf=is_out)
