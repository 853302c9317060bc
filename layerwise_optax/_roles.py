"""Layer roles: one labeler, shared by every optimizer that treats leaves differently.

Muon, NorMuon and the per-layer-norm steepest descent orthogonalize hidden
matrices but must not orthogonalize biases, embeddings or the output head; they
all read the role of each leaf from :func:`layer_roles`, so the choice is made in
one place and a user can print it (:func:`format_roles`) and change it (the
``overrides`` patterns, or a whole tree of roles passed as ``roles=``).

The roles:

=============  ===============================================================
``matrix``     a hidden 2-D weight, ``(fan_in, fan_out)`` (Flax layout)
``conv``       a convolution kernel ``(*window, in, out)``
``stacked``    layers stacked on leading axes ``(*layers, fan_in, fan_out)``
``embedding``  an embedding table ``(vocab, features)``
``head``       the output layer's weight ``(features, classes)``
``vector``     biases, norm scales (any shape whose name says so) and 1-D leaves
``scalar``     0-D leaves
=============  ===============================================================

The rules, applied to the lower-cased names along the tree path and the shape,
first match wins:

1. 0-D: ``scalar``; 1-D, or a last name ``bias``/``scale``/``gamma``/``beta``,
   or a name containing ``norm``: ``vector``.
2. a name containing ``embed``, or ``wte``/``wpe``: ``embedding``.
3. a name in ``head, lm_head, logits, classifier, readout, unembed, output`` or
   ending in ``_head``: ``head``.
4. 3-D or more with a name containing ``conv``: ``conv``; otherwise ``stacked``.
5. 2-D: ``matrix``.

Names are a heuristic: an output layer called ``layers/2`` is a ``matrix`` to
these rules. Override it with ``overrides={'layers/2/kernel': 'head'}``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

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


def _role_of(path: tuple[Any, ...], shape: tuple[int, ...]) -> str:
    names = _names(path)
    last = names[-1] if names else ""
    if len(shape) == 0:
        return "scalar"
    if len(shape) == 1 or last in _VECTOR_LAST or any("norm" in n for n in names):
        return "vector"
    if any("embed" in n or n in ("wte", "wpe") for n in names):
        return "embedding"
    if any(n in _HEAD_NAMES or n.endswith("_head") for n in names):
        return "head"
    if len(shape) >= 3:
        return "conv" if any("conv" in n for n in names) else "stacked"
    return "matrix"


def _check_role(role: Any, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {ROLES}.")


def layer_roles(params: Any, overrides: Mapping[str, str] | None = None) -> Any:
    """The role of every leaf of ``params`` (a tree of strings, ``None`` at masked leaves).

    Args:
      params: A params tree (arrays, ``jax.ShapeDtypeStruct``s, ``nnx.State``...).
      overrides: ``{pattern: role}``; each pattern is an ``fnmatch`` pattern over the
        ``'/'``-joined path (``'layers/2/kernel'``, ``'*/out/kernel'``); later
        patterns win over earlier ones, and all over the rules.

    Returns:
      A tree like ``params`` holding a role string per leaf.

    Raises:
      ValueError: For a role that is not in :data:`ROLES`, or a pattern that
        matches no leaf (naming it and some paths that exist).
    """
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        _check_role(role, f"layer_roles override {pattern!r}")
    used = set()

    def one(path, x):
        if _axes.is_masked(x):
            return None
        p = path_string(path)
        role = _role_of(path, tuple(x.shape))
        for pattern, r in overrides.items():
            if fnmatch.fnmatchcase(p, pattern):
                role = r
                used.add(pattern)
        return role

    roles = jax.tree_util.tree_map_with_path(one, params, is_leaf=_axes.is_masked)
    unused = [p for p in overrides if p not in used]
    if unused:
        paths = [path_string(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(
            f"layer_roles overrides {unused} match no parameter path; paths are like "
            f"{paths[:8]}{' ...' if len(paths) > 8 else ''}."
        )
    return roles


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


def format_roles(params: Any, roles: RolesOrFn | None = None) -> str:
    """A table ``path  shape  role``, one line per leaf, to see what each optimizer does.

    Args:
      params: A params tree.
      roles: Role tree or callable; default :func:`layer_roles`.

    Returns:
      The table as one string (print it).
    """
    tree = resolve_roles(roles, params)
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_axes.is_masked)
    flat = jax.tree_util.tree_structure(params, is_leaf=_axes.is_masked).flatten_up_to(tree)
    rows = [
        (path_string(k), "masked" if _axes.is_masked(x) else str(tuple(x.shape)), str(r))
        for (k, x), r in zip(leaves, flat)
    ]
    w0 = max([len(r[0]) for r in rows] + [4])
    w1 = max([len(r[1]) for r in rows] + [5])
    lines = [f"{'path':<{w0}}  {'shape':<{w1}}  role"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def matrix_dimension_numbers(
    role: str | None, shape: tuple[int, ...]
) -> _axes.DimensionNumbers | None:
    """The ``(fan-in, fan-out)`` matrix view of a leaf with this role, or ``None``.

    ``matrix``/``head``/``embedding``: the two axes; ``conv``: window and input
    axes together against the output axis; ``stacked``: the last two axes, each
    leading index a separate matrix. ``vector``/``scalar``: ``None``.
    """
    n = len(shape)
    if role in (None, "vector", "scalar") or n < 2:
        return None
    if role == "conv":
        return _axes.DimensionNumbers((tuple(range(n - 1)), (n - 1,)))
    if role == "stacked" or n > 2:
        return _axes.DimensionNumbers(((n - 2,), (n - 1,)), batch_axes=tuple(range(n - 2)))
    return _axes.DimensionNumbers(((0,), (1,)))


def dimension_numbers_for(roles: RolesOrFn | None, treat: tuple[str, ...]) -> Callable[[Any], Any]:
    """A ``dimension_numbers`` callable: matrix views for leaves whose role is in ``treat``."""
    for r in treat:
        _check_role(r, "treated roles")

    def fn(tree):
        tree_roles = resolve_roles(roles, tree)
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_axes.is_masked)
        flat = treedef.flatten_up_to(tree_roles)
        return treedef.unflatten(
            [
                None
                if _axes.is_masked(x) or r not in treat
                else matrix_dimension_numbers(r, tuple(x.shape))
                for x, r in zip(leaves, flat)
            ]
        )

    return fn
