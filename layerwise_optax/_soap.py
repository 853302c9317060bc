"""SOAP: Adam in the slowly refreshed eigenbasis of Shampoo's factors.

Differences from the reference PyTorch implementation (Vyas et al., 2024), each
deliberate:

* The reference skips the parameter update of the first step (it only builds the
  first eigenbasis). Here the first step is an Adam step in the original
  coordinates (the bases start as the identity), so SOAP with identity bases is
  exactly :func:`optax.adam` (a tested contract) and ``optax.MultiSteps`` and
  schedules stay aligned. As in the reference, each step projects with the bases
  built from *earlier* gradients and only then adds its gradient to the
  statistics: a basis built from the current gradient alone is rank-deficient,
  and Adam's ``m / sqrt(nu)`` would turn the rounding noise in its null space
  into full-size update components. The second moment of the first step was
  accumulated in the original coordinates and is carried into the first
  eigenbasis as is (it decays with ``b2``).
* Bias correction is Adam's, ``m_hat / (sqrt(nu_hat) + eps)``; the reference folds
  it into the step size, which moves ``eps`` by ``sqrt(1 - b2^t)``.

As in the reference, the first moment is kept in the original coordinates and
rotated each step (so it survives basis changes), the second moment lives in the
rotated coordinates, and a QR refresh reorders its entries with the basis.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _failure, _kron

_DEFAULT_MAX_PRECOND_DIM = 1024

_STATIC_ARGS = (
    "max_precond_dim",
    "block_size",
    "merge_small_dims",
    "distribute",
    "dimension_numbers",
    "mu_dtype",
    "precond_dtype",
    "mask",
)


class ScaleBySoapState(NamedTuple):
    """State for :func:`scale_by_soap`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: First moment in the original coordinates; params tree, ``mu_dtype``.
      nu: Second moment in the rotated coordinates; per leaf the block view
        ``(stack, b_1, ..., b_k)``, float32 (or the param dtype if wider).
      stats: Per leaf, a tuple of factor statistics (``(stack, b, b)`` for full
        dimensions, ``(stack, b)`` diagonals otherwise; ``precond_dtype``).
      bases: Per leaf, the eigenbases of ``stats`` (``(stack, b, b)``; a ones
        vector, i.e. the identity, for dimensions without a full factor).
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs whose non-finite gradient was
        kept out of the moments and statistics. ``failed``: (block, refresh) pairs whose new basis was not
        finite, so the previous basis was kept.

    .. note::
      Memory per leaf: ``mu`` and ``nu`` (params-sized; ``nu`` padded to whole
      blocks) plus ``2 * stack * b**2`` floats per full factor dimension.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    stats: optax.Updates
    bases: optax.Updates
    failures: _failure.FailureCounts


class _LeafOut(NamedTuple):
    update: Any
    mu: Any
    nu: Any
    stats: Any
    ok: Any  # bool scalar: the gradient leaf was finite


def scale_by_soap(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    factor_decay: jax.typing.ArrayLike = 0.95,
    precondition_frequency: jax.typing.ArrayLike = 10,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    merge_small_dims: bool = True,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    """Scales updates by Adam run in Shampoo's eigenbasis; see :func:`soap`.

    Args:
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay, in ``[0, 1)``.
      eps: Added to the root second moment.
      factor_decay: EMA decay of the factor statistics, in ``(0, 1]``.
      precondition_frequency: Steps between eigenbasis refreshes, an int ``>= 1``
        (may be traced).
      max_precond_dim: Factor dimensions longer than this keep the identity basis
        (static; ``None``: 1024).
      block_size: Split factor dimensions longer than this into blocks (static).
      merge_small_dims: Let the default policy merge small adjacent axes.
      distribute: Under a mesh set with :func:`jax.set_mesh`, split each basis
        refresh (same-sized blocks of all leaves batched) over its devices, each
        block on one device; no effect without a mesh.
      dimension_numbers: Spec tree or callable; ``None``: the default policy
        (vectors and scalars keep the identity basis: plain Adam).
      mu_dtype: Storage dtype of the first moment.
      precond_dtype: Storage dtype of statistics and bases (``None``: float32).

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleBySoapState`.

    Raises:
      ValueError: At construction for out-of-range hyperparameters; at ``init`` if
        ``dimension_numbers`` do not fit a parameter.

    Examples:
      A vector has no factor, so it keeps the identity basis and SOAP is Adam:
      its first step is the sign of the gradient.

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'b': jnp.zeros(3)}
      >>> tx = lo.scale_by_soap()
      >>> updates, state = jax.jit(tx.update)({'b': jnp.array([0.5, -2.0, 1e-3])},
      ...                                     tx.init(params), params)
      >>> [round(v, 3) for v in updates['b'].tolist()]
      [1.0, -1.0, 1.0]

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.
    """
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    _checks.in_unit_interval("b1", b1)
    _checks.in_unit_interval("b2", b2)
    _checks.non_negative("eps", eps)
    _checks.in_unit_interval("factor_decay", factor_decay, right_closed=True)
    _checks.positive("factor_decay", factor_decay)
    _checks.traceable_int("precondition_frequency", precondition_frequency, minimum=1)
    _checks.positive_int("max_precond_dim", max_precond_dim, allow_none=True)
    max_precond_dim = _DEFAULT_MAX_PRECOND_DIM if max_precond_dim is None else max_precond_dim
    _checks.positive_int("block_size", block_size, allow_none=True)
    _checks.boolean("merge_small_dims", merge_small_dims)
    _checks.boolean("distribute", distribute)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    precond_dtype = _checks.canonicalize_dtype(precond_dtype, "precond_dtype") or jnp.float32
    resolve = functools.partial(
        _axes.resolve,
        dimension_numbers,
        max_precond_dim=max_precond_dim,
        block_size=block_size,
        merge_small_dims=merge_small_dims,
    )

    def init_fn(params):
        plans = resolve(params)
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=_axes.map_leaves(
                lambda p, pl: jnp.zeros(pl.block_shape, jnp.promote_types(p.dtype, jnp.float32)),
                plans,
                params,
            ),
            stats=_kron.init_factor_tree(plans, params, precond_dtype),
            bases=_kron.init_factor_tree(plans, params, precond_dtype, identity=True),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        # One arithmetic for plain and injected hyperparameters (float32 first).
        b1_, b2_, eps_, decay_ = _checks.hyperparameters(b1, b2, eps, factor_decay)
        with jax.named_scope("layerwise_optax.soap"):
            plans = resolve(updates)
            count_inc = optax.safe_increment(state.count)
            state_stats = _kron.normalize(plans, state.stats)
            state_bases = _kron.normalize(plans, state.bases)

            def direction(g, plan, mu, nu, q):
                ok, g32 = _failure.guard(g)
                mu = jnp.where(ok, b1_ * mu + (1 - b1_) * g32, mu)
                gb = plan.to_blocks(g32)
                rot = _kron.apply_axis_matrices(gb, q, plan, transpose=True)
                nu = jnp.where(ok, b2_ * nu + (1 - b2_) * jnp.square(rot), nu)
                m_rot = _kron.apply_axis_matrices(plan.to_blocks(mu), q, plan, transpose=True)
                m_hat = optax.tree.bias_correction(m_rot, b1_, count_inc)
                nu_hat = optax.tree.bias_correction(nu, b2_, count_inc)
                u = _kron.apply_axis_matrices(m_hat / (jnp.sqrt(nu_hat) + eps_), q, plan)
                upd = jnp.where(ok, plan.from_blocks(u), 0).astype(g.dtype)
                return _LeafOut(upd, mu, nu, gb, ok)

            out = _axes.map_leaves(direction, plans, updates, state.mu, state.nu, state_bases)
            mus, nu = _axes.unzip(out, "mu"), _axes.unzip(out, "nu")
            oks = _axes.unzip(out, "ok")
            skipped = sum((~ok).astype(jnp.int32) for ok in jax.tree.leaves(oks))
            skipped = jnp.asarray(skipped, jnp.int32)

            def accumulate(ok, plan, gb, stats):
                return _kron.ema(stats, _kron.axis_stats(gb, plan), decay_, valid=ok)

            stats = _axes.map_leaves(accumulate, plans, oks, _axes.unzip(out, "stats"), state_stats)

            def refresh(method):
                def run(stats, bases, nu):
                    # Same-sized blocks of all leaves in one batch each, split over
                    # the devices of the mesh when there is one.
                    bases, perms, failed = _kron.eigenbases_tree(
                        stats, bases, plans, method=method, distribute=distribute
                    )
                    nu = _axes.map_leaves(
                        lambda v, plan, perm: _kron.permute_axes(v, perm, plan), plans, nu, perms
                    )
                    return bases, nu, failed

                return run

            # The bases for the next step: exact after the first step, then one
            # power step + QR every `precondition_frequency` steps.
            branch = jnp.where(
                state.count == 0, 2, jnp.where(_kron.every(count_inc, precondition_frequency), 1, 0)
            )
            bases, nu, failed = jax.lax.switch(
                branch,
                [
                    lambda s, q, v: (q, v, jnp.zeros([], jnp.int32)),
                    refresh("qr"),
                    refresh("eigh"),
                ],
                stats,
                state_bases,
                nu,
            )
            return _axes.unzip(out, "update"), ScaleBySoapState(
                count=count_inc,
                mu=optax.tree.cast(mus, mu_dtype)
                if mu_dtype is not None
                else optax.tree.cast_like(mus, state.mu),
                nu=optax.tree.cast_like(nu, state.nu),
                stats=_axes.bare(plans, stats),
                bases=_axes.bare(plans, bases),
                failures=_failure.add(state.failures, skipped=skipped, failed=failed),
            )

    return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    factor_decay: jax.typing.ArrayLike = 0.95,
    precondition_frequency: jax.typing.ArrayLike = 10,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    merge_small_dims: bool = True,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SOAP: Adam in the eigenbasis of Shampoo's factors (Vyas et al., 2024).

    Each factor dimension keeps Shampoo's statistic ``L_i`` (an EMA with
    ``factor_decay``) and an orthogonal basis ``Q_i`` that tracks its
    eigenvectors: exact ``eigh`` at the first step, then every
    ``precondition_frequency`` steps one power-iteration step plus QR. Adam runs
    on the rotated gradient:

    .. math::
      \tilde G = G \times_1 Q_1^\top \cdots \times_k Q_k^\top, \quad
      \nu \leftarrow b_2 \nu + (1-b_2) \tilde G^2, \quad
      U = \frac{\hat{\tilde m}}{\sqrt{\hat \nu} + \epsilon}
          \times_1 Q_1 \cdots \times_k Q_k

    where the first moment ``m`` is kept in the original coordinates and rotated
    each step. Dimensions without a full factor (longer than
    ``max_precond_dim``, vectors and scalars by default) keep the identity
    basis, so with no factors at all SOAP is exactly Adam.

    Weight decay is decoupled and multiplied by the learning rate, as in
    :func:`optax.adamw`.

    Where to use it / what to tune: a drop-in for AdamW on transformers and MLPs
    that often needs fewer steps; it is more robust to
    ``precondition_frequency`` than Shampoo (Adam's second moment keeps adapting
    between refreshes). Use AdamW-like learning rates (typically the same or a
    little higher) and ``b1 = b2 = 0.95`` (the paper's language-model setting;
    for small-batch or noisy problems ``b2 = 0.99..0.999`` is often much better,
    see ``notebooks/00_quickstart``); lower ``max_precond_dim`` or set
    ``block_size`` to bound memory (``b^2`` per factor) and refresh cost.

    Args:
      learning_rate: A global scaling factor, fixed or a schedule.
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay, in ``[0, 1)``.
      eps: Added to the root second moment.
      factor_decay: EMA decay of factor statistics (the reference's
        ``shampoo_beta``), in ``(0, 1]``.
      precondition_frequency: Steps between eigenbasis refreshes (may be traced).
      max_precond_dim: Longer factor dimensions keep the identity basis (static;
        ``None``: 1024).
      block_size: Block length for long axes, ``None`` for no blocking.
      merge_small_dims: Merge small adjacent axes in the default policy.
      distribute: Spread basis refreshes over the mesh's devices (see
        :func:`scale_by_soap`).
      dimension_numbers: Per-leaf spec tree or callable; ``None``: default.
      weight_decay: Decoupled weight decay, fixed or a schedule.
      mask: Weight-decay mask (tree or callable).
      mu_dtype: Storage dtype of the first moment.
      precond_dtype: Storage dtype of statistics and bases (``None``: float32).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: At construction if a hyperparameter is out of range; at ``init``
        if ``dimension_numbers`` do not fit a parameter.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3))}
      >>> tx = lo.soap(learning_rate=3e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> jax.tree.map(jnp.shape, updates)
      {'w': (4, 3)}

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.

    .. seealso:: :func:`layerwise_optax.shampoo`, :func:`layerwise_optax.scale_by_soap`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    return optax.chain(
        scale_by_soap(
            b1=b1,
            b2=b2,
            eps=eps,
            factor_decay=factor_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            block_size=block_size,
            merge_small_dims=merge_small_dims,
            distribute=distribute,
            dimension_numbers=dimension_numbers,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
