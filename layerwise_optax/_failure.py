"""The failure policy, in one place: guard a leaf, keep the last good value, count.

Every transform of the library follows one policy (README, "Failure policy"):

* a gradient leaf that is not valid (a NaN or Inf entry, or a squared norm that
  overflows float32) enters no statistic or moment; its update is zero and the
  event is counted as *skipped* (:func:`guard`, :func:`keep`, :func:`zero_unless`);
* a refresh (inverse root, inverse, eigenbasis, PSGD fit, Newton-Schulz
  orthogonalization, dual map) whose result is not finite keeps the previous
  good result where the transform stores one (zero update for that leaf where it
  does not), and the event is counted as *failed* (:func:`keep_good`).

Nothing here raises: the counts travel in every state as one
:class:`FailureCounts` under the field name ``failures``, which
:func:`layerwise_optax.failure_report` reads on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from layerwise_optax import _axes


class FailureCounts(NamedTuple):
    """The failure counters every library state carries as its ``failures`` field.

    Attributes:
      skipped: int32 scalar, (leaf, step) pairs whose gradient was not valid
        (see :func:`guard`); they got a zero update and left the state unchanged.
      failed: int32 scalar, refreshed results (blocks, leaves or fits) that were
        not finite and were replaced by the previous good one.
    """

    skipped: jax.Array
    failed: jax.Array


def zeros() -> FailureCounts:
    """Counters at zero (for ``init``)."""
    return FailureCounts(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


def add(counts: FailureCounts, *, skipped: Any = 0, failed: Any = 0) -> FailureCounts:
    """``counts`` with ``skipped`` and ``failed`` events added (int32)."""
    return FailureCounts(
        counts.skipped + jnp.asarray(skipped, jnp.int32),
        counts.failed + jnp.asarray(failed, jnp.int32),
    )


def guard(g: jax.Array, *, per_block: bool = False) -> tuple[jax.Array, jax.Array]:
    """A leaf's validity flag and the leaf in at least float32, zeroed if not valid.

    The policy's entry point: a gradient leaf is valid when its squared Frobenius
    norm is finite in the compute dtype (float32 or wider). That rules out NaN
    and Inf entries, and also gradients so large (``||g|| > ~1.8e19`` in float32)
    that their squares, and hence every second-moment statistic built from them,
    would overflow: such a leaf would otherwise leave an infinite second moment
    behind and freeze its updates at zero for good. An invalid leaf enters no
    statistic or moment (callers :func:`keep` their state where the flag is false
    and count the event).

    Because ``||G_(i) G_(i)^T||_F <= ||g||_F^2``, every per-axis statistic of a
    valid leaf is finite too, and so is any EMA of them.

    Args:
      g: A gradient leaf of any shape and floating dtype.
      per_block: ``g`` is a stack of blocks of *several* leaves (a group of the
        owner layout, :mod:`layerwise_optax._owner`): each block along axis 0 is
        checked on its own. The owner layout fills every block of an invalid
        leaf with NaN first, so a block is valid exactly when its leaf is.

    Returns:
      ``(ok, g32)``: a bool scalar (with ``per_block``, shape
      ``(stack, 1, ..., 1)``, broadcasting against ``g``) and ``g`` cast to at
      least float32, all zeros where ``ok`` is false.
    """
    g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    axes = tuple(range(1, g.ndim)) if per_block else None
    ok = jnp.isfinite(jnp.sum(jnp.square(g32), axis=axes, keepdims=per_block))
    return ok, jnp.where(ok, g32, 0)


def fit(ok: Any, x: jax.Array) -> Any:
    """A validity flag shaped to broadcast against ``x``.

    A scalar flag (one leaf) is returned as is; a per-block flag of shape
    ``(stack, 1, ...)`` (:func:`guard` with ``per_block``) is reshaped to
    ``(stack, 1, ..., 1)`` with ``x.ndim`` axes, so that it selects whole blocks
    of any per-block array (factors ``(stack, b, b)``, diagonals ``(stack, b)``,
    block views).
    """
    ok = jnp.asarray(ok)
    if ok.ndim == 0:
        return ok
    return jnp.reshape(ok, (ok.shape[0],) + (1,) * (x.ndim - 1))


def keep(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old`` (per array of a tree; ``None`` passes through).

    Uses :func:`layerwise_optax._axes.select`, so a freshly computed value may be
    laid out differently from the stored one under ``Explicit`` mesh axes.
    """
    if new is None:
        return None
    return jax.tree.map(lambda n, o: _axes.select(fit(ok, o), n, o), new, old)


def zero_unless(ok: jax.Array, update: jax.Array, dtype: Any) -> jax.Array:
    """The update of a leaf, zero where the leaf was not valid, cast to ``dtype``."""
    return jnp.where(fit(ok, update), update, 0).astype(dtype)


def count_invalid(flags: Any) -> jax.Array:
    """The number of false entries in a tree of bool flags, as an int32 scalar."""
    return sum(
        (jnp.sum(~f).astype(jnp.int32) for f in jax.tree.leaves(flags)), jnp.zeros([], jnp.int32)
    )


def total(counts: Any) -> jax.Array:
    """The sum of a tree of int32 counts, as an int32 scalar (0 for an empty tree)."""
    return sum(jax.tree.leaves(counts), jnp.zeros([], jnp.int32))


def keep_good(
    new: jax.Array, prev: jax.Array, *, matrix: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per block of a stack: ``new`` where finite, else ``prev``.

    Args:
      new: ``(stack, n, n)`` refreshed matrices (``matrix=True``) or ``(stack, n)``
        refreshed diagonals.
      prev: The stored ones, same shape; the result takes their dtype.
      matrix: Whether the blocks are matrices or vectors.

    Returns:
      ``(kept, failures, ok)``: the kept blocks, the int32 count of blocks that
      kept ``prev``, and the ``(stack,)`` bool mask of blocks that took ``new``.
    """
    axes = (-2, -1) if matrix else (-1,)
    ok = jnp.all(jnp.isfinite(new), axis=axes)
    mask = ok[:, None, None] if matrix else ok[:, None]
    return jnp.where(mask, new.astype(prev.dtype), prev), jnp.sum(~ok).astype(jnp.int32), ok
