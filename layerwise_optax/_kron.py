"""Per-axis Kronecker statistics and their application, shared by every optimizer.

All functions act on one leaf's *block view* ``g`` of shape
``(stack, b_1, ..., b_k)`` (see :mod:`layerwise_optax._axes`) and on per-leaf
*factor tuples* with one entry per view dimension:

* ``'full'`` dimension: ``(stack, b, b)`` matrices;
* ``'diag'`` dimension: ``(stack, b)`` vectors (the diagonal of the factor);
* ``'none'`` dimension: an empty ``(stack, 0)`` placeholder, so that every state
  leaf is an array of fixed shape.

Factor statistics contract every other axis of the view:
``L_i = G_(i) G_(i)^T`` where ``G_(i)`` is the mode-``i`` unfolding of a block.
Failure policy (the same for every optimizer): a refreshed matrix that is not
finite is replaced by the previous one for that block, and the number of such
blocks is returned so that the optimizer can count it in its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _failure, _linalg

_LETTERS = "abcdefghijklmopqrstuvwxy"
HIGHEST = jax.lax.Precision.HIGHEST

Factors = tuple[jax.Array, ...]


class Refreshed(NamedTuple):
    """One leaf's refreshed factors, per factor permutations, and its failure count."""

    factors: Factors
    perms: tuple[Any, ...]
    failed: jax.Array
    kept: tuple[Any, ...] = ()  # per factor: blocks an adaptive criterion kept (or None)


def as_factors(x: Any) -> Factors:
    """A per-leaf factor container as a tuple.

    Containers that went through ``flax.nnx.Optimizer`` come back as int-keyed
    mappings (``nnx.State``); iterating those would give the keys.
    """
    if isinstance(x, Mapping):
        return tuple(x[k] for k in sorted(x))
    return tuple(x)


def normalize(plans: Any, tree: Any) -> Any:
    """Applies :func:`as_factors` to every per-leaf container of a factor tree."""
    return _axes.map_leaves(lambda f, plan: as_factors(f), plans, tree)


def increment(count: jax.Array) -> jax.Array:
    """A step counter plus one, as an int32 array that saturates at the int32 maximum.

    :func:`optax.safe_increment` (annotated to return any array-like), typed as
    the ``jax.Array`` every state's ``count`` field holds.
    """
    return jnp.asarray(optax.safe_increment(count))


def every(count: jax.Array, period: Any) -> jax.Array:
    """Whether ``count`` is a multiple of ``period`` (a bool scalar; ``period`` may be traced).

    The refresh rule of every optimizer with a ``precondition_frequency``. A traced
    period below 1 (which construction cannot reject) acts as 1.
    """
    period = jnp.maximum(jnp.asarray(period), 1).astype(count.dtype)
    return count % period == 0


def _idx(k: int) -> str:
    if k > len(_LETTERS):
        raise NotImplementedError(f"tensors with more than {len(_LETTERS)} factor dimensions")
    return _LETTERS[:k]


def init_factors(plan: _axes.LeafPlan, dtype: Any, *, identity: bool = False) -> Factors:
    """Zero (or identity) factors for a leaf.

    Args:
      plan: The leaf's plan.
      dtype: Storage dtype of the factors.
      identity: Identity matrices / ones instead of zeros.

    Returns:
      One array per view dimension (see the module docstring for shapes).
    """
    out = []
    for kind, b in zip(plan.kinds, plan.blocks):
        if kind == "full":
            eye = jnp.eye(b, dtype=dtype) if identity else jnp.zeros((b, b), dtype)
            out.append(jnp.broadcast_to(eye, (plan.stack, b, b)))
        elif kind == "diag":
            out.append(jnp.full((plan.stack, b), 1.0 if identity else 0.0, dtype))
        else:
            out.append(jnp.zeros((plan.stack, 0), dtype))
    return tuple(out)


def init_factor_tree(plans: Any, params: Any, dtype: Any, *, identity: bool = False) -> Any:
    """:func:`init_factors` for every leaf, stored bare (see :func:`_axes.bare`).

    The states of Shampoo and SOAP keep their per-leaf factor tuples this way so
    that ``flax.nnx.Optimizer`` hands them back with the same structure.
    """
    return _axes.bare(
        plans,
        _axes.map_leaves(lambda p, pl: init_factors(pl, dtype, identity=identity), plans, params),
    )


def placeholder(g: jax.Array, plan: _axes.LeafPlan) -> jax.Array:
    """The empty ``(stack, 0)`` factor of a ``'none'`` dimension, laid out like ``g``'s stack.

    Sliced from the block view rather than built as new zeros, so that in the owner
    layout under ``Explicit`` mesh axes it is sharded along the stack like the
    other factors it is stacked or selected with.
    """
    return jnp.reshape(g, (plan.stack, -1))[:, :0]


def axis_stats(g: jax.Array, plan: _axes.LeafPlan, *, precision: Any = HIGHEST) -> Factors:
    """Per-axis second moments ``G_(i) G_(i)^T`` (or their diagonals) of a block view.

    Args:
      g: ``(stack, b_1, ..., b_k)`` block view, float32 or wider.
      plan: The leaf's plan.
      precision: Matmul precision.

    Returns:
      A factor tuple of the same layout as :func:`init_factors`.
    """
    k = len(plan.kinds)
    idx = _idx(k)
    out = []
    for i, kind in enumerate(plan.kinds):
        if kind == "full":
            other = idx[:i] + "Z" + idx[i + 1 :]
            out.append(jnp.einsum(f"n{idx},n{other}->n{idx[i]}Z", g, g, precision=precision))
        elif kind == "diag":
            out.append(jnp.einsum(f"n{idx},n{idx}->n{idx[i]}", g, g, precision=precision))
        else:
            out.append(placeholder(g, plan))
    return tuple(out)


def apply_axis_matrices(
    g: jax.Array,
    mats: Factors,
    plan: _axes.LeafPlan,
    *,
    transpose: bool = False,
    precision: Any = HIGHEST,
    skip: int | None = None,
) -> jax.Array:
    """Multiplies each axis of a block view by its factor: ``G ×_1 M_1 ... ×_k M_k``.

    For a full factor ``M_i`` the result is ``sum_j M_i[a, j] G[..., j, ...]`` on
    axis ``i`` (``M_i^T`` with ``transpose``); a diagonal factor scales the axis;
    ``'none'`` leaves it unchanged.

    Args:
      g: ``(stack, b_1, ..., b_k)`` block view.
      mats: Factor tuple (matrices or diagonals) per view dimension.
      plan: The leaf's plan.
      transpose: Use ``M_i^T`` (e.g. to rotate into an eigenbasis).
      precision: Matmul precision (HIGHEST by default; stochastic fits such as
        PSGD's use the default).
      skip: A view dimension to leave unchanged (KL-Shampoo's statistics).

    Returns:
      The transformed block view, same shape as ``g``.
    """
    k = len(plan.kinds)
    idx = _idx(k)
    for i, (kind, m) in enumerate(zip(plan.kinds, mats)):
        if i == skip:
            continue
        if kind == "full":
            m = m.astype(g.dtype)
            out = idx[:i] + "Z" + idx[i + 1 :]
            m_idx = f"n{idx[i]}Z" if transpose else f"nZ{idx[i]}"
            g = jnp.einsum(f"{m_idx},n{idx}->n{out}", m, g, precision=precision)
        elif kind == "diag":
            shape = (plan.stack,) + tuple(b if j == i else 1 for j, b in enumerate(plan.blocks))
            g = g * jnp.reshape(m.astype(g.dtype), shape)
    return g


def all_finite(factors: Factors, *, per_block: bool = False) -> jax.Array:
    """Whether every entry of every factor is finite.

    A bool scalar; with ``per_block``, one flag per block of the stack, shape
    ``(stack, 1)`` (the factors' leading axis; see
    :func:`layerwise_optax._failure.fit`).
    """
    if not per_block:
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(f)) for f in factors] or [jnp.bool_(True)]))
    flags = [jnp.all(jnp.isfinite(f), axis=tuple(range(1, f.ndim))) for f in factors]
    return jnp.all(jnp.stack(flags), axis=0)[:, None]


def ema(old: Factors, new: Factors, decay: jax.Array, *, valid: Any = True) -> Factors:
    """``decay * old + w * new`` with ``w = 1 - decay``, or ``w = 1`` when ``decay == 1``.

    ``decay == 1`` is the classic Shampoo/AdaGrad running sum. Where ``valid`` is
    false (a non-finite gradient or statistic) ``old`` is returned unchanged.

    The sum is computed in at least float32 from the stored (upcast) ``old`` and
    the new statistics, and returned in that compute dtype: the caller stores it
    once, in the storage dtype, with :func:`store`. (Cast to bfloat16 here, an
    EMA with ``1 - decay`` below bfloat16's resolution would stop moving.)
    """
    decay = jnp.asarray(decay, jnp.float32)
    w = jnp.where(decay == 1.0, 1.0, 1.0 - decay)
    # The new statistics are materialized before the EMA: fused into the matrix
    # product that makes them, the sum would be rounded differently (a fused
    # multiply-add) in some programs and not in others, and those last-bit
    # differences decide the roots of rank-deficient factors. With the barrier
    # every layout (replicated, owner, any mesh) rounds the EMA alike.
    new = jax.lax.optimization_barrier(tuple(new))
    out = []
    for o, n in zip(old, new):
        c = jnp.promote_types(o.dtype, jnp.float32)
        o32 = o.astype(c)
        out.append(jnp.where(_failure.fit(valid, o), decay * o32 + w * n.astype(c), o32))
    return tuple(out)


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (xor-shift-multiply; every output bit depends on every input bit)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def stochastic_round(x: jax.Array, dtype: Any, salt: jax.typing.ArrayLike) -> jax.Array:
    r"""``x`` rounded to a narrower float ``dtype`` up or down at random, unbiased.

    With ``lo <= x <= hi`` the two neighbours of ``x`` in ``dtype``, the result
    is ``hi`` with probability ``(x - lo) / (hi - lo)`` and ``lo`` otherwise, so
    ``E[round(x)] = x``. Round to nearest would lose every change smaller than
    half a unit in the last place: bfloat16 has 8 significant bits, so an EMA
    ``L <- b L + (1 - b) S`` stored in bfloat16 stops moving once
    ``(1 - b) |S - L| < 2^{-9} |L|`` (with ``b = 0.999`` after about a hundred
    steps of a constant ``S``, at a fraction of its limit); with stochastic
    rounding it follows the float32 EMA within bfloat16's relative resolution
    (about ``2^{-8}``).

    The random numbers are a hash of the float32 bits of each entry and of
    ``salt`` (the step count): no key in the state, the same rounding in every
    state layout and on every mesh (equal values round alike, so a symmetric
    matrix stays symmetric), and a new draw at every step.

    Args:
      x: Values in float32 (or wider: cast to float32 first).
      dtype: The storage dtype. A dtype at least as wide as float32, or a
        non-float dtype, is a plain cast.
      salt: An integer scalar, a new one each step.

    Returns:
      ``x`` in ``dtype``; non-finite entries and entries that ``dtype`` holds
      exactly are cast as they are.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return x.astype(dtype)
    x32 = x.astype(jnp.float32)
    near = x32.astype(dtype)
    near32 = near.astype(jnp.float32)
    toward = jnp.where(x32 > near32, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(near, toward)
    gap = jnp.abs(other.astype(jnp.float32) - near32)
    frac = jnp.abs(x32 - near32) / jnp.where(gap > 0, gap, 1.0)
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    seed = _mix32(jnp.asarray(salt).astype(jnp.uint32) + jnp.uint32(0x9E3779B9))
    u = (_mix32(bits ^ seed) >> 8).astype(jnp.float32) * (2.0**-24)
    up = jnp.isfinite(x32) & jnp.isfinite(other.astype(jnp.float32)) & (u < frac)
    return jnp.where(up, other, near)


def store(new: Any, like: Any, salt: jax.typing.ArrayLike) -> Any:
    """``new`` (computed in float32) in the dtypes of the stored tree ``like``.

    Per array, :func:`stochastic_round` to ``like``'s dtype: the one cast of an
    accumulated statistic (an EMA, a fitted PSGD factor) to a narrower storage
    dtype such as bfloat16; a plain cast otherwise.
    """
    return jax.tree.map(lambda n, o: stochastic_round(n, o.dtype, salt), new, like)


def _full_root(s, r, root, damping, relative_damping, method):
    """Damped inverse roots of ``(stack, b, b)`` statistics (not yet checked)."""
    if method == "cholesky":
        if root != 1:
            raise ValueError(f"method={method!r} computes inverses (root 1), got {root}.")
        return _linalg.inv_psd_cholesky(s, damping=damping, relative_damping=relative_damping)
    if method == "newton":
        new, _ = _linalg.inv_root_newton(
            s, int(root), damping=damping, relative_damping=relative_damping, warm_start=r
        )
        return new
    return _linalg.inv_root_eigh(s, root, damping=damping, relative_damping=relative_damping)


def inverse_roots_tree(
    stats: Any,
    prev: Any,
    plans: Any,
    *,
    root: Callable[[_axes.LeafPlan], int | tuple[int, ...]],
    damping: jax.Array,
    relative_damping: bool,
    method: str = "eigh",
    distribute: bool = True,
) -> tuple[Any, jax.Array]:
    """Damped inverse roots of every factor of every leaf, keeping good previous ones.

    Full factors of all leaves are grouped by block length and root order; each
    group is one batched computation (:func:`layerwise_optax._axes.map_grouped`,
    split over the devices of the current mesh). Diagonal factors get
    :func:`layerwise_optax._linalg.inv_root_diag`; ``'none'`` factors keep
    ``prev``. A block whose new root is not finite keeps its previous root and
    is counted (:func:`layerwise_optax._failure.keep_good`).

    Args:
      stats: Per-leaf factor tuples.
      prev: Previous roots, same layout (also the Newton warm start).
      plans: The plans (from :func:`layerwise_optax._axes.resolve`).
      root: The root order ``p`` of a leaf's factors, from its plan: one int for
        all of them, or a tuple with one per view dimension (Shampoo's
        ``factor_exponents``; entries of ``'none'`` dimensions are not used).
      damping: Ridge (see :mod:`layerwise_optax._linalg`).
      relative_damping: Whether ``damping`` is relative to each factor's
        largest eigenvalue.
      method: ``'eigh'``, ``'newton'`` (coupled Newton, warm-started),
        or ``'cholesky'`` (``root == 1`` only: inverses by Cholesky, much cheaper).
      distribute: Spread the groups over the mesh's devices.

    Returns:
      ``(roots, failures)``: the new roots tree and the int32 count of blocks
      that kept their previous root.
    """

    def full(s, r, p):
        return _full_root(s, r, p, damping, relative_damping, method)

    def diag(s, plan, p):
        return _linalg.inv_root_diag(s, p, damping, relative_damping)

    return refresh_tree(stats, prev, plans, full=full, diag=diag, param=root, distribute=distribute)


def refresh_tree(
    stats: Any,
    prev: Any,
    plans: Any,
    *,
    full: Callable[[jax.Array, jax.Array, Any], jax.Array],
    diag: Callable[[jax.Array, _axes.LeafPlan, Any], jax.Array],
    param: Callable[[_axes.LeafPlan], Any] = lambda plan: None,
    distribute: bool = True,
) -> tuple[Any, jax.Array]:
    """A per-factor refresh of every leaf, keeping good previous results (the shared scaffold).

    The full factors of all leaves with equal block shape, ``param`` and dtypes
    are one batched ``full(s, r, param)`` call
    (:func:`layerwise_optax._axes.map_grouped`, split over the devices of the
    current mesh when ``distribute``); a diagonal factor gets ``diag(s, plan, param)``;
    a ``'none'`` factor keeps ``prev``. A block whose new result is not finite
    keeps its previous one and is counted
    (:func:`layerwise_optax._failure.keep_good`). :func:`inverse_roots_tree`
    (inverse roots) and K-FAC's ``inverse='eigh'`` refresh (eigendecompositions)
    are this loop with their own ``full`` and ``diag``.

    Args:
      stats: Per-leaf factor tuples.
      prev: Previous results, same layout as the results (also passed to
        ``full`` as a warm start).
      plans: The plans.
      full: ``full(s, r, param)``: ``(stack, b, b)`` statistics and previous
        results to ``(stack, ...)`` new results shaped like ``r`` (NaN where
        they fail).
      diag: ``diag(s, plan, param)``: ``(stack, b)`` diagonal statistics to new
        ``(stack, b)`` results.
      param: A static parameter of a leaf's computations (e.g. the root
        order), or a tuple with one per view dimension (each factor gets its
        own); part of the batching key.
      distribute: Spread the groups over the mesh's devices.

    Returns:
      ``(results, failures)``: the new tree and the int32 count of blocks that
      kept their previous result.
    """

    def prepare(plan, s, r):
        return [
            ((s.shape[1:], p, s.dtype, r.dtype), (s, r)) if kind == "full" else None
            for kind, s, r, p in zip(plan.kinds, as_factors(s), as_factors(r), per_dim(plan))
        ]

    def batched(key):
        def compute(s, r):
            new, _, ok = _failure.keep_good(full(s, r, key[1]), r, matrix=True)
            return new, ok

        return compute

    def per_dim(plan):
        p = param(plan)
        return p if isinstance(p, tuple) else (p,) * len(plan.kinds)

    done = _axes.map_grouped(prepare, batched, plans, stats, prev, distribute=distribute)

    def combine(s, plan, r, d):
        out, failed = [], jnp.zeros([], jnp.int32)
        parts = zip(plan.kinds, as_factors(s), as_factors(r), d, per_dim(plan))
        for kind, s_j, r_j, d_j, p_j in parts:
            if kind == "diag":
                new, bad, _ = _failure.keep_good(diag(s_j, plan, p_j), r_j, matrix=False)
            elif kind == "full":
                new, ok = d_j
                bad = jnp.sum(~ok).astype(jnp.int32)
            else:
                new, bad = r_j, 0
            out.append(new)
            failed = failed + bad
        return Refreshed(tuple(out), (), failed)

    out = _axes.map_leaves(combine, plans, stats, prev, done)
    new = _axes.keep_masked(plans, _axes.unzip(out, "factors"), prev)
    return new, _failure.total(_axes.unzip(out, "failed"))


def _full_basis(s, q, method):
    """New ``(stack, b, b)`` eigenbases, kept per block where not finite.

    Returns ``(bases, perm, ok)``: ``perm`` is the ``(stack, b)`` column
    permutation of the QR refresh (identity for blocks that kept their basis;
    ``None`` for ``'eigh'``), ``ok`` the per-block success mask.
    """
    if method == "eigh":
        new, perm = _linalg.eigenbasis(s), None
    else:
        new, perm = _linalg.refresh_eigenbasis(s, q)
    new, _, ok = _failure.keep_good(new, q, matrix=True)
    if perm is not None:
        # A block that keeps its old basis must not permute its moments either.
        perm = jnp.where(ok[:, None], perm, jnp.arange(perm.shape[-1], dtype=perm.dtype))
    return new, perm, ok


def needs_refresh(s: jax.Array, q: jax.Array, tolerance: jax.Array) -> jax.Array:
    r"""The adaptive refresh criterion: which ``(stack, b, b)`` blocks need a new basis.

    A block needs one unless its basis still diagonalizes its statistic within
    ``tolerance``: with ``B = Q^T L Q`` (:func:`layerwise_optax._linalg.basis_off_diagonal`),

    .. math::
      \text{refresh} \iff \lVert B - \operatorname{diag} B \rVert_F
      > \text{tol} \cdot \lVert B \rVert_F .

    A non-finite statistic or basis needs a refresh (so a failure is counted as
    before), and so does every block when ``tolerance <= 0`` (a traced 0 means
    "always", like ``None``). A zero statistic is diagonal in any basis and keeps it.

    Returns:
      ``(stack,)`` bool.
    """
    off, total = _linalg.basis_off_diagonal(s, q)
    return ~(off <= tolerance * total) | (tolerance <= 0)


def _adaptive_basis(s, q, method, tolerance):
    """:func:`_full_basis` where :func:`needs_refresh`, the kept basis elsewhere.

    Returns ``(bases, perm, ok, kept)``; ``kept`` marks the blocks whose basis the
    criterion kept (never counted as failed). When no block of the batch needs a
    refresh the decomposition is skipped altogether (``lax.cond``; under
    ``jax.vmap`` both branches run).
    """
    need = needs_refresh(s, q, tolerance)
    ident = (
        None
        if method == "eigh"
        else jnp.broadcast_to(jnp.arange(q.shape[-1], dtype=jnp.int32), q.shape[:-1])
    )

    def skip():
        return q, ident, jnp.ones(need.shape, bool)

    new, perm, ok = jax.lax.cond(jnp.any(need), lambda: _full_basis(s, q, method), skip)
    new = jnp.where(need[:, None, None], new, q)
    if perm is not None and ident is not None:
        perm = jnp.where(need[:, None], perm, ident)
    return new, perm, ok | ~need, ~need


def eigenbases_tree(
    stats: Any,
    prev: Any,
    plans: Any,
    *,
    method: str,
    distribute: bool = True,
    tolerance: jax.Array | None = None,
) -> tuple[Any, Any, jax.Array, Any]:
    """Eigenbases of the full factors of every leaf (SOAP); other factors keep ``prev``.

    Like :func:`inverse_roots_tree`: each group of same-sized full factors of all
    leaves is one batched computation, spread over the mesh's devices when there
    is one; a block whose new basis is not finite keeps its previous one and is
    counted. With ``tolerance`` (SOAP's ``refresh_tolerance``) a block whose
    previous basis still diagonalizes its statistic (:func:`needs_refresh`)
    keeps it, and a batch (the part on one device) none of whose blocks needs a
    refresh skips its decomposition.

    Args:
      stats: Per-leaf factor tuples.
      prev: Previous bases, same layout.
      plans: The plans.
      method: ``'eigh'`` (exact) or ``'qr'`` (one power step plus QR from
        ``prev``, see :func:`layerwise_optax._linalg.refresh_eigenbasis`).
      distribute: Spread the groups over the mesh's devices.
      tolerance: ``None`` (refresh every block) or the criterion's float32 scalar.

    Returns:
      ``(bases, perms, failures, kept)``: the bases tree; per leaf the tuple of
      ``(stack, b)`` column permutations applied to each basis (``None`` where
      there is none: non-full factors, and every factor with ``'eigh'``); the
      int32 count of blocks that kept their previous basis because the new one
      was not finite; per leaf the tuple of ``(stack,)`` bool masks of the blocks
      the criterion kept (``None`` for non-full factors and without
      ``tolerance``).
    """

    def prepare(plan, s, q):
        return [
            ((s.shape[1:], s.dtype, q.dtype), (s, q)) if kind == "full" else None
            for kind, s, q in zip(plan.kinds, as_factors(s), as_factors(q))
        ]

    def batched(key):
        if tolerance is None:
            return lambda s, q: (*_full_basis(s, q, method), None)
        return lambda s, q: _adaptive_basis(s, q, method, tolerance)

    done = _axes.map_grouped(prepare, batched, plans, stats, prev, distribute=distribute)

    def combine(q, plan, d):
        bases, perms, kept, failed = [], [], [], jnp.zeros([], jnp.int32)
        for q_j, d_j in zip(as_factors(q), d):
            new, perm, ok, k = (q_j, None, True, None) if d_j is None else d_j
            bases.append(new)
            perms.append(perm)
            kept.append(k)
            failed = failed + jnp.sum(~jnp.asarray(ok)).astype(jnp.int32)
        return Refreshed(tuple(bases), tuple(perms), failed, tuple(kept))

    out = _axes.map_leaves(combine, plans, prev, done)
    failed = _failure.total(_axes.unzip(out, "failed"))
    bases = _axes.keep_masked(plans, _axes.unzip(out, "factors"), prev)
    perms = _axes.keep_masked(plans, _axes.unzip(out, "perms"), prev)
    return bases, perms, failed, _axes.unzip(out, "kept")


def permute_axes(
    x: jax.Array, perms: tuple[jax.Array | None, ...], plan: _axes.LeafPlan
) -> jax.Array:
    """Reorders each axis of a block view by a per-block permutation.

    Args:
      x: ``(stack, b_1, ..., b_k)`` block view (e.g. SOAP's second moment).
      perms: Per dimension a ``(stack, b)`` permutation, or ``None``.
      plan: The leaf's plan.

    Returns:
      ``x`` with ``x[n, ..., j, ...] <- x[n, ..., perm[n, j], ...]`` on each axis.
    """
    for i, perm in enumerate(perms):
        if perm is None:
            continue
        shape = (plan.stack,) + tuple(b if j == i else 1 for j, b in enumerate(plan.blocks))
        x = jnp.take_along_axis(x, jnp.reshape(perm, shape), axis=i + 1)
    return x


def block_norms(x: jax.Array) -> jax.Array:
    """Frobenius norm of each block of a block view, shape ``(stack, 1, ..., 1)``."""
    axes = tuple(range(1, x.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def ema_debias(decay: jax.Array, count: jax.Array) -> jax.Array:
    """``1 / (1 - decay^t)``: the factor that turns a zero-started EMA into a weighted mean.

    After ``t`` steps of :func:`ema` from zero the weights sum to ``1 - decay^t``.
    The sum is computed as ``-expm1(t log decay)``, which keeps float32 accuracy
    (~2e-7 relative) for ``decay`` near 1, where ``1 - decay^t`` in float32 cancels
    (up to ~6e-5 relative at ``decay = 1 - 1e-7``, ``t = 1000``). ``decay == 1`` (a
    running sum) gives 1.

    Args:
      decay: Scalar EMA decay in ``(0, 1]`` (float32).
      count: int scalar ``t >= 1``, the number of EMA steps (skipped ones too).

    Returns:
      A float32 scalar ``>= 1``.
    """
    t = count.astype(jnp.float32)
    return jnp.where(decay == 1.0, 1.0, -1.0 / jnp.expm1(t * jnp.log(decay)))


def trace_normalized(factors: Factors, plan: _axes.LeafPlan) -> Factors:
    r"""Each factor divided by its mean eigenvalue: ``L / (tr(L) / b)`` per block.

    Full factors by :func:`layerwise_optax._linalg.trace_normalize`; a diagonal
    factor is divided by its mean entry; ``'none'`` placeholders pass unchanged.
    A block with zero trace (no statistics yet) is left as it is.
    """
    out = []
    for kind, f in zip(plan.kinds, factors):
        if kind == "full":
            out.append(_linalg.trace_normalize(f))
        elif kind == "diag":
            out.append(_linalg.trace_normalize(f, diagonal=True))
        else:
            out.append(f)
    return tuple(out)


def factor_powers(
    factors: Factors, plan: _axes.LeafPlan, k: int | tuple[int, ...], dtype: Any
) -> Factors:
    """Each factor to the integer power ``k`` (or ``k[i]`` for view dimension ``i``), in ``dtype``.

    Full factors by :func:`layerwise_optax._linalg.matrix_power`, diagonal ones
    entrywise; ``'none'`` placeholders pass unchanged.
    """
    ks = k if isinstance(k, tuple) else (k,) * len(plan.kinds)
    out = []
    for kind, f, k in zip(plan.kinds, factors, ks):
        if kind == "full":
            out.append(_linalg.matrix_power(f, k).astype(dtype))
        elif kind == "diag":
            out.append((f**k).astype(dtype))
        else:
            out.append(f)
    return tuple(out)


def kl_axis_stats(
    g: jax.Array, roots: Factors, plan: _axes.LeafPlan, root: int | tuple[int, ...]
) -> Factors:
    """KL-Shampoo's per-axis statistics ``G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i``.

    The other factors' inverses come from the stored roots ``L_j^{-1/root}``:
    ``L_j^{-1/2}`` is the root raised to ``root / 2`` (``root`` even,
    :func:`factor_powers`), and :func:`kl_stats_from_halves` does the rest; a
    ``'none'`` dimension (no factor) counts as ``L_j = I``. This
    is the fixed-point (flip-flop) update of the Kronecker-factored Gaussian that
    is closest in KL divergence to the gradient's second moment (Lin et al.
    2025): for gradients ``A^{1/2} Z B^{1/2}`` with white ``Z`` it settles at
    ``L_1 ⊗ L_2 = A ⊗ B``.

    Args:
      g: ``(stack, b_1, ..., b_k)`` block view, float32 or wider.
      roots: The leaf's stored roots ``L_j^{-1/root}`` (factor tuple).
      plan: The leaf's plan.
      root: The even root order ``p`` of ``roots``, or one per view dimension
        (even where the dimension has a factor).

    Returns:
      A factor tuple in the layout of :func:`init_factors`.
    """
    half = tuple(p // 2 for p in root) if isinstance(root, tuple) else root // 2
    return kl_stats_from_halves(g, factor_powers(roots, plan, half, g.dtype), plan)


def kl_stats_from_halves(g: jax.Array, halves: Factors, plan: _axes.LeafPlan) -> Factors:
    """``G_(i) (⊗_{j≠i} M_j^T M_j) G_(i)^T / n_i`` per axis, from factors ``M_j``.

    The KL statistics of :func:`kl_axis_stats` for any per-axis ``M_j`` with
    ``M_j^T M_j = L_j^{-1}``: KL-Shampoo's symmetric ``L_j^{-1/2}``, or KL-SOAP's
    eigen-form ``D_j^{-1/2} Q_j^T`` (:func:`eigen_inverse_halves`). Each ``M_j``
    is applied to its axis (:func:`apply_axis_matrices`; a diagonal ``M_j``
    scales it), every axis but ``i``, before the usual contraction
    (:func:`axis_stats`); ``n_i`` is the product of the other block lengths.
    ``'none'`` dimensions get their empty placeholder.

    Args:
      g: ``(stack, b_1, ..., b_k)`` block view, float32 or wider.
      halves: Factor tuple of the ``M_j`` (matrices ``(stack, b, b)`` for full
        dimensions, vectors ``(stack, b)`` for diagonal ones).
      plan: The leaf's plan.

    Returns:
      A factor tuple in the layout of :func:`init_factors`.
    """
    out = []
    for i, kind in enumerate(plan.kinds):
        if kind == "none":
            out.append(placeholder(g, plan))
            continue
        x = apply_axis_matrices(g, halves, plan, skip=i)
        n_other = max(1, math.prod(plan.blocks) // plan.blocks[i])
        out.append(axis_stats(x, plan)[i] / n_other)
    return tuple(out)


def eigen_inverse_halves(
    stats: Factors, bases: Factors, plan: _axes.LeafPlan, damping: jax.Array, dtype: Any
) -> Factors:
    r"""Eigen-form halves ``M_j = D_j^{-1/2} Q_j^T`` of damped factor inverses (KL-SOAP).

    With the eigenvalue estimates ``λ_j = diag(Q_j^T L_j Q_j)`` of a factor in
    its (possibly stale) basis ``Q_j``,

    .. math::
      L_j^{-1} pprox Q_j\, \mathrm{diag}(λ_j + δ_j)^{-1} Q_j^	op = M_j^	op M_j,
      \qquad δ_j = \mathrm{damping} \cdot \max λ_j

    (exact, up to the damping, when ``Q_j`` diagonalizes ``L_j``; the damped
    values are floored as in :func:`layerwise_optax._linalg.inv_root_diag`). A
    diagonal factor (identity basis) has ``λ_j = L_j``. A factor that is still
    all zero (before its first statistics) counts as the identity, ``M_j = I``:
    the convention of KL-Shampoo, whose roots start as the identity.

    Args:
      stats: The leaf's factor statistics ``L_j`` (factor tuple).
      bases: Its bases ``Q_j`` (``(stack, b, b)`` for full dimensions).
      plan: The leaf's plan.
      damping: Relative ridge ``>= 0`` (float32 scalar).
      dtype: The dtype of the halves (the gradient's compute dtype).

    Returns:
      A factor tuple for :func:`kl_stats_from_halves` (``'none'`` placeholders
      pass unchanged).
    """
    out = []
    for kind, s, q in zip(plan.kinds, stats, bases):
        if kind == "none":
            out.append(s)
            continue
        s32 = s.astype(jnp.promote_types(s.dtype, jnp.float32))
        if kind == "full":
            q32 = q.astype(s32.dtype)
            lam = jnp.einsum("nza,nzy,nya->na", q32, s32, q32, precision=HIGHEST)
        else:
            lam = s32
        w = _linalg.inv_root_diag(lam, 2, damping, relative_damping=True)
        w = jnp.where(jnp.max(jnp.abs(lam), axis=-1, keepdims=True) > 0, w, 1.0)
        if kind == "full":
            out.append((w[:, :, None] * jnp.swapaxes(q32, -1, -2)).astype(dtype))
        else:
            out.append(w.astype(dtype))
    return tuple(out)


def on_schedule(
    branch: Any, refreshes: Sequence[Callable[..., Any]], kept: Callable[..., Any], *operands: Any
) -> tuple[Any, jax.Array]:
    """The refresh phase under one ``lax.switch``: ``(new, failed)``.

    Branch 0 keeps the preconditioner, ``(kept(*operands), 0)``; branch ``j >= 1``
    runs ``refreshes[j - 1](*operands)``, which returns the new value and its int32
    failure count. ``branch`` is a traced int or bool (``True`` is branch 1), e.g.
    :func:`every` of the step count.
    """

    def keep(*xs):
        return kept(*xs), jnp.zeros([], jnp.int32)

    return jax.lax.switch(jnp.asarray(branch).astype(jnp.int32), [keep, *refreshes], *operands)
