"""Checking a restored optimizer state against the optimizer that will use it.

Checkpoint libraries store a state as nested containers of arrays. Restored
without a target (orbax's ``restore(path)``), named tuples come back as dicts and
tuples as lists; restored into a target of the wrong shapes, they fail with an
error that names neither the parameter nor the setting. :func:`restore_state`
does the check itself, by tree path, before anything is rebuilt: a state saved
by the same transform with other static settings (``block_size``,
``max_precond_dim``, ``grafting``, ``mu_dtype``, ...) gives a ``ValueError``
naming the first differing paths, shapes and dtypes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerwise_optax import _owner

_HINT = (
    "The checkpoint was written by an optimizer with other static settings (e.g. "
    "block_size, max_precond_dim, grafting, dimension_numbers, mu_dtype, precond_dtype) "
    "or for other params; build the optimizer as it was when the state was saved."
)


def _key(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key(k) for k in path): leaf for path, leaf in flat}


def _describe(x: Any) -> str:
    shape = tuple(getattr(x, "shape", np.shape(x)))
    dtype = getattr(x, "dtype", None) or np.asarray(x).dtype
    return f"{shape} {np.dtype(dtype).name}"


def _show(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


def _size(x: Any) -> int:
    return int(np.prod(getattr(x, "shape", np.shape(x)), dtype=np.int64))


def checkpointable(state: Any) -> Any:
    """The state with its empty placeholder arrays replaced by ``None``, ready to save.

    Per-axis states keep a ``(stack, 0)`` array for every dimension that has no
    factor, so that every state leaf has a fixed shape under ``jit``, ``vmap`` and
    ``scan``; some checkpointers (orbax among them) refuse to write zero-size
    arrays. :func:`restore_state` puts the placeholders back.

    Example with orbax::

      checkpointer.save(path, lo.checkpointable(state))
      state = lo.restore_state(jax.eval_shape(tx.init, params), checkpointer.restore(path))

    The same for a Flax ``nnx.Optimizer`` (its ``nnx.state`` holds the same
    placeholders)::

      checkpointer.save(path, lo.checkpointable(nnx.state(optimizer)))
      fresh = nnx.Optimizer(model, tx, wrt=nnx.Param)
      nnx.update(fresh, lo.restore_state(nnx.state(fresh), checkpointer.restore(path)))

    Args:
      state: Any optimizer state.

    Returns:
      The same tree with every zero-size array replaced by ``None``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> state = lo.shampoo(1e-3).init(params)
      >>> sum(x.size == 0 for x in jax.tree.leaves(state))  # the vector's empty factor slots
      2
      >>> sum(x.size == 0 for x in jax.tree.leaves(lo.checkpointable(state)))
      0
    """
    return jax.tree.map(lambda x: None if _size(x) == 0 else x, state)


def check_state(like: Any, restored: Any) -> None:
    """Raises ``ValueError`` unless ``restored`` fits the state ``like``.

    Args:
      like: The expected state: ``tx.init(params)`` or, without allocating,
        ``jax.eval_shape(tx.init, params)``.
      restored: A restored state in any container layout (named tuples, dicts,
        lists), or a tree of objects with ``shape`` and ``dtype`` (e.g. a
        checkpoint's array metadata).

    Returns:
      ``None``; the check passed.

    Raises:
      ValueError: naming each missing, extra or mismatched state path (up to 8),
        with both shapes and dtypes.

    Examples:
      A state written with Adam grafting does not fit an optimizer that grafts
      SGD (no second moment):

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3))}
      >>> state = lo.shampoo(1e-3).init(params)
      >>> try:
      ...     lo.check_state(jax.eval_shape(lo.shampoo(1e-3, grafting='sgd').init, params), state)
      ... except ValueError as e:
      ...     print(str(e).splitlines()[1])
        0/nu/w: in the checkpoint ((4, 3) float32) but not in this optimizer's state
    """
    want, got = _flat(like), _flat(restored)
    problems = []
    for path in want:
        if path not in got and _size(want[path]) == 0:
            continue  # a placeholder that checkpointable() left out
        if path not in got:
            problems.append(
                f"{_show(path)}: missing from the checkpoint (expected {_describe(want[path])})"
            )
        elif _describe(want[path]) != _describe(got[path]):
            problems.append(
                f"{_show(path)}: the checkpoint has {_describe(got[path])}, "
                f"this optimizer expects {_describe(want[path])}"
            )
    problems += [
        f"{_show(path)}: in the checkpoint ({_describe(got[path])}) but not in this optimizer's state"
        for path in got
        if path not in want
    ]
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(
            f"The restored optimizer state does not match this optimizer "
            f"({len(problems)} differences):\n  {shown}{more}\n{_HINT}"
        )


def restore_state(like: Any, restored: Any, shardings: Any = None) -> Any:
    """A restored state rebuilt in the structure of ``like``, after :func:`check_state`.

    Use it with a checkpointer's raw restore, e.g. orbax::

      checkpointer.save(path, lo.checkpointable(state))
      ...
      abstract = jax.eval_shape(tx.init, params)
      state = lo.restore_state(abstract, checkpointer.restore(path))

    Empty placeholders that :func:`checkpointable` left out are recreated.

    A state in the owner layout (:mod:`layerwise_optax._owner`) restores onto a
    mesh with another device count: its group stacks are padded to a multiple
    of the device count, and stacks of the saved length are cut or padded to
    the length ``like`` has (the real blocks come first). ``like`` must be in
    the layout the run continues in: trace it under that mesh
    (``with jax.set_mesh(mesh): jax.eval_shape(tx.init, params)``), as
    :func:`state_shardings` does. With orbax's target restore, give the arrays
    the saved lengths (for instance the shapes of the checkpoint's metadata) and
    let this function resize them.

    On a mesh, pass the target layout as ``shardings`` (for instance
    :func:`state_shardings` for the mesh the run continues on, which may differ
    from the mesh that saved the state: 8 devices to 4, ``(4, 2)`` to
    ``(8, 1)``); every leaf is then placed with ``jax.device_put`` on its
    sharding. With orbax, restore straight into that layout by giving each leaf
    of the target a ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, so no
    device ever holds a whole leaf it does not own::

      shardings = lo.state_shardings(tx, params, specs, mesh=new_mesh)
      abstract = jax.eval_shape(tx.init, params)
      target = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
      )
      raw = checkpointer.restore(path, lo.checkpointable(target))
      state = lo.restore_state(abstract, raw, shardings)

    Args:
      like: The expected state or its ``jax.eval_shape``.
      restored: The restored tree (any container layout, same paths).
      shardings: Optional tree like ``like`` of ``jax.sharding.Sharding`` (e.g.
        from :func:`state_shardings`); ``None`` leaves the arrays where they are.

    Returns:
      A state with ``like``'s tree structure (named tuples, empty states) and
      ``restored``'s arrays, bit for bit, on ``shardings`` if given.

    Raises:
      ValueError: if paths, shapes or dtypes differ (see :func:`check_state`);
        if ``shardings`` does not match ``like``'s tree; if a leaf's sharding
        cannot hold it (a partition spec with more entries than the leaf has
        axes, or an axis not divisible by the product of its mesh axes' sizes),
        naming the leaf's path and the axis.
        All checks run before anything is placed.

    Examples:
      A round trip (a checkpointer would write ``saved`` and read it back as plain
      containers):

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> tx = lo.shampoo(1e-3)
      >>> state = tx.init(params)
      >>> saved = lo.checkpointable(state)
      >>> restored = lo.restore_state(jax.eval_shape(tx.init, params), saved)
      >>> jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, state))
      True
    """
    got = _owner.repad(like, _flat(restored), _key)
    try:
        check_state(like, _unflat_like(restored, got))
    except ValueError as e:
        raise ValueError(f"{e}{_layout_hint(like, got)}") from None
    placements = None if shardings is None else _check_shardings(like, shardings)
    leaves = [got[p] if p in got else jnp.zeros(x.shape, x.dtype) for p, x in _flat(like).items()]
    if placements is not None:
        leaves = [jax.device_put(x, s) for x, s in zip(leaves, placements)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _layout_hint(like: Any, got: dict[tuple[str, ...], Any]) -> str:
    """A hint when the checkpoint and ``like`` seem to be in different state layouts.

    The owner layout's fields flatten through a ``blocks`` entry; a parameter
    named ``blocks`` can fool the guess, which is why it is only a hint.
    """
    like_owner = _owner.layout_of(like) is not None
    saved_owner = any("blocks" in path for path in got)
    if saved_owner == like_owner:
        return ""
    if saved_owner:
        return (
            "\nThe checkpoint looks like the owner layout (saved under a mesh) and ``like`` is "
            "the replicated layout: trace ``like`` under the mesh the run continues on "
            "(with jax.set_mesh(mesh): jax.eval_shape(tx.init, params)), or build the "
            "optimizer with state_layout='owner'."
        )
    return (
        "\nThe checkpoint looks like the replicated layout and ``like`` is the owner layout "
        "(traced under a mesh): build the optimizer with state_layout='replicated' to restore it."
    )


def _unflat_like(restored: Any, flat: dict[tuple[str, ...], Any]) -> Any:
    """``restored`` with its leaves replaced by ``flat``'s entries at the same paths."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(restored)
    return jax.tree.unflatten(treedef, [flat[tuple(_key(k) for k in p)] for p, _ in paths])


def _check_shardings(like: Any, shardings: Any) -> list[Any]:
    """``shardings`` flattened like ``like``, each checked against its leaf's shape."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    try:
        placements = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"shardings does not match the optimizer state's tree: {e}") from None
    for (path, leaf), s in zip(flat, placements):
        where = _show(tuple(_key(k) for k in path))
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if not isinstance(s, jax.sharding.Sharding):
            raise ValueError(
                f"state leaf {where}: shardings must hold a jax.sharding.Sharding per leaf, "
                f"got {type(s).__name__} {s!r}."
            )
        if isinstance(s, jax.sharding.NamedSharding):
            _check_named(where, shape, s)
        else:
            try:
                s.shard_shape(shape)
            except ValueError as e:
                raise ValueError(f"state leaf {where} with shape {shape}: {e}") from None
    return placements


def _check_named(where: str, shape: tuple[int, ...], s: jax.sharding.NamedSharding) -> None:
    # NamedSharding itself rejects unknown mesh axes; the shape is checked here.
    spec = s.spec
    if len(spec) > len(shape):
        raise ValueError(
            f"state leaf {where} with shape {shape}: partition spec {spec} has {len(spec)} "
            f"entries for {len(shape)} axes."
        )
    sizes = dict(s.mesh.shape)
    for dim, entry in enumerate(spec):
        names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        total = int(np.prod([sizes[n] for n in names], dtype=np.int64))
        if shape[dim] % total:
            raise ValueError(
                f"state leaf {where} with shape {shape}: axis {dim} (size {shape[dim]}) is not "
                f"divisible by mesh axis {'×'.join(names)} (size {total}) of its spec {spec}; "
                f"this mesh ({dict(sizes)}) cannot hold the saved layout."
            )
