"""Layer roles: one labeler, shared by every optimizer that treats leaves differently.

Muon, NorMuon and the per-layer-norm steepest descent orthogonalize hidden
matrices but must not orthogonalize biases, embeddings or the output head; they
all read the role of each leaf from :func:`layer_roles`, and the matrix that a
leaf with a role stands for from :func:`matrix_dimension_numbers`, so both
choices are made in one place. A user can print them (:func:`format_roles`) and
change them (the ``overrides`` patterns, or a whole tree of roles passed as
``roles=``).

The roles:

=============  ===============================================================
``matrix``     a hidden weight: a Flax kernel ``(*inputs, *outputs)`` of any ndim,
               viewed as one ``fan_in × fan_out`` matrix
``conv``       a convolution kernel ``(*window, in, out)``
``stacked``    layers stacked on leading axes ``(*layers, fan_in, fan_out)``
``embedding``  an embedding table ``(vocab, features)``
``head``       the output layer's weight ``(features, classes)``
``vector``     biases, norm scales (any shape whose name says so), 1-D leaves and
               leaves with fewer than two axes longer than 1
``scalar``     0-D leaves
=============  ===============================================================

The rules, applied to the lower-cased names along the tree path and the shape,
first match wins:

1. 0-D: ``scalar``; 1-D, fewer than two axes longer than 1 (with 3 or more axes),
   a last name ``bias``/``scale``/``gamma``/``beta``, or a name containing
   ``norm``: ``vector``.
2. a name containing ``embed``, or ``wte``/``wpe``: ``embedding``.
3. a name in ``head, lm_head, logits, classifier, readout, unembed, output`` or
   ending in ``_head``: ``head``.
4. 3 or more axes: a name containing ``conv``: ``conv``; exactly two axes longer
   than 1 (unit axes are absorbed), or a Flax attention projection (a layer named
   ``query``/``key``/``value``, or ``out`` beside a ``query``): ``matrix``;
   otherwise ``stacked``.
5. 2-D: ``matrix``.
6. The head, when no name says which leaf it is, is found from the shapes: each
   ``matrix``/``conv``/``stacked``/``embedding`` leaf maps ``fan_in`` features to
   ``fan_out`` features, and a layer *feeds* another when its ``fan_out`` is the
   other's ``fan_in``. The output layer is the ``matrix`` leaf that feeds no
   layer (its output is the model's): the one that is fed by another layer, or,
   when none is, the only one (a classifier after a flatten). Several such
   leaves, or none while layers do feed each other (equal widths, ``d → d → d``),
   make the head ambiguous: :func:`layer_roles` raises a ``ValueError`` naming
   the candidates and how to choose. A tree where no layer feeds another (one
   matrix, or unrelated ones) has no head, and so has a masked tree (one
   partition of a model, as inside ``optax.partition``: the :func:`muon` alias
   searches the whole tree when it routes the leaves).

:func:`format_roles` prints each leaf's role and matrix and how the head was
chosen. Set the head yourself with ``overrides={'layers/2/kernel': 'head'}``,
or keep every matrix hidden with ``infer_head=False``.

How a kernel becomes a matrix (:func:`matrix_dimension_numbers`), the same for
Muon, NorMuon and steepest descent: a Flax kernel is ``(*inputs, *outputs)``; its
output axes are its last axis longer than 1 with any unit axes after it, its
input axes all the axes before (``(8, 1, 6)`` is an ``8 × 6`` matrix,
``(8, 6, 1)`` too); 2-D kernels are ``(fan_in, fan_out)`` as they are; an
attention query/key/value kernel ``(features, heads, head_dim)`` is
``features × (heads · head_dim)`` and its output kernel ``(heads, head_dim,
features)`` is ``(heads · head_dim) × features``; a conv kernel is ``(window ·
in) × out``; a stacked leaf is one ``fan_in × fan_out`` matrix per leading index.
Other layouts (a ``LinearGeneral`` with several input and output axes) need
``dimension_numbers`` given to Muon.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from layerwise_optax import _axes

ROLES = ("matrix", "conv", "stacked", "embedding", "head", "vector", "scalar")
# Roles whose leaves are genuine linear maps between hidden features: what Muon
# orthogonalizes by default.
HIDDEN_ROLES = ("matrix", "conv", "stacked")

_VECTOR_LAST = ("bias", "scale", "gamma", "beta")
_HEAD_NAMES = ("head", "lm_head", "logits", "classifier", "readout", "unembed", "output")

RolesOrFn = Any  # a tree of role strings mirroring params, or params -> such a tree


def _names(path: tuple[Any, ...]) -> list[str]:
    return [k.lower() for k in _axes.path_keys(path)]


def path_string(path: tuple[Any, ...]) -> str:
    """The ``'/'``-joined form of a tree path that role overrides match against.

    ``('layers', 0, 'kernel')`` (dict keys, list indices, attributes alike) is
    ``'layers/0/kernel'``; a Flax ``Variable``'s trailing ``.value`` is dropped
    (:func:`layerwise_optax._axes.path_string`, shared by every path matcher).
    """
    return _axes.path_string(path)


_ATTENTION_IN = ("query", "key", "value")


def _layer_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The lower-cased names of the layer holding a leaf (the path minus the leaf's own name)."""
    return tuple(_names(path)[:-1])


def _is_attention(names: tuple[str, ...], layers: frozenset[tuple[str, ...]]) -> bool:
    """A Flax attention projection: ``query``/``key``/``value``, or ``out`` beside a ``query``."""
    if not names:
        return False
    if names[-1] in _ATTENTION_IN:
        return True
    return names[-1] == "out" and names[:-1] + ("query",) in layers


def _role_of(
    path: tuple[Any, ...], shape: tuple[int, ...], layers: frozenset[tuple[str, ...]] = frozenset()
) -> str:
    names = _names(path)
    last = names[-1] if names else ""
    nonunit = sum(s > 1 for s in shape)
    if len(shape) == 0:
        return "scalar"
    if len(shape) == 1 or (len(shape) >= 3 and nonunit < 2):
        return "vector"
    if last in _VECTOR_LAST or any("norm" in n for n in names):
        return "vector"
    if any("embed" in n or n in ("wte", "wpe") for n in names):
        return "embedding"
    if any(n in _HEAD_NAMES or n.endswith("_head") for n in names):
        return "head"
    if len(shape) >= 3:
        if any("conv" in n for n in names):
            return "conv"
        if nonunit == 2 or (nonunit == 3 and _is_attention(_layer_names(path), layers)):
            return "matrix"
        return "stacked"
    return "matrix"


def _check_role(role: Any, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {ROLES}.")


def matrix_dimension_numbers(
    role: str | None, shape: tuple[int, ...], path: tuple[Any, ...] = ()
) -> _axes.DimensionNumbers | None:
    """The ``(fan-in, fan-out)`` matrix view of a leaf with this role, or ``None``.

    The one place that decides how a kernel becomes a matrix (see the module
    docstring): Muon, NorMuon and steepest descent all use it.

    * ``matrix``/``head``/``embedding``: a 2-D leaf is ``(fan_in, fan_out)``; with
      more axes, the Flax kernel layout ``(*inputs, *outputs)``: the outputs are the
      last axis longer than 1 and the unit axes after it, the inputs every axis
      before (an attention ``query``/``key``/``value`` kernel ``(features, heads,
      head_dim)``, named by ``path``: the first axis against the rest).
    * ``conv``: window and input axes together against the output axis.
    * ``stacked``: the last two axes, each leading index a separate matrix.
    * ``vector``/``scalar`` (or fewer than 2 axes): ``None``.

    Args:
      role: The leaf's role (one of :data:`ROLES`) or ``None``.
      shape: The leaf's shape.
      path: The leaf's tree path (attention kernels are recognized by name).

    Returns:
      A :class:`layerwise_optax.DimensionNumbers` with two factor groups (and batch
      axes for ``stacked``), or ``None``.

    Examples:
      >>> import layerwise_optax as lo
      >>> lo.matrix_dimension_numbers('conv', (3, 3, 8, 16))
      DimensionNumbers(factor_axes=((0, 1, 2), (3,)), batch_axes=(), identity_axes=())
      >>> lo.matrix_dimension_numbers('stacked', (4, 8, 16))
      DimensionNumbers(factor_axes=((1,), (2,)), batch_axes=(0,), identity_axes=())
      >>> lo.matrix_dimension_numbers('vector', (16,)) is None
      True
    """
    n = len(shape)
    if role in (None, "vector", "scalar") or n < 2:
        return None
    if role == "conv":
        return _axes.DimensionNumbers((tuple(range(n - 1)), (n - 1,)))
    if role == "stacked":
        return _axes.DimensionNumbers(((n - 2,), (n - 1,)), batch_axes=tuple(range(n - 2)))
    if n == 2:
        return _axes.DimensionNumbers(((0,), (1,)))
    names = _layer_names(path)
    if names and names[-1] in _ATTENTION_IN:
        split = 1
    else:
        nonunit = [a for a, s in enumerate(shape) if s > 1]
        split = max(1, nonunit[-1] if nonunit else n - 1)
    return _axes.DimensionNumbers((tuple(range(split)), tuple(range(split, n))))


def _fans(role: str, shape: tuple[int, ...], path: tuple[Any, ...]) -> tuple[int, int] | None:
    """``(fan_in, fan_out)`` feature sizes of a layer for the head search, or ``None``."""
    if role in ("conv", "stacked"):
        return shape[-2], shape[-1]
    spec = matrix_dimension_numbers(role, shape, path)
    if spec is None:
        return None
    fan_in, fan_out = (math.prod(shape[a] for a in g) for g in spec.factor_axes)
    return fan_in, fan_out


class _Labels(NamedTuple):
    roles: list[str | None]  # per flattened leaf
    note: str  # how the head was chosen


def _label(params: Any, overrides: Mapping[str, str] | None, infer_head: bool) -> _Labels:
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        _check_role(role, f"layer_roles override {pattern!r}")
    if not isinstance(infer_head, bool):
        raise TypeError(f"infer_head must be a bool, got {infer_head!r}.")
    items = jax.tree_util.tree_leaves_with_path(params, is_leaf=_axes.is_masked)
    layers = frozenset(_layer_names(k) for k, x in items if not _axes.is_masked(x))
    roles: list[str | None] = []
    overridden: list[bool] = []
    used = set()
    for path, x in items:
        p = path_string(path)
        # A masked leaf (another partition's, inside optax.partition/masked) has no
        # role, but a pattern naming it is not a typo.
        role = None if _axes.is_masked(x) else _role_of(path, tuple(x.shape), layers)
        hit = False
        for pattern, r in overrides.items():
            if fnmatch.fnmatchcase(p, pattern):
                role, hit = (None if _axes.is_masked(x) else r), True
                used.add(pattern)
        roles.append(role)
        overridden.append(hit)
    unused = [p for p in overrides if p not in used]
    if unused:
        paths = [path_string(k) for k, _ in items]
        raise ValueError(
            f"layer_roles overrides {unused} match no parameter path; paths are like "
            f"{paths[:8]}{' ...' if len(paths) > 8 else ''}."
        )
    heads = [path_string(k) for (k, _), r in zip(items, roles) if r == "head"]
    if heads:
        how = (
            "set by overrides"
            if any(o and r == "head" for o, r in zip(overridden, roles))
            else "named as a head"
        )
        return _Labels(roles, f"head: {', '.join(heads)} ({how})")
    if not infer_head:
        return _Labels(roles, "head: none (infer_head=False: every matrix is hidden)")
    if any(_axes.is_masked(x) for _, x in items):
        # One partition of a model (the muon alias's matrices, an optax.masked
        # subset): the search needs the whole model. The muon alias searches the
        # whole tree when it routes leaves, and sends the head to AdamW.
        return _Labels(roles, "head: none (a masked tree: the search needs the whole model)")
    return _infer_head(items, roles, overridden)


def _infer_head(items, roles, overridden) -> _Labels:
    """Rule 6 of the module docstring: the matrix whose output feeds no layer."""
    fans = {}
    for i, ((path, x), r) in enumerate(zip(items, roles)):
        if r in ("matrix", "conv", "stacked", "embedding"):
            f = _fans(r, tuple(x.shape), path)
            if f is not None:
                fans[i] = f
    consumers = {i: f[0] for i, f in fans.items() if roles[i] != "embedding"}

    def feeds(i):
        return [j for j, fan_in in consumers.items() if j != i and fan_in == fans[i][1]]

    fed = {j for i in fans for j in feeds(i)}
    if not any(roles[i] == "matrix" for i in fans):
        return _Labels(roles, "head: none (no leaf has the role matrix)")
    if not fed:
        return _Labels(roles, "head: none (no layer's output size is another layer's input size)")
    # Matrices whose output feeds no layer; the ones fed by another layer first (the
    # end of a chain), else any (a head after a flatten is fed by none). A matrix
    # whose role an override set is decided: an output layer overridden to
    # 'matrix' means no head.
    ends = [i for i in sorted(fans) if (roles[i] == "matrix" or overridden[i]) and not feeds(i)]
    pool = [i for i in ends if i in fed] or ends
    sinks = [i for i in pool if not overridden[i]]
    if pool and not sinks:
        return _Labels(
            roles,
            "head: none (the output layer "
            + ", ".join(path_string(items[i][0]) for i in pool)
            + " has its role set by overrides)",
        )
    if len(sinks) == 1:
        (i,) = sinks
        roles = list(roles)
        roles[i] = "head"
        return _Labels(
            roles,
            f"head: {path_string(items[i][0])} (inferred: its {fans[i][1]} outputs feed no "
            "other layer)",
        )

    def describe(i):
        return f"{path_string(items[i][0])} {fans[i][0]}->{fans[i][1]}"

    if sinks:
        why = "several layers feed no other layer: " + ", ".join(describe(i) for i in sinks)
    else:
        why = "every layer's output feeds another layer (equal widths): " + ", ".join(
            describe(i) for i in sorted(fans) if roles[i] == "matrix"
        )
    raise ValueError(
        f"layer_roles cannot tell which layer is the output head: {why}. Say which, e.g. "
        "roles=lambda p: lo.layer_roles(p, overrides={'<path>': 'head'}), or keep every "
        "matrix hidden with roles=lambda p: lo.layer_roles(p, infer_head=False); "
        "print(lo.format_roles(params, roles)) shows the result."
    )


def layer_roles(
    params: Any, overrides: Mapping[str, str] | None = None, *, infer_head: bool = True
) -> Any:
    """The role of every leaf of ``params`` (a tree of strings, ``None`` at masked leaves).

    Roles: ``matrix`` (a hidden kernel of any ndim), ``conv``, ``stacked``,
    ``embedding``, ``head``, ``vector``, ``scalar``. Names decide first (``bias``,
    ``scale``, ``…norm…``: vector; ``…embed…``: embedding; ``head``, ``lm_head``,
    ``…_head``, ``logits``, ``classifier``, ``readout``, ``unembed``, ``output``:
    head; ``…conv…`` with 3+ axes: conv), then shapes (0-D scalar; 1-D, or 3+ axes
    with fewer than two longer than 1: vector; 3+ axes with two longer than 1, or
    a Flax attention projection: matrix; other 3+ axes: stacked; 2-D: matrix).
    When no leaf is a head by name or override, the head is the ``matrix`` whose
    output size is no layer's input size (preferring one fed by another layer);
    if the shapes leave several or none, this raises. :func:`format_roles` prints
    the result with each leaf's matrix and how the head was chosen.

    Args:
      params: A params tree (arrays, ``jax.ShapeDtypeStruct`` leaves, an ``nnx.State``, ...).
      overrides: ``{pattern: role}``; each pattern is an ``fnmatch`` pattern over the
        ``'/'``-joined path (``'layers/2/kernel'``, ``'*/out/kernel'``); later
        patterns win over earlier ones, and all over the rules. Giving some leaf
        the role ``'head'`` names the head (no search).
      infer_head: When no leaf is a head by name or override, find the output
        layer from the shapes (rule 6). ``False``: no search, every such leaf
        stays a hidden ``matrix``.

    Returns:
      A tree like ``params`` holding a role string per leaf.

    Raises:
      ValueError: For a role that is not in :data:`ROLES`, a pattern that matches
        no leaf (naming it and some paths that exist), or a head that the shapes
        leave ambiguous (naming the candidates and how to set it).

    Examples:
      >>> import jax.numpy as jnp, layerwise_optax as lo
      >>> params = {'l1': {'kernel': jnp.zeros((8, 16)), 'bias': jnp.zeros(16)},
      ...           'l2': {'kernel': jnp.zeros((16, 4)), 'bias': jnp.zeros(4)}}
      >>> lo.layer_roles(params)['l2']['kernel']
      'head'
    """
    labels = _label(params, overrides, infer_head)
    treedef = jax.tree_util.tree_structure(params, is_leaf=_axes.is_masked)
    return treedef.unflatten(labels.roles)


def resolve_roles(roles: RolesOrFn | None, params: Any) -> Any:
    """Roles for ``params``: the default labeler, a callable, or a given tree (checked)."""
    if roles is None:
        return layer_roles(params)
    tree = roles(params) if callable(roles) else roles
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_axes.is_masked)
    try:
        flat = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"roles tree does not match the params tree: {e}") from None
    paths = [k for k, _ in jax.tree_util.tree_leaves_with_path(params, is_leaf=_axes.is_masked)]
    for path, x, r in zip(paths, leaves, flat):
        if not _axes.is_masked(x):
            _check_role(r, f"param {path_string(path)}")
    return treedef.unflatten(flat)


def _matrix_text(role: str | None, shape: tuple[int, ...], path: tuple[Any, ...]) -> str:
    spec = matrix_dimension_numbers(role, shape, path)
    if spec is None:
        return "-"
    rows, cols = (math.prod(shape[a] for a in g) for g in spec.factor_axes)
    batch = math.prod(shape[a] for a in spec.batch_axes)
    return f"{batch} x {rows}x{cols}" if spec.batch_axes else f"{rows}x{cols}"


def format_roles(params: Any, roles: RolesOrFn | None = None) -> str:
    """A table ``path  shape  role  matrix``, one line per leaf, and how the head was chosen.

    The ``matrix`` column is the matrix that Muon, NorMuon and steepest descent
    orthogonalize for the leaf (:func:`matrix_dimension_numbers`): ``8x6``, or
    ``3 x 4x4`` for three stacked ``4 × 4`` layers; ``-`` for leaves that are not
    matrices. The last line says which leaf is the head and why (default roles),
    or that the roles were given.

    Args:
      params: A params tree.
      roles: Role tree or callable; default :func:`layer_roles`.

    Returns:
      The table as one string (print it).

    Raises:
      ValueError: As :func:`layer_roles` (an ambiguous head, a bad role or tree).

    Examples:
      >>> import jax.numpy as jnp, layerwise_optax as lo
      >>> print(lo.format_roles({'w': jnp.zeros((8, 1, 6)), 'b': jnp.zeros(6)}))
      path  shape      role    matrix
      b     (6,)       vector  -
      w     (8, 1, 6)  matrix  8x6
      head: none (no layer's output size is another layer's input size)
    """
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_axes.is_masked)
    treedef = jax.tree_util.tree_structure(params, is_leaf=_axes.is_masked)
    if roles is None:
        labels = _label(params, None, True)
        flat, note = labels.roles, labels.note
    else:
        flat = treedef.flatten_up_to(resolve_roles(roles, params))
        heads = [path_string(k) for (k, _), r in zip(leaves, flat) if r == "head"]
        note = f"head: {', '.join(heads) or 'none'} (roles given)"
    rows = [
        (
            path_string(k),
            "masked" if _axes.is_masked(x) else str(tuple(x.shape)),
            str(r),
            "-" if _axes.is_masked(x) else _matrix_text(r, tuple(x.shape), k),
        )
        for (k, x), r in zip(leaves, flat)
    ]
    header = ("path", "shape", "role", "matrix")
    widths = [max([len(r[i]) for r in rows] + [len(header[i])]) for i in range(3)]
    lines = [
        "  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths)) + "  " + row[3]
        for row in [header, *rows]
    ]
    return "\n".join(lines + [note])


def dimension_numbers_for(roles: RolesOrFn | None, treat: tuple[str, ...]) -> Callable[[Any], Any]:
    """A ``dimension_numbers`` callable: matrix views for leaves whose role is in ``treat``."""
    for r in treat:
        _check_role(r, "treated roles")

    def fn(tree):
        tree_roles = resolve_roles(roles, tree)
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_axes.is_masked)
        paths = [k for k, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_axes.is_masked)]
        flat = treedef.flatten_up_to(tree_roles)
        return treedef.unflatten(
            [
                None
                if _axes.is_masked(x) or r not in treat
                else matrix_dimension_numbers(r, tuple(x.shape), path)
                for path, x, r in zip(paths, leaves, flat)
            ]
        )

    return fn
