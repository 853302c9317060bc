"""Dion: orthonormalized low-rank updates from a power iteration with error feedback.

For a matrix leaf with matrix view ``X`` (``m x n`` = fan-in x fan-out, the view
:mod:`layerwise_optax._muon` uses: a :class:`layerwise_optax.DimensionNumbers`
with two factor groups, each batch slice its own matrix), Dion keeps a
params-shaped buffer ``M`` and a right factor ``Q`` (``n x r``) per slice, and
each step takes one step of a power (subspace) iteration on ``B = M + G``:

.. math::
  B = M + G,\\quad P = \\mathrm{orth}(B Q),\\quad R = B^T P,\\quad
  M \\leftarrow B - (1 - \\mu) P R^T,\\quad
  Q \\leftarrow \\mathrm{colnorm}(R),\\quad \\Delta = s(W)\\, P Q^T.

``P`` has ``r`` orthonormal columns and ``Q`` unit columns, so ``||P Q^T||_F =
sqrt(r)``; once the iteration has converged on a steady ``B``, ``Q``'s columns
are orthogonal too and ``P Q^T`` is the polar factor of the best rank-``r`` part
of ``B`` (at full rank Muon's ``U V^T``, which Muon approximates with
Newton-Schulz). The part of ``B`` the step did not use stays in ``M`` (*error
feedback*), to be taken in later steps.

``orth`` is :func:`layerwise_optax.linalg.cholesky_qr` (shifted CholeskyQR2).
Cholesky QR is chosen because its only reduction over the long side is the
small ``r x r`` Gram matrix ``P^T P``; with the products ``B Q`` and ``B^T P``
(an ``n x r`` reduction), the whole step runs on a ``B`` sharded by rows
without gathering it (under ``Auto`` mesh axes XLA's partitioner places it so:
``tests/test_dion.py`` checks the compiled step has no all-gather of the leaf;
under ``Explicit`` axes the leaf is gathered, as Muon does,
:func:`layerwise_optax._axes.on_gathered`).

Failure policy (:mod:`layerwise_optax._failure`): a non-finite gradient is kept
out of ``M`` and ``Q`` and counted as *skipped*; a non-finite direction (an
overflow) gives a zero update, keeps ``M`` and ``Q`` and is counted as *failed*.
A rank-deficient ``B`` (``rank(B) < r``, or ``B = 0``) is not a failure: the
shifted Cholesky QR gives near-zero columns of ``P`` along the missing
directions, so the update stays finite. A column of ``R`` that is exactly zero
(``B = 0``) keeps its previous ``Q`` column, so a zero gradient does not end the
power iteration (the paper divides by ``||R_j|| + eps``, which would zero it).

The alias :func:`dion` routes leaves that are not matrices to AdamW, as
:func:`layerwise_optax.muon` does (:func:`layerwise_optax._dual.matrices_and_adam`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _dual, _failure, _kron, _linalg, _roles

_STATIC_ARGS = (
    "rank",
    "rank_fraction",
    "dimension_numbers",
    "scaling",
    "mu_dtype",
    "mask",
    "adam_mask",
    "roles",
)
_SCALINGS = ("width", "rms", "none")


class ScaleByDionState(NamedTuple):
    """State for :func:`scale_by_dion`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: The error-feedback momentum ``M``, params tree, ``mu_dtype`` (default
        the params' dtype).
      q: Per matrix leaf its right factors ``Q``, ``(slices, fan_out, rank)`` in
        the params' dtype promoted to float32, columns of unit norm; a 0-d
        placeholder at other leaves.
      failures: :class:`~layerwise_optax._failure.FailureCounts`. ``skipped``:
        (leaf, step) pairs whose gradient was not finite (kept out of ``M`` and
        ``Q``; zero update). ``failed``: (leaf, step) pairs whose direction was
        not finite (zero update; ``M`` and ``Q`` kept).

    .. note::
      Memory: one params-sized buffer plus ``fan_out * rank`` floats per matrix
      slice (Muon: the buffer only).
    """

    count: jax.Array
    mu: optax.Updates
    q: optax.Updates
    failures: _failure.FailureCounts


def dion_rank(m: int, n: int, rank: int | None, rank_fraction: float | None) -> int:
    """``r = min(rank or ceil(rank_fraction * min(m, n)), min(m, n))`` (at least 1).

    ``rank_fraction`` defaults to 1 (full rank) when neither is given.
    """
    k = min(m, n)
    if rank is None:
        fraction = 1.0 if rank_fraction is None else rank_fraction
        rank = math.ceil(round(fraction * k, 9))  # 0.1 * 30 is 3, not 4
    return max(1, min(rank, k))


def _validate_rank(rank: Any, rank_fraction: Any) -> None:
    _checks.positive_int("rank", rank, allow_none=True)
    if rank_fraction is not None:
        if not isinstance(rank_fraction, (int, float)) or isinstance(rank_fraction, bool):
            raise TypeError(
                "rank_fraction fixes the factors' shapes, so it must be a Python float in "
                f"(0, 1], got {type(rank_fraction).__name__} {rank_fraction!r}; with "
                "optax.inject_hyperparams pass static_args=('rank_fraction',), or use "
                "layerwise_optax.inject_hyperparams."
            )
        if not 0 < rank_fraction <= 1:
            raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}.")
    if rank is not None and rank_fraction is not None:
        raise ValueError(
            f"rank={rank!r} and rank_fraction={rank_fraction!r} exclude each other; give one."
        )


class _Step(NamedTuple):
    update: Any
    mu: Any
    q: Any
    skipped: Any
    failed: Any


def _init_q(
    x: jax.Array, plan: _axes.LeafPlan, *, key: jax.Array, index: list[int], rank_of
) -> Any:
    """``Q_0``: Gaussian ``(slices, fan_out, r)``, columns normalized (0-d off the matrices)."""
    i = len(index)  # the leaf's position in tree order (map_leaves visits them in order)
    index.append(i)
    if plan.spec is None:
        return jnp.zeros([], jnp.float32)
    m, n = plan.dims[0], plan.dims[1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    q = jax.random.normal(jax.random.fold_in(key, i), (plan.stack, n, rank_of(m, n)), dtype)
    return _linalg.normalize_columns(q, 0.0)


def _leaf_step(g, plan, m, q, *, mu, eps, rms, scaling, mu_dtype) -> _Step:
    """One leaf's Dion step (the module docstring's equations) under the failure policy."""
    zero = jnp.zeros([], jnp.int32)
    if plan.spec is None:
        return _Step(g, m, q, zero, zero)
    ok, g32 = _failure.guard(g)
    b = m.astype(g32.dtype) + g32
    blocks = plan.to_blocks(b)  # (slices, m, n)
    q_in = q.astype(blocks.dtype)
    hi = jax.lax.Precision.HIGHEST
    p = _linalg.cholesky_qr(jnp.einsum("smn,snr->smr", blocks, q_in, precision=hi))
    r = jnp.einsum("smn,smr->snr", blocks, p, precision=hi)
    residual = blocks - (1 - mu) * jnp.einsum("smr,snr->smn", p, r, precision=hi)
    q_new = _linalg.normalize_columns(r, eps, q_in)
    o = jnp.einsum("smr,snr->smn", p, q_new, precision=hi)
    update = plan.from_blocks(_dual.shape_scale(o, plan, scaling, rms, measured=True))
    prep = _dual.Momentum(ok, g32, plan.from_blocks(residual), b, blocks)
    good, failed = _dual.settle(o, prep)
    step = _dual.step(g, m, prep, good, failed, update, mu_dtype)
    q_kept = _failure.keep(good, q_new.astype(q.dtype), q)
    return _Step(step.update, step.mu, q_kept, step.skipped, step.failed)


def scale_by_dion(
    rank: int | None = None,
    rank_fraction: float | None = None,
    mu: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    seed: jax.typing.ArrayLike = 0,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    roles: _roles.RolesOrFn | None = None,
    scaling: Literal["width", "rms", "none"] = "width",
    rms: jax.typing.ArrayLike = 0.2,
) -> optax.GradientTransformation:
    """Dion's orthonormalized low-rank update of each matrix; see :func:`dion`.

    Args:
      rank: The rank ``r`` of each matrix's update (static, ``>= 1``; capped at
        ``min(m, n)``). Excludes ``rank_fraction``.
      rank_fraction: ``r = ceil(rank_fraction * min(m, n))`` per matrix (static,
        in ``(0, 1]``). With neither given, 1 (full rank).
      mu: Error-feedback momentum ``mu``, in ``[0, 1)``: the fraction of the
        used low-rank part of ``B`` kept in ``M``.
      eps: Added to each column norm of ``R`` when normalizing it into ``Q``.
      mu_dtype: Storage dtype of ``M``.
      seed: Seed of the initial Gaussian ``Q`` (an int; may be traced). Each leaf
        draws from ``fold_in(key(seed), its index in the tree)``.
      dimension_numbers: Spec tree or callable giving each leaf's ``(fan-in,
        fan-out)`` groups and batch axes (see :func:`layerwise_optax.scale_by_muon`);
        ``None``: from the leaves' roles. Leaves whose spec is ``None`` pass
        through unchanged.
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`),
        used when ``dimension_numbers`` is ``None``.
      scaling: ``'width'``: times ``sqrt(max(1, fan_out / fan_in))``; ``'rms'``:
        each slice rescaled to RMS ``rms`` (AdamW learning rates transfer);
        ``'none'``: ``P Q^T`` as is.
      rms: Target RMS for ``scaling='rms'``.

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleByDionState`.

    Raises:
      ValueError: At construction for ``rank < 1``, ``rank_fraction`` outside
        ``(0, 1]``, both given, ``mu`` outside ``[0, 1)``, a negative ``eps`` or
        an unknown ``scaling``; at ``init`` for a spec without exactly two factor
        groups (naming the leaf's path).

    Examples:
      Fed the same gradient, the power iteration converges (``mu=0``: nothing
      is left over at full rank) and the update becomes the polar factor
      ``U V^T``, all singular values 1; other leaves pass through unchanged.

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
      >>> g = jnp.eye(8, 4) * jnp.array([[4.0, 2.0, 1.0, 0.5]])  # U V^T = eye(8, 4)
      >>> grads = {'w': g, 'b': jnp.ones(4)}
      >>> tx = lo.scale_by_dion(mu=0.0, scaling='none')
      >>> state = tx.init(params)
      >>> for _ in range(30):
      ...     updates, state = jax.jit(tx.update)(grads, state, params)
      >>> bool(jnp.allclose(updates['w'], jnp.eye(8, 4), atol=1e-4)), state.q['w'].shape
      (True, (1, 4, 4))

    References:
      Ahn, Xu, Abreu, Langford et al., `Dion: Distributed Orthonormalized Updates
      <https://arxiv.org/abs/2504.05295>`_, 2025.
    """
    _validate_rank(rank, rank_fraction)
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    if roles is not None:
        _checks.tree_or_callable("roles", roles)
    _checks.in_unit_interval("mu", mu)
    _checks.non_negative("eps", eps)
    _checks.one_of("scaling", scaling, _SCALINGS)
    _checks.non_negative("rms", rms)
    _checks.traceable_int("seed", seed)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    if dimension_numbers is None:
        dimension_numbers = _roles.dimension_numbers_for(roles, _roles.HIDDEN_ROLES)
    plans_for = functools.partial(_dual.matrix_plans, dimension_numbers, name="dion")
    rank_of = functools.partial(dion_rank, rank=rank, rank_fraction=rank_fraction)

    def init_fn(params):
        plans = plans_for(params)  # validates the specs, naming paths
        init_q = functools.partial(_init_q, key=jax.random.key(seed), index=[], rank_of=rank_of)
        return ScaleByDionState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            q=_axes.map_leaves(init_q, plans, params),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        with jax.named_scope("layerwise_optax.dion"):
            plans = plans_for(updates)
            mu_, eps_, rms_ = _checks.hyperparameters(mu, eps, rms)
            leaf = functools.partial(
                _leaf_step, mu=mu_, eps=eps_, rms=rms_, scaling=scaling, mu_dtype=mu_dtype
            )
            out = _axes.map_leaves(leaf, plans, updates, state.mu, state.q)
            failures = _failure.add(
                state.failures,
                skipped=_failure.total(_axes.unzip(out, "skipped")),
                failed=_failure.total(_axes.unzip(out, "failed")),
            )
            return _axes.unzip(out, "update"), ScaleByDionState(
                count=_kron.increment(state.count),
                mu=_axes.unzip(out, "mu"),
                q=_axes.unzip(out, "q"),
                failures=failures,
            )

    return optax.GradientTransformation(init_fn, update_fn)


def dion(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | None = None,
    rank_fraction: float | None = None,
    mu: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    seed: jax.typing.ArrayLike = 0,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    roles: _roles.RolesOrFn | None = None,
    scaling: Literal["width", "rms", "none"] = "width",
    rms: jax.typing.ArrayLike = 0.2,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_weight_decay: optax.ScalarOrSchedule = 0.0,
    adam_mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    r"""Dion (Ahn et al. 2025): low-rank orthonormalized updates for matrices, AdamW elsewhere.

    For a matrix leaf ``W`` (fan-in × fan-out, ``m x n``) with gradient ``G``,
    error-feedback buffer ``M`` and right factor ``Q`` (``n x r``):

    .. math::
      B = M + G,\quad P = \mathrm{orth}(B Q),\quad R = B^T P,\quad
      M \leftarrow B - (1 - \mu) P R^T,\quad Q \leftarrow \mathrm{colnorm}(R),

    .. math::
      W \leftarrow W - \eta\, s(W)\, P Q^T - \eta \lambda W,

    ``orth`` a Cholesky QR (:func:`layerwise_optax.linalg.cholesky_qr`),
    ``colnorm`` each column divided by its norm plus ``eps``, ``s(W)`` the shape
    scaling (as :func:`layerwise_optax.muon`'s). One power-iteration step per
    training step tracks the top-``r`` singular subspace of ``B``; ``P Q^T`` is
    then (once converged) the polar factor of ``B``'s best rank-``r`` part, and what it
    left out stays in ``M``. At full rank the directions are Muon's ``U V^T``
    (after the iteration has converged on a steady gradient); at ``r`` a fraction
    of ``min(m, n)`` the step costs ``O(m n r)`` instead of Newton-Schulz's
    ``O(m n min(m, n))`` and, under a mesh, communicates only ``r``-sized
    reductions (see the module docstring). Which leaves are matrices is
    :func:`layerwise_optax.muon`'s rule (roles, or ``dimension_numbers``); the rest
    goes to AdamW with ``adam_learning_rate``.

    Where to use it: as Muon, on the hidden matrices of large models, when Muon's
    full Newton-Schulz (and gathering each matrix) is the bottleneck. What to
    tune: ``rank_fraction`` (1 is full rank; the paper finds 1/4 to 1/16 close
    to full rank on large matrices, lower ranks wanting a larger ``mu``), ``mu``
    (0.95), the learning rate (~0.02 with ``scaling='width'``; with
    ``scaling='rms'`` your AdamW rate), ``weight_decay``.

    Args:
      learning_rate: Learning rate or schedule of the matrix leaves.
      rank: Rank of each matrix's update (static); excludes ``rank_fraction``.
      rank_fraction: Rank as a fraction of ``min(m, n)`` (static, ``(0, 1]``);
        neither given: 1.
      mu: Error-feedback momentum, ``[0, 1)``.
      eps: Column-norm epsilon (also AdamW's ``eps``).
      weight_decay: Decoupled weight decay of the matrix leaves.
      mask: Weight-decay mask of the matrix leaves.
      mu_dtype: Storage dtype of ``M`` (and of AdamW's first moment).
      seed: Seed of the initial right factors (an int; may be traced).
      dimension_numbers: Which leaves are matrices and how (see
        :func:`layerwise_optax.scale_by_muon`); overrides ``roles``.
      roles: Role tree or callable (default :func:`layerwise_optax.layer_roles`).
      scaling: ``'width'``, ``'rms'`` or ``'none'`` (see :func:`scale_by_dion`).
      rms: Target RMS for ``scaling='rms'``.
      adam_learning_rate: AdamW's learning rate; default ``learning_rate``.
      adam_b1: AdamW's ``b1``.
      adam_b2: AdamW's ``b2``.
      adam_weight_decay: AdamW's weight decay.
      adam_mask: AdamW's weight-decay mask.

    Returns:
      An :class:`optax.GradientTransformation` (an ``optax.partition``):
      ``state.inner_states['dion'].inner_state[0]`` is the
      :class:`ScaleByDionState`; ``state.inner_states['adam'].inner_state[0]`` the
      guarded Adam's state.

    Raises:
      ValueError: As :func:`scale_by_dion`, and for negative learning rates or
        weight decays, or AdamW decays outside ``[0, 1)``.

    Examples:
      A quarter of the rank of a 16 x 16 hidden matrix: its update has rank 4
      and Frobenius norm ``sqrt(4)`` (``scaling='none'``, learning rate 1):

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((16, 16)), 'b': jnp.zeros(16)}
      >>> grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
      >>> tx = lo.dion(1.0, rank_fraction=0.25, scaling='none')
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> int(jnp.linalg.matrix_rank(updates['w'])), round(float(jnp.linalg.norm(updates['w'])), 4)
      (4, 2.0)

    References:
      Ahn, Xu, Abreu, Langford et al., `Dion: Distributed Orthonormalized Updates
      <https://arxiv.org/abs/2504.05295>`_, 2025.

    .. seealso:: :func:`layerwise_optax.muon`, :func:`layerwise_optax.scale_by_dion`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    if adam_learning_rate is not None:
        _checks.non_negative("adam_learning_rate", adam_learning_rate)
    _checks.alias_args(0.0, adam_weight_decay, adam_mask, prefix="adam_")
    _checks.in_unit_interval("adam_b1", adam_b1)
    _checks.in_unit_interval("adam_b2", adam_b2)
    inner = scale_by_dion(
        rank,
        rank_fraction,
        mu,
        eps,
        mu_dtype,
        seed=seed,
        dimension_numbers=dimension_numbers,
        roles=roles,
        scaling=scaling,
        rms=rms,
    )
    return _dual.matrices_and_adam(
        "dion",
        inner,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        dimension_numbers=dimension_numbers,
        roles=roles,
        adam_learning_rate=adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        eps=eps,
        adam_weight_decay=adam_weight_decay,
        adam_mask=adam_mask,
        mu_dtype=mu_dtype,
        nesterov=False,
    )
