"""Shampoo: per-axis Kronecker-factored preconditioning with layer-wise grafting."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _failure, _grafting, _kron

_DEFAULT_MAX_PRECOND_DIM = 1024

_STATIC_ARGS = (
    "max_precond_dim",
    "block_size",
    "merge_small_dims",
    "dimension_numbers",
    "grafting",
    "root_exponent",
    "root_method",
    "relative_damping",
    "factor_bias_correction",
    "mu_dtype",
    "precond_dtype",
    "mask",
    "nesterov",
    "factor_estimation",
    "distribute",
)


class ScaleByShampooState(NamedTuple):
    """State for :func:`scale_by_shampoo`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: First moment, same tree and shapes as the params, dtype ``mu_dtype``.
      nu: EMA of squared gradients for ``'adam'``/``'rmsprop'`` grafting (same
        tree as the params, float32 or the param dtype if wider); ``None``
        otherwise.
      stats: Per leaf, a tuple with one factor statistic per view dimension:
        ``(stack, b, b)`` for full factors, ``(stack, b)`` for diagonal ones,
        ``(stack, 0)`` placeholders otherwise (dtype ``precond_dtype``).
      roots: Per leaf, the inverse roots of ``stats`` in the same layout.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs whose gradient was not finite
        and was kept out of every statistic and moment. ``failed``: (block, refresh) pairs whose new root was not
        finite, so that the previous root was kept.

    .. note::
      Memory per leaf: the params-shaped ``mu`` (and ``nu`` with Adam/RMSProp
      grafting), plus for each full factor dimension of block length ``b``,
      ``2 * stack * b**2`` floats (statistic and root), and ``2 * stack * b`` for
      a diagonal one. :meth:`layerwise_optax._axes.LeafPlan.state_floats` gives
      the per-set figure.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates | None
    stats: optax.Updates
    roots: optax.Updates
    failures: _failure.FailureCounts


def kl_axis_stats(
    g: jax.Array, roots: tuple[jax.Array, ...], plan: _axes.LeafPlan, root: int
) -> tuple[jax.Array, ...]:
    """KL-Shampoo's per-axis statistics ``G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i``.

    The other factors' inverses come from the stored roots ``L_j^{-1/root}``:
    ``L_j^{-1/2}`` is the root raised to ``root / 2`` (``root`` even), applied to
    every axis but ``i`` before the usual contraction. This is the fixed-point
    (flip-flop) update of the Kronecker-factored Gaussian that is closest in KL
    divergence to the gradient's second moment (Lin et al. 2025): for gradients
    ``A^{1/2} Z B^{1/2}`` with white ``Z`` it settles at ``L_1 ⊗ L_2 = A ⊗ B``.
    """
    half = root // 2
    halves = []
    for kind, r in zip(plan.kinds, roots):
        if kind == "full":
            m = r
            for _ in range(half - 1):
                m = jnp.matmul(m, r, precision=_kron.HIGHEST)
            halves.append(m.astype(g.dtype))
        elif kind == "diag":
            halves.append((r**half).astype(g.dtype))
        else:
            halves.append(r)
    out = []
    for i, kind in enumerate(plan.kinds):
        if kind == "none":
            out.append(jnp.zeros((plan.stack, 0), g.dtype))
            continue
        x = _kron.apply_axis_matrices(g, tuple(halves), plan, skip=i)
        n_other = max(1, math.prod(plan.blocks) // plan.blocks[i])
        out.append(_kron.axis_stats(x, plan)[i] / n_other)
    return tuple(out)


class _LeafOut(NamedTuple):
    update: jax.Array
    mu: jax.Array
    nu: Any
    stats: Any
    ok: jax.Array  # bool scalar: the gradient leaf was finite


def scale_by_shampoo(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    factor_decay: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 1e-6,
    precondition_frequency: jax.typing.ArrayLike = 10,
    start_preconditioning_step: jax.typing.ArrayLike = 1,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    merge_small_dims: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    grafting: Literal["adam", "rmsprop", "sgd", "none"] = "adam",
    root_exponent: int | None = None,
    root_method: Literal["eigh", "newton"] = "eigh",
    relative_damping: bool = True,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    factor_estimation: Literal["shampoo", "kl"] = "shampoo",
    distribute: bool = True,
    factor_bias_correction: bool = False,
) -> optax.GradientTransformation:
    """Scales updates by Shampoo's per-axis inverse roots; see :func:`shampoo`.

    Args:
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay of the graft method, in ``[0, 1)``.
      eps: Added to the graft method's root second moment.
      factor_decay: EMA decay of the factor statistics, in ``(0, 1]``; ``1``
        accumulates a running sum (classic Shampoo).
      damping: Ridge added before each root; relative to each factor's largest
        eigenvalue when ``relative_damping``, else absolute.
      precondition_frequency: Steps between root refreshes, an int ``>= 1``
        (may be traced: the refresh test is ``count % precondition_frequency == 0``).
      start_preconditioning_step: Steps that use the graft method's update alone
        before Shampoo's direction is used, an int ``>= 0`` (may be traced).
      max_precond_dim: Factor dimensions longer than this get diagonal factors
        (static; ``None``: 1024).
      block_size: Split factor dimensions longer than this into blocks (static).
      merge_small_dims: Let the default policy merge small adjacent axes.
      dimension_numbers: Spec tree or callable (see
        :class:`layerwise_optax.DimensionNumbers`); ``None`` is the default policy.
      grafting: ``'adam'``, ``'rmsprop'``, ``'sgd'`` or ``'none'``.
      root_exponent: ``p`` of the inverse root ``L^{-1/p}`` applied to each factor;
        ``None`` uses ``2k`` for a leaf with ``k`` factors (``L^{-1/4} G R^{-1/4}``
        for a matrix).
      root_method: ``'eigh'`` or ``'newton'`` (coupled Newton, warm-started).
      relative_damping: Whether ``damping`` scales with the largest eigenvalue.
      factor_bias_correction: Take roots of the bias-corrected EMA,
        ``(L_t / (1 - factor_decay^t) + damping I)^{-1/p}`` (Meta's Distributed
        Shampoo), instead of ``(L_t + damping I)^{-1/p}`` (default ``False``;
        see :func:`shampoo`). Static.
      mu_dtype: Storage dtype of the first moment (``None``: the param dtype).
      precond_dtype: Storage dtype of statistics and roots (``None``: float32).
      nesterov: Use Nesterov (NAdam-style) momentum.
      factor_estimation: ``'shampoo'`` (``L_i = EMA(G_(i) G_(i)^T)``) or ``'kl'``
        (KL-Shampoo: ``L_i = EMA(G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i)`` with
        ``n_i`` the product of the other dimensions and the ``L_j^{-1}`` from the
        last refresh; roots ``L_i^{-1/2}`` unless ``root_exponent`` says
        otherwise; see :func:`shampoo`).
      distribute: Under a mesh set with :func:`jax.set_mesh`, split the refresh
        (same-sized blocks of all leaves batched together) over all its devices,
        each block computed on one device and the roots gathered; no effect
        without a mesh. The result is the same either way.

    Returns:
      A :class:`optax.GradientTransformation` with state
      :class:`ScaleByShampooState`.

    Raises:
      ValueError: At construction for out-of-range hyperparameters; at ``init`` if
        ``dimension_numbers`` do not fit a parameter (naming its path).

    Examples:
      One step without momentum, grafting or accumulation: the factors are
      ``G G^T`` and ``G^T G``, so ``L^{-1/4} G R^{-1/4}`` is the polar factor
      ``U V^T`` of ``G = U S V^T`` (the direction Muon approximates):

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.zeros((2, 2))}
      >>> grads = {'w': jnp.array([[0.0, 2.0], [0.5, 0.0]])}
      >>> tx = lo.scale_by_shampoo(b1=0.0, grafting='none', factor_bias_correction=True,
      ...                          start_preconditioning_step=0)
      >>> updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
      >>> [[round(v, 3) for v in row] for row in updates['w'].tolist()]
      [[0.0, 1.0], [1.0, 0.0]]

    References:
      Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
      Optimization <https://arxiv.org/abs/1802.09568>`_, 2018.
      Lin et al., Understanding and Improving Shampoo and SOAP via
      Kullback-Leibler Minimization, 2025 (``factor_estimation='kl'``).
    """
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    _checks.in_unit_interval("b1", b1)
    _checks.in_unit_interval("b2", b2)
    _checks.non_negative("eps", eps)
    _checks.in_unit_interval("factor_decay", factor_decay, right_closed=True)
    _checks.positive("factor_decay", factor_decay)
    _checks.non_negative("damping", damping)
    _checks.traceable_int("precondition_frequency", precondition_frequency, minimum=1)
    _checks.traceable_int("start_preconditioning_step", start_preconditioning_step, minimum=0)
    _checks.positive_int("max_precond_dim", max_precond_dim, allow_none=True)
    max_precond_dim = _DEFAULT_MAX_PRECOND_DIM if max_precond_dim is None else max_precond_dim
    _checks.positive_int("block_size", block_size, allow_none=True)
    _checks.boolean("merge_small_dims", merge_small_dims)
    _checks.one_of("grafting", grafting, _grafting.GRAFTING)
    _checks.positive_int("root_exponent", root_exponent, allow_none=True)
    _checks.one_of("root_method", root_method, ("eigh", "newton"))
    _checks.boolean("relative_damping", relative_damping)
    _checks.boolean("factor_bias_correction", factor_bias_correction)
    _checks.boolean("nesterov", nesterov)
    _checks.one_of("factor_estimation", factor_estimation, ("shampoo", "kl"))
    _checks.boolean("distribute", distribute)
    if factor_estimation == "kl" and root_exponent is not None and root_exponent % 2:
        raise ValueError(
            f"root_exponent must be even with factor_estimation='kl' (the statistics "
            f"use L^(-1/2) = root^(p/2)), got {root_exponent}."
        )
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    precond_dtype = _checks.canonicalize_dtype(precond_dtype, "precond_dtype") or jnp.float32
    resolve = functools.partial(
        _axes.resolve,
        dimension_numbers,
        max_precond_dim=max_precond_dim,
        block_size=block_size,
        merge_small_dims=merge_small_dims,
    )
    use_nu = _grafting.needs_second_moment(grafting)

    def nu_dtype(p):
        return jnp.promote_types(p.dtype, jnp.float32)

    def init_fn(params):
        plans = resolve(params)
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=jax.tree.map(lambda p: jnp.zeros(p.shape, nu_dtype(p)), params) if use_nu else None,
            stats=_kron.init_factor_tree(plans, params, precond_dtype),
            roots=_kron.init_factor_tree(plans, params, precond_dtype, identity=True),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        # One arithmetic for plain and injected hyperparameters (float32 first).
        b1_, b2_, eps_, decay_, damping_ = _checks.hyperparameters(
            b1, b2, eps, factor_decay, damping
        )
        with jax.named_scope("layerwise_optax.shampoo"):
            plans = resolve(updates)
            count_inc = optax.safe_increment(state.count)
            state_stats = _kron.normalize(plans, state.stats)
            state_roots = _kron.normalize(plans, state.roots)

            def accumulate(g, plan, mu, nu, stats, roots):
                ok, g32 = _failure.guard(g)
                blocks = plan.to_blocks(g32)
                if factor_estimation == "kl":
                    new = kl_axis_stats(blocks, roots, plan, root_exponent or 2)
                else:
                    new = _kron.axis_stats(blocks, plan)
                # A valid gradient has finite plain statistics; KL's go through the
                # roots and can still overflow. (A running sum, factor_decay=1, that
                # overflows later shows up as failed refreshes, the roots kept.)
                ok = ok & _kron.all_finite(new)
                mu_new = jnp.where(ok, b1_ * mu + (1 - b1_) * g32, mu)
                nu_new = None if nu is None else jnp.where(ok, b2_ * nu + (1 - b2_) * g32**2, nu)
                stats = _kron.ema(stats, new, decay_, valid=ok)
                return _LeafOut(g32, mu_new, nu_new, stats, ok)

            nus = state.nu if use_nu else jax.tree.map(lambda _: None, updates)
            out = _axes.map_leaves(
                accumulate, plans, updates, state.mu, nus, state_stats, state_roots
            )
            g32s, mus = _axes.unzip(out, "update"), _axes.unzip(out, "mu")
            stats = _axes.unzip(out, "stats")
            new_nu = _axes.unzip(out, "nu") if use_nu else None
            oks = _axes.unzip(out, "ok")
            skipped = sum((~ok).astype(jnp.int32) for ok in jax.tree.leaves(oks))
            skipped = jnp.asarray(skipped, jnp.int32)

            def refresh(stats, roots):
                if factor_bias_correction:
                    # Roots of L_t / (1 - beta^t): the EMA starts at zero, so its
                    # weights sum to 1 - beta^t (t counts steps, skipped ones too).
                    # 1 - beta^t as -expm1(t log beta): no cancellation for beta near 1.
                    t = count_inc.astype(jnp.float32)
                    corr = jnp.where(decay_ == 1.0, 1.0, -1.0 / jnp.expm1(t * jnp.log(decay_)))
                    stats = jax.tree.map(lambda s: s * corr.astype(s.dtype), stats)

                def root_of(plan):
                    default = 2 if factor_estimation == "kl" else 2 * max(plan.num_factors, 1)
                    return root_exponent or default

                # Same-sized blocks of all leaves in one batch each, split over the
                # devices of the mesh when there is one.
                return _kron.inverse_roots_tree(
                    stats,
                    roots,
                    plans,
                    root=root_of,
                    damping=damping_,
                    relative_damping=relative_damping,
                    method=root_method,
                    distribute=distribute,
                )

            roots, failed = jax.lax.cond(
                _kron.every(state.count, precondition_frequency),
                refresh,
                lambda s, r: (r, jnp.zeros([], jnp.int32)),
                stats,
                state_roots,
            )
            use_precond = state.count >= start_preconditioning_step

            def direction(g, plan, ok, g32, mu, nu, roots):
                m_hat = _grafting.bias_corrected_first_moment(
                    mu.astype(g32.dtype), g32, b1_, count_inc, nesterov
                )
                diag = _grafting.graft_update(grafting, m_hat, nu, b2_, eps_, count_inc)
                if plan.is_preconditioned:
                    pb = _kron.apply_axis_matrices(plan.to_blocks(m_hat), roots, plan)
                    if grafting != "none":
                        pb = _grafting.graft_blocks(pb, plan.block_sum_squares(diag))
                    upd = jnp.where(use_precond, plan.from_blocks(pb), diag)
                else:
                    upd = diag
                return jnp.where(ok, upd, 0).astype(g.dtype)

            new_updates = _axes.map_leaves(
                direction, plans, updates, oks, g32s, mus, new_nu if use_nu else nus, roots
            )
            return new_updates, ScaleByShampooState(
                count=count_inc,
                mu=optax.tree.cast(mus, mu_dtype)
                if mu_dtype is not None
                else optax.tree.cast_like(mus, state.mu),
                nu=new_nu,
                stats=_axes.bare(plans, stats),
                roots=_axes.bare(plans, roots),
                failures=_failure.add(state.failures, skipped=skipped, failed=failed),
            )

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    factor_decay: jax.typing.ArrayLike = 0.999,
    damping: jax.typing.ArrayLike = 1e-6,
    precondition_frequency: jax.typing.ArrayLike = 10,
    start_preconditioning_step: jax.typing.ArrayLike = 1,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    merge_small_dims: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    grafting: Literal["adam", "rmsprop", "sgd", "none"] = "adam",
    root_exponent: int | None = None,
    root_method: Literal["eigh", "newton"] = "eigh",
    relative_damping: bool = True,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    factor_estimation: Literal["shampoo", "kl"] = "shampoo",
    distribute: bool = True,
    factor_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo: per-axis Kronecker-factored preconditioning (Gupta et al., 2018).

    Each parameter is viewed as a tensor with axes ``d_1..d_k`` (see
    :class:`layerwise_optax.DimensionNumbers`; the default merges small axes, so a
    conv kernel is a matrix). Each axis keeps an EMA of its gradient covariance
    and the first moment is preconditioned on every axis:

    .. math::
      L^{(i)}_t = \beta L^{(i)}_{t-1} + (1-\beta)\, G_{(i)} G_{(i)}^\top, \qquad
      U = \hat m \times_1 (L^{(1)} + \delta I)^{-1/p} \cdots
          \times_k (L^{(k)} + \delta I)^{-1/p}

    with ``p = 2k`` by default (``L^{-1/4} M R^{-1/4}`` for a matrix) or
    ``root_exponent``. Roots are recomputed every ``precondition_frequency`` steps
    (inside ``lax.cond``). With grafting, each block of ``U`` is rescaled to the
    norm of the graft method's update (Adam by default), which fixes the
    step size per layer so that Adam's learning rates transfer. Leaves without
    factors (scalars, vectors by default) and all leaves before
    ``start_preconditioning_step`` take the graft method's update. Axes longer
    than ``max_precond_dim`` get a diagonal factor; with ``block_size``, long
    axes are split into blocks with their own factors (Distributed Shampoo).

    **KL-Shampoo** (``factor_estimation='kl'``, Lin et al. 2025) estimates each
    factor with the others' inverses, ``L^{(i)} = EMA(G_{(i)} (⊗_{j≠i}
    L^{(j)})^{-1} G_{(i)}^T / n_i)``: the Kronecker-factored second moment
    closest in KL divergence to the gradients' (for gradients ``A^{1/2} Z
    B^{1/2}`` it is ``A ⊗ B`` exactly, where Shampoo's factors are only
    proportional to ``A`` and ``B``). Its preconditioner ``(⊗ L^{(i)})^{-1/2}``
    then has the right overall scale, so it needs no grafting: use it with
    ``grafting='none'`` and an Adam-like learning rate. Give it ``damping`` of
    1e-4 or more: its statistics use the factors' *inverses*, which amplify
    float32 round-off as ``1/damping``, so the default 1e-6 lets the first,
    rank-deficient statistics blow up.

    **Bias correction of the factors.** The EMAs start at zero, so after ``t``
    steps their weights sum to ``1 - β^t``. By default the roots are taken of
    ``L_t + δI`` as written above; ``factor_bias_correction=True`` takes them of
    ``L_t / (1 - β^t) + δI``, as Meta's Distributed Shampoo does (its
    ``use_bias_correction``, on there by default; tested against its formula).
    With the default relative damping the two differ only by a positive scalar
    per factor, which grafting removes, so the default update is the same either
    way (for ``factor_estimation='shampoo'``; KL-Shampoo's statistics use the
    roots, so there the correction always changes the update); with absolute damping (``relative_damping=False``) the uncorrected form
    damps the early steps more (``δ`` against factors that are ``1 - β^t`` times
    too small: with the other defaults and ``δ = 1e-3``, 33% off Meta's update
    at the first step and 17% at the second on the tests' gradients),
    and with ``grafting='none'`` its early updates are ``(1 - β^t)^{-k/p}``
    times larger. Set it when porting settings from Meta's implementation or
    using absolute damping. The default stays ``False`` so that existing
    configurations keep their updates.

    Weight decay is decoupled and multiplied by the learning rate, as in
    :func:`optax.adamw`.

    Where to use it / what to tune: hidden matrices and conv kernels of networks
    whose gradients have strongly correlated rows/columns (ill-conditioned
    inputs, deep nets). Start from your AdamW learning rate (Adam grafting keeps
    the update size), then tune ``precondition_frequency`` (cost vs freshness),
    ``block_size`` (memory and refresh cost grow as ``b^2`` and ``b^3``) and
    ``damping``.

    Args:
      learning_rate: A global scaling factor, fixed or a schedule.
      b1: First-moment decay, in ``[0, 1)``.
      b2: Second-moment decay of the graft method, in ``[0, 1)``.
      eps: Added to the graft method's root second moment.
      factor_decay: EMA decay of factor statistics, in ``(0, 1]`` (``1``: sum).
      damping: Ridge added before roots (relative by default, see
        ``relative_damping``).
      precondition_frequency: Steps between root refreshes (may be traced).
      start_preconditioning_step: Steps of graft-only updates first (may be
        traced).
      max_precond_dim: Longer factor dimensions get diagonal factors (static;
        ``None``: 1024).
      block_size: Block length for long axes, ``None`` for no blocking (static).
      merge_small_dims: Merge small adjacent axes in the default policy.
      dimension_numbers: Per-leaf spec tree or callable; ``None``: default.
      grafting: ``'adam'``, ``'rmsprop'``, ``'sgd'`` or ``'none'``.
      root_exponent: Root order ``p`` for every factor; ``None``: ``2k``.
      root_method: ``'eigh'`` or ``'newton'``.
      relative_damping: ``damping`` relative to each factor's largest eigenvalue
        (default) or absolute.
      factor_bias_correction: Divide each factor EMA by ``1 - factor_decay^t``
        before damping and the root (static; default ``False``; see above).
      weight_decay: Decoupled weight decay, fixed or a schedule.
      mask: Weight-decay mask (tree or callable), as in :func:`optax.adamw`.
      mu_dtype: Storage dtype of the first moment.
      precond_dtype: Storage dtype of statistics and roots (``None``: float32).
      nesterov: Nesterov momentum.
      factor_estimation: ``'shampoo'`` or ``'kl'`` (KL-Shampoo; roots default to
        ``L^{-1/2}``).
      distribute: Spread the refresh over the mesh's devices (see
        :func:`scale_by_shampoo`).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: At construction if a hyperparameter is out of range; at ``init``
        if ``dimension_numbers`` do not fit a parameter.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> tx = lo.shampoo(learning_rate=1e-2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> jax.tree.map(jnp.shape, updates)
      {'b': (3,), 'w': (4, 3)}

    References:
      Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
      Optimization <https://arxiv.org/abs/1802.09568>`_, 2018.
      Anil et al., `Scalable Second Order Optimization for Deep Learning
      <https://arxiv.org/abs/2002.09018>`_, 2020.
      Lin et al., Understanding and Improving Shampoo and SOAP via
      Kullback-Leibler Minimization, 2025 (KL-Shampoo).

    .. seealso:: :func:`layerwise_optax.soap`, :func:`layerwise_optax.scale_by_shampoo`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    return optax.chain(
        scale_by_shampoo(
            b1=b1,
            b2=b2,
            eps=eps,
            factor_decay=factor_decay,
            damping=damping,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_precond_dim=max_precond_dim,
            block_size=block_size,
            merge_small_dims=merge_small_dims,
            dimension_numbers=dimension_numbers,
            grafting=grafting,
            root_exponent=root_exponent,
            root_method=root_method,
            factor_estimation=factor_estimation,
            distribute=distribute,
            relative_damping=relative_damping,
            factor_bias_correction=factor_bias_correction,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            nesterov=nesterov,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
