"""PSGD-Kron (Li 2018, 2024): Kronecker-factored preconditioners fitted on a Lie group.

Each leaf's preconditioner is ``P = Q^T Q`` with ``Q = Q_1 ⊗ ... ⊗ Q_k``, one
factor per view dimension of the shared per-axis plan: upper triangular for
dimensions up to ``max_precond_dim``, diagonal above it (or everywhere in
``memory_save_mode='all_diag'``). ``P`` is fitted so that preconditioned
gradients are white, ``P E[g g^T] P = E[v v^T] = I`` (``P ≈ E[g g^T]^{-1/2}``,
Adagrad/Shampoo's target, without any matrix root), by a step on the group of
triangular matrices from one gradient and one Gaussian probe ``v``:

    A = Q ⋅ g,        B = Q^{-T} ⋅ v                 (per axis: Q_i, Q_i^{-T})
    Q_i <- Q_i - lr / ||A_(i)A_(i)^T + B_(i)B_(i)^T||
                 * triu(A_(i)A_(i)^T - B_(i)B_(i)^T) Q_i

where ``X_(i)X_(i)^T`` contracts every axis but ``i`` and the norm is a cheap
lower bound of the spectral norm (:func:`layerwise_optax.linalg.
spectral_norm_lower_bound`), which makes the step scale free. At the fixed point
``A_(i)A_(i)^T = B_(i)B_(i)^T`` on average, i.e. ``P`` whitens ``g``. For a
quadratic whose "gradients" are Hessian-vector products of Gaussian probes,
``P -> H^{-1}`` (tested).

The fit costs a triangular solve and a few matmuls per factor, so it runs with
probability ``precond_update_prob`` each step (a schedule: every step early,
rarely later); the PRNG key lives in the state, so a run is deterministic given
``seed`` (an int, or a traced integer under ``optax.inject_hyperparams``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _distribute, _failure, _grafting, _kron, _linalg

_STATIC_ARGS = (
    "max_precond_dim",
    "memory_save_mode",
    "dimension_numbers",
    "merge_small_dims",
    "mu_dtype",
    "precond_dtype",
    "mask",
    "precond_update_prob",
    "nesterov",
    "distribute",
)
_MEMORY_MODES = (None, "one_diag", "all_diag")


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 500
) -> Callable[[jax.Array], jax.Array]:
    """``p(t) = clip(max_prob * exp(-decay * (t - flat_start)), min_prob, max_prob)``.

    Every step for the first ``flat_start`` steps (where the fit matters most),
    then exponentially rarer down to ``min_prob`` (the default reaches 3% after
    ~4000 steps).

    Args:
      max_prob: Probability during the flat start.
      min_prob: Floor of the probability.
      decay: Exponential decay rate per step after ``flat_start``.
      flat_start: Steps at ``max_prob``.

    Returns:
      A schedule ``count -> probability`` (float32 scalar).

    Examples:
      >>> import layerwise_optax as lo
      >>> schedule = lo.precond_update_prob_schedule()
      >>> [round(float(schedule(t)), 3) for t in (0, 500, 1500, 10_000)]
      [1.0, 1.0, 0.368, 0.03]

    References:
      Li, `Stochastic Hessian Fittings with Lie Groups
      <https://arxiv.org/abs/2402.11858>`_, 2024 (psgd-jax's default schedule).
    """
    _checks.in_unit_interval("max_prob", max_prob, right_closed=True)
    _checks.in_unit_interval("min_prob", min_prob, right_closed=True)
    _checks.non_negative("decay", decay)
    _checks.non_negative_int("flat_start", flat_start)
    if _checks._is_number(min_prob) and _checks._is_number(max_prob) and min_prob > max_prob:
        raise ValueError(f"min_prob ({min_prob}) must not exceed max_prob ({max_prob}).")

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        p = max_prob * jnp.exp(-decay * (t - flat_start))
        return jnp.clip(p, min_prob, max_prob)

    return schedule


class ScaleByPsgdKronState(NamedTuple):
    """State for :func:`scale_by_psgd_kron`.

    Attributes:
      count: int32 scalar, steps so far.
      mu: Momentum, params tree (``mu_dtype``).
      q: Per leaf, one factor per view dimension: ``(stack, b, b)`` upper
        triangular, ``(stack, b)`` diagonal, or an empty placeholder
        (``precond_dtype``).
      key: PRNG key for the coin and the probes.
      precond_updates: int32 scalar, steps on which ``q`` was fitted.
      failures: :class:`~layerwise_optax._failure.FailureCounts` (the failure
        policy's counters). ``skipped``: (leaf, step) pairs with an invalid (non-finite)
        gradient, kept out of the momentum and the fit; the update is zero there. ``failed``: (leaf, fit) pairs whose fitted factors were not
        finite, so the previous factors were kept.
    """

    count: jax.Array
    mu: optax.Updates
    q: Any
    key: jax.Array
    precond_updates: jax.Array
    failures: _failure.FailureCounts


class _Moment(NamedTuple):
    ok: Any
    mu: Any
    m_hat: Any


def _solve_axis(q: jax.Array, x: jax.Array, i: int, kind: str) -> jax.Array:
    """Applies ``Q_i^{-T}`` on axis ``1 + i`` of a block view."""
    if kind == "diag":
        shape = [1] * x.ndim
        shape[0], shape[1 + i] = q.shape[0], q.shape[1]
        return x / jnp.reshape(q, shape)
    moved = jnp.moveaxis(x, 1 + i, 1)
    flat = jnp.reshape(moved, moved.shape[:2] + (-1,))
    # Q^T X = V with Q upper triangular: Q^T is lower triangular.
    sol = jax.scipy.linalg.solve_triangular(q, flat, trans="T", lower=False)
    return jnp.moveaxis(jnp.reshape(sol, moved.shape), 1, 1 + i)


def fit_factors(
    q: tuple[jax.Array, ...],
    g: jax.Array,
    v: jax.Array,
    plan: _axes.LeafPlan,
    lr: jax.Array,
) -> tuple[jax.Array, ...]:
    """One Lie-group step of every factor of a leaf (see the module docstring).

    Args:
      q: The leaf's factors (float32).
      g: Gradient block view ``(stack, b_1..b_k)``.
      v: Gaussian probe of the same shape.
      plan: The leaf's plan.
      lr: Preconditioner step size.

    Returns:
      The new factors (not yet checked for finiteness).
    """
    # Default matmul precision (TF32 on GPUs, as psgd-jax): the fit is stochastic
    # and HIGHEST costs ~1.5x on CPU.
    a = _kron.apply_axis_matrices(g, q, plan, precision=None)
    b = v
    for i, (kind, qi) in enumerate(zip(plan.kinds, q)):
        if kind != "none":
            b = _solve_axis(qi, b, i, kind)
    aa = _kron.axis_stats(a, plan, precision=None)
    bb = _kron.axis_stats(b, plan, precision=None)
    out = []
    for kind, qi, t1, t2 in zip(plan.kinds, q, aa, bb):
        if kind == "full":
            bound = _linalg.spectral_norm_lower_bound(t1 + t2)
            step = jnp.triu(t1 - t2) / (bound[:, None, None] + 1e-30)
            out.append(qi - lr * jnp.matmul(step, qi))
        elif kind == "diag":
            bound = jnp.max(jnp.abs(t1 + t2), axis=-1, keepdims=True)
            out.append(qi - lr * (t1 - t2) / (bound + 1e-30) * qi)
        else:
            out.append(qi)
    return tuple(out)


def balance(q: tuple[jax.Array, ...], plan: _axes.LeafPlan) -> tuple[jax.Array, ...]:
    """Rescales the factors of each block to equal max-abs (their product unchanged).

    ``Q_1 ⊗ Q_2 = (c Q_1) ⊗ (Q_2 / c)``: the fit does not see this freedom, so one
    factor can drift large and another small; balancing keeps both well inside
    float range.
    """
    idx = [i for i, k in enumerate(plan.kinds) if k != "none"]
    if len(idx) < 2:
        return q
    maxes = [jnp.max(jnp.abs(jnp.reshape(q[i], (q[i].shape[0], -1))), axis=1) for i in idx]
    logs = jnp.log(jnp.maximum(jnp.stack(maxes), 1e-30))
    target = jnp.mean(logs, axis=0)
    out = list(q)
    for j, i in enumerate(idx):
        f = jnp.exp(target - logs[j])
        out[i] = q[i] * jnp.reshape(f, (-1,) + (1,) * (q[i].ndim - 1))
    return tuple(out)


def precondition(g: jax.Array, q: tuple[jax.Array, ...], plan: _axes.LeafPlan) -> jax.Array:
    """``P g = Q^T Q g`` on a block view."""
    qg = _kron.apply_axis_matrices(g, q, plan, precision=None)
    return _kron.apply_axis_matrices(qg, q, plan, transpose=True, precision=None)


def _psgd_dimension_numbers(shape, *, max_precond_dim, merge_small_dims):
    spec = _axes.default_dimension_numbers(
        shape, max_precond_dim=max_precond_dim, merge_small_dims=merge_small_dims
    )
    if spec is None and len(shape) >= 1 and math.prod(shape) > 1:
        # Vectors (and (1, n) leaves) get one factor over the whole leaf.
        return _axes.DimensionNumbers((tuple(range(len(shape))),))
    return spec


def scale_by_psgd_kron(
    b1: jax.typing.ArrayLike = 0.9,
    precond_lr: jax.typing.ArrayLike = 0.1,
    precond_init_scale: jax.typing.ArrayLike = 1.0,
    precond_update_prob: float | Callable[[jax.Array], jax.Array] | None = None,
    max_precond_dim: int | None = None,
    memory_save_mode: str | None = None,
    *,
    nesterov: bool = False,
    clip_rms: jax.typing.ArrayLike | None = 1.1,
    seed: jax.typing.ArrayLike = 0,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    merge_small_dims: bool = False,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    """PSGD-Kron's preconditioning of the momentum; see :func:`psgd_kron`.

    Args:
      b1: Momentum decay in ``[0, 1)`` (bias-corrected); the preconditioner is
        fitted on the momentum, as in psgd-jax's default.
      precond_lr: Step size of the factor fit, in ``(0, 1]``.
      precond_init_scale: ``P`` starts as this times the identity.
      precond_update_prob: Probability of fitting on a step: a float or a
        schedule ``count -> prob`` (static); default
        :func:`precond_update_prob_schedule`.
      max_precond_dim: Dimensions longer than this get diagonal factors (static;
        ``None``: 8192).
      memory_save_mode: ``None``; ``'one_diag'`` (each leaf's longest dimension
        diagonal; ties all diagonal); ``'all_diag'`` (every factor diagonal).
      nesterov: Nesterov momentum.
      clip_rms: Scale each leaf's preconditioned update down to at most this RMS
        (a trust region against a poorly fitted early ``P``); ``None``: off
        (static), a number may be traced.
      seed: Seed of the state's PRNG key, an int (may be traced).
      distribute: Under a mesh set with :func:`jax.set_mesh`, batch the fits of
        leaves with the same block layout and split them over its devices (each
        block fitted on one device); no effect without a mesh.
      dimension_numbers: Spec tree or callable (see
        :class:`layerwise_optax.DimensionNumbers`); default: one factor per axis,
        vectors one factor, scalars none (momentum only).
      merge_small_dims: Merge small adjacent axes in the default policy.
      mu_dtype: Momentum storage dtype.
      precond_dtype: Factor storage dtype (default float32).

    Returns:
      A :class:`optax.GradientTransformation` with state
      :class:`ScaleByPsgdKronState`.

    Raises:
      ValueError: At construction for a hyperparameter out of range (see
        :func:`psgd_kron`); at ``init`` if ``dimension_numbers`` do not fit a
        parameter (naming its path).

    Examples:
      ``P = Q^T Q`` starts as ``precond_init_scale`` times the identity, so on a
      step that does not fit the first update is that multiple of the
      (bias-corrected) momentum:

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((3, 2))}
      >>> tx = lo.scale_by_psgd_kron(precond_update_prob=0.0, precond_init_scale=0.5)
      >>> updates, state = jax.jit(tx.update)({'w': jnp.ones((3, 2))}, tx.init(params), params)
      >>> [[round(v, 5) for v in row] for row in updates['w'].tolist()]
      [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]

    References:
      Li, `Preconditioned Stochastic Gradient Descent
      <https://arxiv.org/abs/1512.04202>`_, IEEE TNNLS, 2018.
      Li, `Stochastic Hessian Fittings with Lie Groups
      <https://arxiv.org/abs/2402.11858>`_, 2024.
    """
    if dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", dimension_numbers)
    _checks.in_unit_interval("b1", b1)
    _checks.traceable_int("seed", seed)
    _checks.boolean("distribute", distribute)
    _checks.positive("precond_lr", precond_lr)
    _checks.in_unit_interval("precond_lr", precond_lr, right_closed=True)
    _checks.positive("precond_init_scale", precond_init_scale)
    _checks.positive_int("max_precond_dim", max_precond_dim, allow_none=True)
    max_precond_dim = 8192 if max_precond_dim is None else max_precond_dim
    if memory_save_mode not in _MEMORY_MODES:
        raise ValueError(
            f"Unknown memory_save_mode {memory_save_mode!r}; expected one of {_MEMORY_MODES}."
        )
    _checks.boolean("nesterov", nesterov)
    _checks.boolean("merge_small_dims", merge_small_dims)
    if clip_rms is not None:
        _checks.positive("clip_rms", clip_rms)
    if precond_update_prob is None:
        precond_update_prob = precond_update_prob_schedule()
    elif not callable(precond_update_prob):
        _checks.in_unit_interval("precond_update_prob", precond_update_prob, right_closed=True)
    mu_dtype = _checks.canonicalize_dtype(mu_dtype, "mu_dtype")
    precond_dtype = _checks.canonicalize_dtype(precond_dtype, "precond_dtype") or jnp.float32
    if dimension_numbers is None:

        def dimension_numbers(tree):
            return jax.tree.map(
                lambda x: (
                    None
                    if _axes.is_masked(x)
                    else _psgd_dimension_numbers(
                        tuple(x.shape),
                        max_precond_dim=max_precond_dim,
                        merge_small_dims=merge_small_dims,
                    )
                ),
                tree,
                is_leaf=_axes.is_masked,
            )

    def plans_for(tree):
        plans = _axes.resolve(
            dimension_numbers,
            tree,
            max_precond_dim=max_precond_dim,
            block_size=None,
            merge_small_dims=merge_small_dims,
        )
        if memory_save_mode is None:
            return plans

        def relimit(plan):
            if _axes.is_masked(plan) or plan.spec is None:
                return plan
            limit = 0
            if memory_save_mode == "one_diag" and len(plan.dims) > 1:
                limit = max(plan.dims) - 1
            return _axes.make_plan(
                plan.shape, plan.spec, max_precond_dim=min(limit, max_precond_dim), block_size=None
            )

        return jax.tree.map(relimit, plans, is_leaf=_axes.is_plan_leaf)

    def init_q(x, plan):
        k = max(plan.num_factors, 1)
        scale = jnp.asarray(precond_init_scale, jnp.float32) ** (0.5 / k)  # P = Q^T Q
        return tuple(f * scale for f in _kron.init_factors(plan, precond_dtype, identity=True))

    def init_fn(params):
        plans = plans_for(params)
        return ScaleByPsgdKronState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            q=_axes.bare(plans, _axes.map_leaves(init_q, plans, params)),  # see _axes.bare
            key=jax.random.key_data(jax.random.key(seed)),
            precond_updates=jnp.zeros([], jnp.int32),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None):
        del params
        with jax.named_scope("layerwise_optax.psgd_kron"):
            plans = plans_for(updates)
            count_inc = optax.safe_increment(state.count)
            # One arithmetic for plain and injected hyperparameters (float32 first).
            b1_, lr_ = _checks.hyperparameters(b1, precond_lr)
            clip_ = None if clip_rms is None else _checks.hyperparameters(clip_rms)[0]
            q_state = _kron.normalize(plans, state.q)
            key = jax.random.wrap_key_data(state.key)
            key, coin_key, probe_key = jax.random.split(key, 3)
            prob = (
                precond_update_prob(state.count)
                if callable(precond_update_prob)
                else precond_update_prob
            )
            do_fit = jax.random.uniform(coin_key) < prob

            n_leaves = len(jax.tree.leaves(plans, is_leaf=_axes.is_plan_leaf))
            keys = iter(jax.random.split(probe_key, max(n_leaves, 1)))
            probe_keys = jax.tree.map(
                lambda p: p if _axes.is_masked(p) else next(keys), plans, is_leaf=_axes.is_plan_leaf
            )

            def moment(g, plan, mu):
                ok, _, mu_new, m_hat = _grafting.guarded_momentum(g, mu, b1_, count_inc, nesterov)
                return _Moment(ok, mu_new, m_hat)

            mom = _axes.map_leaves(moment, plans, updates, state.mu)

            def probe(m_hat, plan, k):
                """A leaf's gradient block view and its Gaussian probe."""
                gb = plan.to_blocks(m_hat)
                k1, k2 = jax.random.split(k)
                v = jax.random.normal(k1, gb.shape, jnp.float32)
                # A tiny random perturbation keeps the fit well posed for rank-deficient
                # (e.g. single-example) gradients.
                tiny = jnp.sqrt(jnp.finfo(jnp.float32).eps) * jnp.mean(jnp.abs(gb))
                return gb + tiny * jax.random.normal(k2, gb.shape, jnp.float32), v

            def fit_all(q_tree):
                # Every leaf's fit, leaves with the same block layout batched together
                # (and split over the mesh's devices when there is one).
                plan_leaves, treedef = jax.tree.flatten(plans, is_leaf=_axes.is_plan_leaf)
                moms = treedef.flatten_up_to(mom)
                qs = treedef.flatten_up_to(q_tree)
                ks = treedef.flatten_up_to(probe_keys)
                items, where, templates = [], [], {}
                for i, plan in enumerate(plan_leaves):
                    if not isinstance(plan, _axes.LeafPlan) or not plan.is_preconditioned:
                        continue
                    gb, v = _axes.on_gathered(probe, moms[i].m_hat, plan, ks[i])
                    q32 = tuple(f.astype(jnp.float32) for f in _kron.as_factors(qs[i]))
                    key = (plan.kinds, plan.blocks, tuple(f.shape[1:] for f in q32))
                    templates.setdefault(key, plan)
                    items.append((key, (gb, v, *q32)))
                    where.append(i)

                def batched(key):
                    def fit(gb, v, *q):
                        # The same layout with this batch as its stack of blocks.
                        t = templates[key]
                        local = dataclasses.replace(
                            t, batch=gb.shape[0], num_blocks=(1,) * len(t.num_blocks)
                        )
                        new = balance(fit_factors(q, gb, v, local, lr_), local)
                        finite = [
                            jnp.all(jnp.isfinite(jnp.reshape(f, (f.shape[0], -1))), axis=1)
                            for f in new
                        ]
                        return new, functools.reduce(jnp.logical_and, finite)

                    return fit

                out = list(qs)
                fails = jnp.zeros([], jnp.int32)
                fitted = _distribute.grouped(items, batched, enabled=distribute)
                for i, (new, finite) in zip(where, fitted):
                    old = _kron.as_factors(qs[i])
                    good = moms[i].ok & jnp.all(finite)
                    out[i] = tuple(
                        jnp.where(good, n, f).astype(precond_dtype) for n, f in zip(new, old)
                    )
                    fails = fails + (moms[i].ok & ~good).astype(jnp.int32)
                return jax.tree.unflatten(treedef, out), fails

            def no_fit(q_tree):
                return q_tree, jnp.zeros([], jnp.int32)

            q_new, fit_fails = jax.lax.cond(do_fit, fit_all, no_fit, q_state)

            def apply(m, plan, q, g):
                u = m.m_hat
                if plan.is_preconditioned:
                    q32 = tuple(f.astype(jnp.float32) for f in q)
                    u = plan.from_blocks(precondition(plan.to_blocks(u), q32, plan))
                if clip_ is not None:
                    rms = jnp.sqrt(jnp.mean(u * u))
                    u = u * jnp.minimum(1.0, clip_ / (rms + 1e-30))
                return jnp.where(m.ok, u, 0).astype(g.dtype)

            out = _axes.map_leaves(apply, plans, mom, q_new, updates)
            mu = _axes.map_leaves(
                lambda m, p, old: m.mu.astype(mu_dtype or old.dtype), plans, mom, state.mu
            )
            bad = _axes.map_leaves(lambda m, p: (~m.ok).astype(jnp.int32), plans, mom)
            skipped = sum(jax.tree.leaves(bad), jnp.zeros([], jnp.int32))
            return out, ScaleByPsgdKronState(
                count=count_inc,
                mu=mu,
                q=_axes.bare(plans, q_new),
                key=jax.random.key_data(key),
                precond_updates=state.precond_updates + do_fit.astype(jnp.int32),
                failures=_failure.add(state.failures, skipped=skipped, failed=fit_fails),
            )

    return optax.GradientTransformation(init_fn, update_fn)


def psgd_kron(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: optax.MaskOrFn = None,
    precond_lr: jax.typing.ArrayLike = 0.1,
    precond_init_scale: jax.typing.ArrayLike = 1.0,
    precond_update_prob: float | Callable[[jax.Array], jax.Array] | None = None,
    max_precond_dim: int | None = None,
    memory_save_mode: str | None = None,
    *,
    nesterov: bool = False,
    clip_rms: jax.typing.ArrayLike | None = 1.1,
    seed: jax.typing.ArrayLike = 0,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    merge_small_dims: bool = False,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""PSGD-Kron: momentum preconditioned by a Kronecker product fitted on a Lie group.

    .. math::
      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,\qquad
      W \leftarrow W - \eta\, \mathrm{clip}(Q^T Q\, \hat m_t) - \eta\lambda W,

    with ``Q = Q_1 ⊗ ... ⊗ Q_k`` (triangular or diagonal per axis) fitted so
    that ``Q^T Q`` whitens the gradients (module docstring). Like Shampoo it
    approximates ``E[g g^T]^{-1/2}`` per axis, but without eigendecompositions
    or matrix roots: each fit is a triangular solve and a few matmuls, done on a
    random subset of steps (``precond_update_prob``). The whitened update has
    RMS near 1, so learning rates are Adam-like (1e-4 to 1e-3 for networks);
    ``clip_rms`` guards the first steps.

    What to tune: ``learning_rate``, ``weight_decay``; ``precond_lr`` (0.1; lower
    for noisier gradients), ``precond_update_prob`` (more often is better and
    slower), ``memory_save_mode`` for huge layers.

    Args:
      learning_rate: Step size or schedule.
      b1: Momentum decay.
      weight_decay: Decoupled weight decay.
      mask: Weight-decay mask.
      precond_lr: Step size of the preconditioner fit.
      precond_init_scale: Initial ``P`` as a multiple of the identity.
      precond_update_prob: Fit probability or schedule (static).
      max_precond_dim: Longest dimension with a triangular factor (static;
        ``None``: 8192).
      memory_save_mode: ``None``, ``'one_diag'`` or ``'all_diag'``.
      nesterov: Nesterov momentum.
      clip_rms: Per-leaf update RMS cap (``None``: off).
      seed: PRNG seed of the probes and coins (an int; may be traced).
      distribute: Spread the factor fits over the mesh's devices.
      dimension_numbers: Spec tree or callable.
      merge_small_dims: Merge small adjacent axes.
      mu_dtype: Momentum storage dtype.
      precond_dtype: Factor storage dtype.

    Returns:
      An :class:`optax.GradientTransformation`; ``state[0]`` is the
      :class:`ScaleByPsgdKronState`.

    Raises:
      ValueError: At construction for a hyperparameter out of range (``b1``
        outside ``[0, 1)``, ``precond_lr`` outside ``(0, 1]``, a non-positive
        ``precond_init_scale`` or ``clip_rms``, an unknown ``memory_save_mode``,
        a probability outside ``[0, 1]``); at ``init`` if ``dimension_numbers``
        do not fit a parameter (naming its path).

    Examples:
      The probes and the coins that decide when to fit come from ``seed``, so a
      run is reproducible:

      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((6, 4)), 'b': jnp.zeros(4)}
      >>> grads = {'w': jax.random.normal(jax.random.key(0), (6, 4)), 'b': jnp.ones(4)}
      >>> tx = lo.psgd_kron(learning_rate=1e-3, seed=0)
      >>> update = jax.jit(tx.update)
      >>> u1, _ = update(grads, tx.init(params), params)
      >>> u2, _ = update(grads, tx.init(params), params)
      >>> jax.tree.map(jnp.shape, u1), bool(jnp.array_equal(u1['w'], u2['w']))
      ({'b': (4,), 'w': (6, 4)}, True)

    References:
      Li, `Preconditioned Stochastic Gradient Descent
      <https://arxiv.org/abs/1512.04202>`_, IEEE TNNLS, 2018.
      Li, `Stochastic Hessian Fittings with Lie Groups
      <https://arxiv.org/abs/2402.11858>`_, 2024.

    .. seealso:: :func:`layerwise_optax.shampoo`, :func:`layerwise_optax.scale_by_psgd_kron`
    """
    _checks.alias_args(learning_rate, weight_decay, mask)
    return optax.chain(
        scale_by_psgd_kron(
            b1,
            precond_lr,
            precond_init_scale,
            precond_update_prob,
            max_precond_dim,
            memory_save_mode,
            nesterov=nesterov,
            clip_rms=clip_rms,
            seed=seed,
            distribute=distribute,
            dimension_numbers=dimension_numbers,
            merge_small_dims=merge_small_dims,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
