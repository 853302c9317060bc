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

KL-SOAP (``factor_estimation='kl'``, Lin et al. 2025) changes only the factor
statistics (:func:`_accumulate`): each is KL-Shampoo's
``G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i`` through
:func:`layerwise_optax._kron.kl_stats_from_halves`, the code KL-Shampoo uses. The
inverses are formed from what SOAP already stores, the factor ``L_j`` and its
basis ``Q_j``: ``Q_j diag(λ_j + δ_j)^{-1} Q_j^T`` with ``λ_j = diag(Q_j^T L_j Q_j)``
(:func:`layerwise_optax._kron.eigen_inverse_halves`), so the state is SOAP's. The
authors' reference code (``KLOpt(using_klsoap=True)``) also keeps the basis from
the last QR refresh and updates eigenvalue estimates every step; it stores them
as their own EMA of ``diag(Q_j^T S_j Q_j)`` (``S_j`` the new statistic), started
at 0.1 and carried across refreshes, inverts them undamped (zero eigenvalues give
zero, large inverse roots are clamped), keeps its first moment in the eigenbasis
and skips the first update. Here the estimates are recomputed from the factor
(the same EMA while the basis does not change: no extra state), a zero factor
counts as the identity (as KL-Shampoo's initial roots; the reference's first
statistics are the same ``G_(i) G_(i)^T / n_i``), the damping is relative
(``damping * max λ_j``, as KL-Shampoo's default) and the Adam part is this
module's SOAP unchanged. Eigenvalue estimates read in a stale basis are the
diagonal of ``Q^T L Q`` only; its off-diagonal part, which the basis refresh
removes, is ignored in between (as in the reference).

One update is three phases: :func:`_accumulate` (moments and factor EMAs),
:func:`_precondition` (Adam in the current eigenbasis) and :func:`_refresh` (the
bases for the next step); the parts Shampoo writes the same way live in
:mod:`layerwise_optax._factored`.

``refresh_tolerance`` adds Meta's Distributed Shampoo refresh criterion to
:func:`_refresh`: a block keeps its basis while its statistic stays diagonal in
it (:func:`layerwise_optax._kron.needs_refresh`), counted in ``refresh_skips``.
Shampoo has no such option: it stores inverse roots, not an eigenbasis. The
criterion reads the accumulated statistics whichever ``factor_estimation`` made
them, so it applies to KL-SOAP unchanged; a kept basis is then also the one its
eigen-form inverses use, within the same relative error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _factored, _failure, _grafting, _kron, _owner

_DEFAULT_MAX_PRECOND_DIM = 1024

_STATIC_ARGS = (
    "state_layout",
    "owner_axes",
    "max_precond_dim",
    "block_size",
    "merge_small_dims",
    "distribute",
    "dimension_numbers",
    "mu_dtype",
    "precond_dtype",
    "mask",
    "factor_estimation",
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
      refresh_skips: With ``refresh_tolerance``, an int32 scalar: (block, refresh)
        pairs whose basis the adaptive criterion kept (real blocks only, summed
        over devices); ``None`` without it.

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
    refresh_skips: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Options(_factored.FactoredOptions):
    """The arguments of :func:`scale_by_soap`, validated (:func:`_options`)."""

    factor_estimation: str  # 'shampoo' (SOAP) or 'kl' (KL-SOAP); static
    damping: Any  # KL-SOAP's relative ridge, >= 0
    refresh_tolerance: Any  # None (refresh every block) or a float in [0, 1]


def _options(args: dict[str, Any]) -> _Options:
    """Checks the factory's arguments (``ValueError`` naming argument, value, range)."""
    _checks.one_of("factor_estimation", args["factor_estimation"], ("shampoo", "kl"))
    _checks.non_negative("damping", args["damping"])
    tol = args["refresh_tolerance"]
    _checks.tolerance("refresh_tolerance", tol)
    if isinstance(tol, (int, float)) and tol == 0:
        tol = None  # 0: every block is refreshed, exactly as without the criterion
    return _factored.factored_options(
        _Options, {**args, "refresh_tolerance": tol}, _DEFAULT_MAX_PRECOND_DIM
    )


class _Hyper(NamedTuple):
    """The float hyperparameters as float32 arrays (:func:`_checks.hyperparameters`)."""

    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    decay: jax.Array
    damping: jax.Array


def _init(o: _Options, params: optax.Params) -> ScaleBySoapState:
    """Zero moments and statistics, identity bases; ``nu`` in the block view."""
    start = _factored.init_factored(o, params)
    nu = _axes.map_leaves(
        lambda p, plan: jnp.zeros(plan.block_shape, _grafting.moment_dtype(p)), start.plans, params
    )
    zero = jnp.zeros([], jnp.int32)
    skips = None if o.refresh_tolerance is None else zero
    return ScaleBySoapState(
        zero, start.mu, nu, start.stats, start.identity, _failure.zeros(), skips
    )


def _accumulate(o, h, g, plan, mu, nu, stats, bases) -> _factored.Accumulated:
    r"""Accumulate: the guarded moments and factor EMAs of one leaf.

    .. math::
      m \leftarrow b_1 m + (1-b_1) G, \quad
      \nu \leftarrow b_2 \nu + (1-b_2) \tilde G^2, \quad
      L_i \leftarrow \beta L_i + (1-\beta) \hat L_i

    with ``\tilde G = G \times_1 Q_1^\top \cdots \times_k Q_k^\top`` rotated by the
    current bases (built from earlier gradients only); ``m`` stays in the original
    coordinates. ``\hat L_i = G_{(i)} G_{(i)}^\top``, or with
    ``factor_estimation='kl'`` KL-SOAP's ``G_{(i)} (⊗_{j≠i} L_j^{-1}) G_{(i)}^\top
    / n_i`` with the inverses in eigen-form from the stored factors and bases
    (:func:`layerwise_optax._kron.eigen_inverse_halves`). An invalid gradient
    leaf changes nothing (:func:`layerwise_optax._factored.accumulate`); KL
    statistics go through the inverses and can overflow, and then nothing is
    accumulated either (``check_estimates``).
    """
    if o.factor_estimation == "kl":

        def estimate(blocks):
            halves = _kron.eigen_inverse_halves(stats, bases, plan, h.damping, blocks.dtype)
            return _kron.kl_stats_from_halves(blocks, halves, plan)

        a = _factored.accumulate(g, plan, mu, stats, h.b1, h.decay, estimate, check_estimates=True)
    else:
        a = _factored.accumulate(g, plan, mu, stats, h.b1, h.decay)
    rot = _kron.apply_axis_matrices(a.blocks, bases, plan, transpose=True)
    return a._replace(nu=_failure.keep(a.ok, h.b2 * nu + (1 - h.b2) * jnp.square(rot), nu))


def _precondition(h, count_inc, g, plan, a, bases) -> jax.Array:
    r"""Precondition: Adam's step in the eigenbasis, rotated back.

    .. math::
      U = \frac{\hat{\tilde m}}{\sqrt{\hat \nu} + \epsilon} \times_1 Q_1 \cdots \times_k Q_k,
      \qquad \tilde m = m \times_1 Q_1^\top \cdots \times_k Q_k^\top

    with Adam's bias corrections ``\hat x = x / (1 - b^t)``; zero for an invalid
    gradient leaf.
    """
    m_rot = _kron.apply_axis_matrices(plan.to_blocks(a.mu), bases, plan, transpose=True)
    m_hat = optax.tree.bias_correction(m_rot, h.b1, count_inc)
    nu_hat = optax.tree.bias_correction(a.nu, h.b2, count_inc)
    u = _kron.apply_axis_matrices(m_hat / (jnp.sqrt(nu_hat) + h.eps), bases, plan)
    return _failure.zero_unless(a.ok, plan.from_blocks(u), g.dtype)


def _refresh(o, plans, method, tol, stats, bases, nu) -> tuple[Any, jax.Array]:
    """Refresh: new eigenbases ``Q_i`` of every full factor, ``nu`` reordered with them.

    ``'eigh'``: exact eigenvectors; ``'qr'``: one power step ``L_i Q_i`` plus QR,
    whose columns are sorted by the estimated eigenvalues, and ``nu``'s entries
    follow that permutation (:func:`layerwise_optax._kron.eigenbases_tree`). Same-sized
    blocks of all leaves are one batch each, split over the mesh's devices; a block
    whose basis is not finite keeps its previous one and is counted. With
    ``refresh_tolerance`` (``tol``) a block whose basis still diagonalizes its
    statistic keeps it (:func:`layerwise_optax._kron.needs_refresh`), and the
    value has a third part, the number of (real) blocks kept so.
    """
    bases, perms, failed, kept = _kron.eigenbases_tree(
        stats, bases, plans, method=method, distribute=o.distribute, tolerance=tol
    )
    nu = _axes.map_leaves(lambda v, plan, perm: _kron.permute_axes(v, perm, plan), plans, nu, perms)
    if tol is None:
        return (bases, nu), failed
    return (bases, nu, _count_kept(o, plans, kept)), failed


def _count_kept(o: _Options, plans: Any, kept: Any) -> jax.Array:
    """The real blocks the refresh criterion kept (int32; an owner layout's padding excluded)."""
    if o.grouped_layout is None:
        return _failure.total(jax.tree.map(lambda k: jnp.sum(k).astype(jnp.int32), kept))
    real = _owner.real_blocks(o.grouped_layout)
    per_group = [
        jnp.sum(k & r).astype(jnp.int32)
        for ks, r in zip(kept["blocks"], real)
        for k in ks
        if k is not None
    ]
    return _failure.total(per_group)


def _update(o: _Options, updates, state, params=None):
    """One SOAP step: accumulate, precondition, refresh the bases for the next step."""
    del params
    h = _Hyper(*_checks.hyperparameters(o.b1, o.b2, o.eps, o.factor_decay, o.damping))
    with jax.named_scope("layerwise_optax.soap"):
        plans = o.resolve(updates)
        count_inc = _kron.increment(state.count)
        stats, bases = _kron.normalize(plans, state.stats), _kron.normalize(plans, state.bases)
        accumulate = functools.partial(_accumulate, o, h)
        acc = _axes.map_leaves(accumulate, plans, updates, state.mu, state.nu, stats, bases)
        precondition = functools.partial(_precondition, h, count_inc)
        new_updates = _axes.map_leaves(precondition, plans, updates, acc, bases)
        # The bases for the next step: exact after the first step, then one
        # power step + QR every `precondition_frequency` steps.
        every = _kron.every(count_inc, o.precondition_frequency)
        tol = (
            None if o.refresh_tolerance is None else _checks.hyperparameters(o.refresh_tolerance)[0]
        )
        if tol is None:
            kept_basis = lambda s, q, v: (q, v)  # noqa: E731
        else:
            kept_basis = lambda s, q, v: (q, v, jnp.zeros([], jnp.int32))  # noqa: E731
        refreshed, failed = _kron.on_schedule(
            jnp.where(state.count == 0, 2, jnp.where(every, 1, 0)),
            [functools.partial(_refresh, o, plans, m, tol) for m in ("qr", "eigh")],
            kept_basis,
            _axes.unzip(acc, "stats"),
            bases,
            _axes.unzip(acc, "nu"),
        )
        bases, nu = refreshed[0], refreshed[1]
        skips = None if tol is None else state.refresh_skips + refreshed[2]
        nu = optax.tree.cast_like(nu, state.nu)
        kept = _factored.stored(o, plans, acc, state, failed)
        bases = _axes.bare(plans, bases)
        return new_updates, ScaleBySoapState(
            count_inc, kept.mu, nu, kept.stats, bases, kept.failures, skips
        )


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
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    factor_estimation: Literal["shampoo", "kl"] = "shampoo",
    damping: jax.typing.ArrayLike = 1e-4,
    refresh_tolerance: jax.typing.ArrayLike | None = None,
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
      state_layout: Where the per-block state (statistics, bases, moments) lives on
        a device mesh: ``'auto'`` (default: the owner layout under a mesh of
        more than one device), ``'owner'`` or ``'replicated'``; see
        :func:`layerwise_optax.scale_by_shampoo`. Static.
      owner_axes: Mesh axes the owner layout shards the block axis over
        (``None``: all of them; a name or a tuple of names); under ``jax.pmap``
        with ``state_layout='owner'``, the pmap's ``axis_name`` (``init`` inside
        the pmap); see :func:`layerwise_optax.scale_by_shampoo`. Static.
      dimension_numbers: Spec tree or callable; ``None``: the default policy
        (vectors and scalars keep the identity basis: plain Adam).
      mu_dtype: Storage dtype of the first moment.
      precond_dtype: Storage dtype of statistics and bases (``None``: float32).
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
      factor_estimation: ``'shampoo'`` (``L_i = EMA(G_(i) G_(i)^T)``, SOAP) or
        ``'kl'`` (KL-SOAP: ``L_i = EMA(G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i)``,
        ``n_i`` the product of the other dimensions, each inverse
        ``Q_j diag(diag(Q_j^T L_j Q_j) + δ_j)^{-1} Q_j^T`` from the stored
        factor and basis; see :func:`soap`). Static.
      damping: With ``'kl'``, the ridge ``δ_j = damping * max eigenvalue
        estimate`` of each inverse, ``>= 0`` (unused with ``'shampoo'``).
      refresh_tolerance: Adaptive refresh criterion (Meta's Distributed Shampoo
        ``tolerance``): ``None`` or ``0`` refreshes every block at every refresh
        (the default); a float in ``[0, 1]`` (may be traced) refreshes a block only
        when ``||B - diag B||_F > refresh_tolerance * ||B||_F`` for its statistic
        in the current basis, ``B = Q^T L Q``, and keeps its basis otherwise
        (counted in the state's ``refresh_skips``). Works with either
        ``factor_estimation``. See :func:`soap`.

    Returns:
      A :class:`optax.GradientTransformation` with state :class:`ScaleBySoapState`.

    Raises:
      ValueError: At construction for out-of-range hyperparameters (also a
        ``refresh_tolerance`` that is not ``None`` or a float in ``[0, 1]``) or an
        unknown ``factor_estimation``; at ``init`` if ``dimension_numbers`` do
        not fit a parameter.
        Also at ``init`` with ``state_layout='owner'`` inside ``jax.pmap``
        without ``owner_axes`` or with one that is not mapped there, or outside
        any mesh and pmap with ``owner_axes``; at ``update`` of a state built
        inside pmap outside a pmap over its axis or over another device count.

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
      Lin et al., `Understanding and Improving Shampoo and SOAP via
      Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025
      (``factor_estimation='kl'``).
    """
    options = _options(dict(locals()))  # every argument above, checked
    return optax.GradientTransformation(
        functools.partial(_factored.owned_init, options, init=_init, factors=("stats",)),
        functools.partial(_factored.owned_update, options, _update, counters=("refresh_skips",)),
    )


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
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    factor_estimation: Literal["shampoo", "kl"] = "shampoo",
    damping: jax.typing.ArrayLike = 1e-4,
    refresh_tolerance: jax.typing.ArrayLike | None = None,
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

    **KL-SOAP** (``factor_estimation='kl'``, Lin et al. 2025) keeps all of the
    above but estimates each factor the KL-Shampoo way (see
    :func:`layerwise_optax.shampoo`), with the other factors' inverses:

    .. math::
      L_i \leftarrow \beta L_i + (1-\beta)\, \frac{1}{n_i}
          G_{(i)} \Big(\bigotimes_{j \ne i} L_j^{-1}\Big) G_{(i)}^\top,
      \qquad L_j^{-1} \approx Q_j\, \mathrm{diag}(λ_j + δ_j)^{-1} Q_j^\top

    with ``n_i`` the product of the other dimensions, ``λ_j = diag(Q_j^T L_j
    Q_j)`` the eigenvalue estimates of the stored factor in its stored basis
    (recomputed every step, the basis only at refreshes; exact right after an
    ``eigh``) and ``δ_j = damping * max λ_j``. Before the first statistics (the
    first step, identity bases) a factor is all zero and its inverse counts as
    the identity, as KL-Shampoo's roots start as the identity, so the first
    statistics are ``G_{(i)} G_{(i)}^\top / n_i``. This is the Kronecker-factored
    second moment closest in KL divergence to the gradients' (for gradients
    ``A^{1/2} Z B^{1/2}`` it tends to ``A ⊗ B`` itself, where Shampoo's factors
    are only proportional to ``A`` and ``B``); the bases follow it, and Adam's
    second moment still sets the step size, so the learning rate is SOAP's.
    Dimensions with a diagonal factor (longer than ``max_precond_dim``) use its
    diagonal as the eigenvalues (identity basis); dimensions without a factor
    are not in the product. ``damping`` (relative, default 1e-4; 1e-4 to 1e-3)
    bounds the inverses of rank-deficient factors: float32 round-off in their
    null space is amplified by up to ``1/damping``. The paper found KL-Shampoo
    the stronger of its two methods (:func:`layerwise_optax.shampoo` with
    ``factor_estimation='kl'``); KL-SOAP is the choice when Adam's second moment
    in the eigenbasis is wanted.

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

    Adaptive refresh (``refresh_tolerance``, Meta's Distributed Shampoo
    ``tolerance``): at each scheduled refresh a block keeps its basis when the
    basis still (nearly) diagonalizes its statistic,

    .. math::
      B = Q^\top L Q, \qquad \text{refresh only if }
      \lVert B - \operatorname{diag} B \rVert_F > \text{tol} \cdot \lVert B \rVert_F ,

    the relative error of ``L ≈ Q diag(B) Q^T``. Kept blocks are counted in the
    state's ``refresh_skips``. The check costs two ``b × b`` matrix products per
    block; a batch of same-sized blocks (the part on one device) none of whose
    blocks needs a refresh skips its QR or ``eigh`` altogether, otherwise the
    whole batch is decomposed and the kept blocks' results discarded (under
    ``jax.vmap`` every batch is decomposed). Values around ``0.01..0.1`` skip
    refreshes once the statistics settle; ``None`` (or 0) is plain SOAP. It
    combines with KL-SOAP: there the criterion also bounds the error of the
    eigen-form inverses, which read ``λ_j = diag B`` in the kept basis and drop
    ``B``'s off-diagonal part.

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
      state_layout: ``'auto'``, ``'owner'`` or ``'replicated'`` (see
        :func:`layerwise_optax.scale_by_soap`).
      owner_axes: Mesh axes of the owner layout (``None``: all).
      dimension_numbers: Per-leaf spec tree or callable; ``None``: default.
      weight_decay: Decoupled weight decay, fixed or a schedule.
      mask: Weight-decay mask (tree or callable).
      mu_dtype: Storage dtype of the first moment.
      precond_dtype: Storage dtype of statistics and bases (``None``: float32).
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
      factor_estimation: ``'shampoo'`` (SOAP's factors, the default) or
        ``'kl'`` (KL-SOAP, see above). Static.
      damping: With ``'kl'``, the relative ridge of each factor inverse,
        ``>= 0`` (default 1e-4; unused with ``'shampoo'``).
      refresh_tolerance: ``None``/``0`` (refresh every block) or the adaptive
        criterion's tolerance in ``[0, 1]`` (see above; may be traced; with
        either ``factor_estimation``).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: At construction if a hyperparameter is out of range (also a
        ``refresh_tolerance`` that is not ``None`` or a float in ``[0, 1]``) or
        ``factor_estimation`` is not ``'shampoo'`` or ``'kl'``; at ``init`` if
        ``dimension_numbers`` do not fit a parameter.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3))}
      >>> tx = lo.soap(learning_rate=3e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> jax.tree.map(jnp.shape, updates)
      {'w': (4, 3)}

      With the adaptive criterion, a statistic that stays diagonal in its basis
      keeps it; here both factors of a diagonal gradient are diagonal from the start:

      >>> tx = lo.soap(learning_rate=3e-3, precondition_frequency=1, refresh_tolerance=0.01)
      >>> state = tx.init(params)
      >>> g = {'w': jnp.eye(4, 3)}
      >>> for _ in range(3):
      ...     _, state = tx.update(g, state, params)
      >>> int(state[0].refresh_skips)  # 2 factors x 3 refreshes
      6

      KL-SOAP: the first statistics are ``G G^T / n`` (identity inverses):

      >>> tx = lo.scale_by_soap(factor_estimation='kl', factor_decay=0.5)
      >>> g = {'w': jnp.array([[2.0, 0.0], [0.0, 1.0]])}
      >>> _, state = tx.update(g, tx.init({'w': jnp.zeros((2, 2))}))
      >>> state.stats['w'][0][0].tolist()
      [[1.0, 0.0], [0.0, 0.25]]

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.
      Lin et al., `Understanding and Improving Shampoo and SOAP via
      Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025
      (KL-SOAP).
      The refresh criterion: Shi et al., `A Distributed Data-Parallel PyTorch
      Implementation of the Distributed Shampoo Optimizer
      <https://arxiv.org/abs/2309.06497>`_, 2023 (its implementation's
      ``EigendecompositionConfig.tolerance``).

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
            state_layout=state_layout,
            owner_axes=owner_axes,
            dimension_numbers=dimension_numbers,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            factor_estimation=factor_estimation,
            damping=damping,
            refresh_tolerance=refresh_tolerance,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
