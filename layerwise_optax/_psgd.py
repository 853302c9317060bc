"""PSGD-Kron (Li 2018, 2024): Kronecker-factored preconditioners fitted on a Lie group.

Each leaf's preconditioner is ``P = Q^T Q`` with ``Q = Q_1 ⊗ ... ⊗ Q_k``, one
factor per view dimension of the shared per-axis plan: upper triangular for
dimensions up to ``max_precond_dim``, diagonal above it (or everywhere in
``memory_save_mode='all_diag'``); with ``block_size`` every longer dimension
is cut into blocks, each block with its own factors, probe and fit (its
zero padding gets no probe, so it takes no part: :func:`_probe`,
:func:`balance`). ``P`` is fitted so that preconditioned
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

The update is four phases, each a module-level function:

1. :func:`_momentum`: ``m_t = b1 m_{t-1} + (1 - b1) g_t``, bias-corrected; a
   leaf with an invalid gradient keeps its momentum and is counted as skipped;
2. :func:`_draw` flips the coin; on a fitting step :func:`_fit` takes one step
   of every factor on the momentum and a probe (:func:`fit_factors`: the
   matrix functions are :func:`layerwise_optax._linalg.solve_upper_transposed`,
   :func:`~layerwise_optax._linalg.psgd_step_triangular` and
   :func:`~layerwise_optax._linalg.balance_factors`), all leaves of one block
   layout in one batch, and keeps the previous factors where the fit is not
   finite (counted as failed);
3. :func:`_precondition`: ``u = Q^T Q m_hat`` per axis;
4. :func:`_clip`: ``u * min(1, clip_rms / rms(u))`` per leaf.

Under a device mesh the state can take the *owner layout*
(:mod:`layerwise_optax._owner`, ``state_layout``): the factors of the leaves
with the same block layout are stacked and sharded along the stack over the
mesh, and phases 2 and 3 run on those stacks where they lie, on the momentum
sent to them (:func:`_owned_moments`). What is per leaf stays per leaf: the
momentum (params-shaped, sharded like its parameter), the probes (drawn per
leaf from the same keys as in the replicated layout, then sent to the stacks:
:func:`_owned_probes`), a leaf keeps its new factors only when all of its
blocks' fits are finite and counts one failure otherwise
(:func:`_owned_agree`), and the clip of phase 4 runs on the updates back in the
parameters' shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layerwise_optax import _axes, _checks, _failure, _grafting, _kron, _linalg, _owner

_STATIC_ARGS = (
    "state_layout",
    "owner_axes",
    "max_precond_dim",
    "block_size",
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
      mu: Momentum, params tree (``mu_dtype``), in every layout.
      q: Per leaf, one factor per view dimension: ``(stack, b, b)`` upper
        triangular, ``(stack, b)`` diagonal, or an empty placeholder (``stack``:
        batch slices times blocks, one with ``block_size=None``)
        (``precond_dtype``); in the owner layout a ``Grouped`` of the same per
        group, the stack axis sharded over the mesh.
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


class _Settings(NamedTuple):
    """The arguments of :func:`scale_by_psgd_kron`, validated (numbers may be traced)."""

    b1: Any
    precond_lr: Any
    precond_init_scale: Any
    precond_update_prob: Any
    max_precond_dim: Any
    memory_save_mode: str | None
    block_size: int | None
    nesterov: bool
    clip_rms: Any
    seed: Any
    distribute: bool
    dimension_numbers: Any
    merge_small_dims: bool
    mu_dtype: Any
    precond_dtype: Any
    state_layout: str
    owner_axes: Any


class _Moment(NamedTuple):
    """One leaf's momentum phase: gradient validity, new momentum, bias-corrected estimate."""

    ok: Any
    mu: Any
    m_hat: Any


def _validate(s: _Settings) -> _Settings:
    """Checks every argument (``ValueError`` naming it) and fills in the defaults."""
    if s.dimension_numbers is not None:
        _checks.tree_or_callable("dimension_numbers", s.dimension_numbers)
    _checks.in_unit_interval("b1", s.b1)
    _checks.traceable_int("seed", s.seed)
    _checks.boolean("distribute", s.distribute)
    _checks.positive("precond_lr", s.precond_lr)
    _checks.in_unit_interval("precond_lr", s.precond_lr, right_closed=True)
    _checks.positive("precond_init_scale", s.precond_init_scale)
    _checks.positive_int("max_precond_dim", s.max_precond_dim, allow_none=True)
    _checks.positive_int("block_size", s.block_size, allow_none=True)
    if s.memory_save_mode not in _MEMORY_MODES:
        raise ValueError(
            f"Unknown memory_save_mode {s.memory_save_mode!r}; expected one of {_MEMORY_MODES}."
        )
    _checks.boolean("nesterov", s.nesterov)
    _checks.boolean("merge_small_dims", s.merge_small_dims)
    if s.clip_rms is not None:
        _checks.positive("clip_rms", s.clip_rms)
    _checks.one_of("state_layout", s.state_layout, _owner.LAYOUTS)
    _checks.axis_names("owner_axes", s.owner_axes)
    prob = s.precond_update_prob
    if prob is None:
        prob = precond_update_prob_schedule()
    elif not callable(prob):
        _checks.in_unit_interval("precond_update_prob", prob, right_closed=True)
    return s._replace(
        precond_update_prob=prob,
        max_precond_dim=8192 if s.max_precond_dim is None else s.max_precond_dim,
        mu_dtype=_checks.canonicalize_dtype(s.mu_dtype, "mu_dtype"),
        precond_dtype=_checks.canonicalize_dtype(s.precond_dtype, "precond_dtype") or jnp.float32,
    )


def _psgd_dimension_numbers(shape, *, max_precond_dim, merge_small_dims):
    spec = _axes.default_dimension_numbers(
        shape, max_precond_dim=max_precond_dim, merge_small_dims=merge_small_dims
    )
    if spec is None and len(shape) >= 1 and math.prod(shape) > 1:
        # Vectors (and (1, n) leaves) get one factor over the whole leaf.
        return _axes.DimensionNumbers((tuple(range(len(shape))),))
    return spec


def _default_dimension_numbers(tree: Any, *, max_precond_dim: int, merge_small_dims: bool) -> Any:
    """PSGD's default spec tree: the library's default, vectors one factor, scalars none."""

    def one(x):
        if _axes.is_masked(x):
            return None
        return _psgd_dimension_numbers(
            tuple(x.shape), max_precond_dim=max_precond_dim, merge_small_dims=merge_small_dims
        )

    return jax.tree.map(one, tree, is_leaf=_axes.is_masked)


def _memory_save_plan(
    plan: Any, mode: str | None, max_precond_dim: int, block_size: int | None
) -> Any:
    """``plan`` re-made with the diagonal factors ``memory_save_mode`` asks for.

    ``'one_diag'``: the longest view dimension diagonal (all tied ones); ``'all_diag'``:
    every dimension diagonal. Which dimensions are diagonal is decided on the
    unblocked lengths; with ``block_size`` the other dimensions are blocked
    (diagonal factors never are).
    """
    if mode is None or _axes.is_masked(plan) or plan.spec is None:
        return plan
    limit = max(plan.dims) - 1 if mode == "one_diag" and len(plan.dims) > 1 else 0
    unblocked = _axes.make_plan(
        plan.shape, plan.spec, max_precond_dim=min(limit, max_precond_dim), block_size=None
    )
    if block_size is None:
        return unblocked
    blocked = _axes.make_plan(
        plan.shape, plan.spec, max_precond_dim=max_precond_dim, block_size=block_size
    )
    diag = [k == "diag" for k in unblocked.kinds]

    def pick(a, b):
        return tuple(x if d else y for d, x, y in zip(diag, a, b))

    return dataclasses.replace(
        blocked,
        kinds=pick(unblocked.kinds, blocked.kinds),
        blocks=pick(unblocked.blocks, blocked.blocks),
        num_blocks=pick(unblocked.num_blocks, blocked.num_blocks),
    )


def _plans(s: _Settings, tree: Any) -> Any:
    """The leaves' plans: one factor per view dimension, blocked with ``block_size``."""
    dimension_numbers = s.dimension_numbers
    if dimension_numbers is None:
        dimension_numbers = functools.partial(
            _default_dimension_numbers,
            max_precond_dim=s.max_precond_dim,
            merge_small_dims=s.merge_small_dims,
        )
    plans = _axes.resolve(
        dimension_numbers,
        tree,
        max_precond_dim=s.max_precond_dim,
        block_size=s.block_size,
        merge_small_dims=s.merge_small_dims,
    )
    if s.memory_save_mode is None:
        return plans
    return jax.tree.map(
        lambda p: _memory_save_plan(p, s.memory_save_mode, s.max_precond_dim, s.block_size),
        plans,
        is_leaf=_axes.is_plan_leaf,
    )


def _init_q(tree: Any, plans: Any, s: _Settings) -> Any:
    """``Q_i = c^{1/(2k)} I`` for ``k`` factors, so ``P = Q^T Q = c I``, stored bare."""

    def init_q(x, plan):
        k = max(plan.num_factors, 1)
        scale = jnp.asarray(s.precond_init_scale, jnp.float32) ** (0.5 / k)
        factors = _kron.init_factors(plan, s.precond_dtype, identity=True)
        return tuple((f * scale).astype(s.precond_dtype) for f in factors)

    return _axes.bare(plans, _axes.map_leaves(init_q, plans, tree))  # see _axes.bare


def _init(params: optax.Params, s: _Settings) -> ScaleByPsgdKronState:
    """``mu = 0`` and ``P = c I`` (:func:`_init_q`), in the layout ``state_layout`` picks.

    In the owner layout (:func:`layerwise_optax._owner.decide`) the factors are
    built on the grouped tree (:func:`layerwise_optax._owner.zeros`) and laid out
    along the stack over the mesh; padded blocks start, like real ones, at
    ``c^{1/(2k)} I`` (finite, and never fitted: see :func:`_owned_agree`). The
    momentum is params-shaped in every layout (sharded like its parameter).
    """
    plans = _plans(s, params)
    layout = _owner.decide(s.state_layout, s.owner_axes, plans, params)
    if layout is None:
        q = _init_q(params, plans, s)
    else:
        q = _init_q(_owner.zeros(layout, plans, params), layout.plans(plans), s)
        q = _owner.grouped(_owner.place_state(layout, q), layout)
    return ScaleByPsgdKronState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=s.mu_dtype),
        q=q,
        key=jax.random.key_data(jax.random.key(s.seed)),
        precond_updates=jnp.zeros([], jnp.int32),
        failures=_failure.zeros(),
    )


def _momentum(
    plans: Any, updates: Any, mu: Any, b1: jax.Array, count_inc: jax.Array, nesterov: bool
) -> Any:
    """Phase 1: ``m_t = b1 m_{t-1} + (1 - b1) g_t`` and its bias correction, per leaf.

    A leaf whose gradient is not valid keeps its momentum and is flagged
    (:func:`layerwise_optax._grafting.guarded_momentum`). Returns a tree of
    :class:`_Moment`. Elementwise, so it runs where the gradient's shards lie
    (no gather; a momentum stored in another explicit layout is first laid out
    like the gradient): the same numbers as on gathered copies.
    """

    def one(g, plan, m):
        spec = _axes._explicit_spec(g)
        if spec is not None and _axes._explicit_spec(m) not in (None, spec):
            m = jax.sharding.reshard(m, spec)
        ok, _, mu_new, m_hat = _grafting.guarded_momentum(g, m, b1, count_inc, nesterov)
        return _Moment(ok, mu_new, m_hat)

    return _axes.map_leaves(one, plans, updates, mu, local=True)


def _draw(key_data: jax.Array, count: jax.Array, plans: Any, prob: Any) -> tuple[Any, ...]:
    """Phase 2a: the coin (fit with probability ``prob(count)``) and one probe key per leaf.

    Returns ``(next_key_data, do_fit, probe_keys)``; the probe keys are a tree
    like ``plans``.
    """
    key, coin_key, probe_key = jax.random.split(jax.random.wrap_key_data(key_data), 3)
    threshold = jnp.asarray(prob(count) if callable(prob) else prob)
    do_fit = jax.random.uniform(coin_key) < threshold
    n_leaves = len(jax.tree.leaves(plans, is_leaf=_axes.is_plan_leaf))
    keys = iter(jax.random.split(probe_key, max(n_leaves, 1)))
    probe_keys = _axes.map_leaves(lambda _, plan: next(keys), plans, plans)
    return jax.random.key_data(key), do_fit, probe_keys


def _padding_rows(plan: _axes.LeafPlan) -> tuple[np.ndarray | None, ...] | None:
    """Per view dimension of a blocked leaf, which rows of each block are real.

    ``None`` when no block is padded (always without ``block_size``); else per
    dimension ``None`` (no padding there) or a bool ``(stack, b_i)`` array:
    block ``s``'s row ``r`` is real when ``j b_i + r < d_i`` for the block's
    index ``j`` along that dimension (the stack is ``batch × n_1 × ... × n_k``
    in row-major order, as :meth:`layerwise_optax._axes.LeafPlan.to_blocks`
    lays it out).
    """
    padded = [n * b != d for d, b, n in zip(plan.dims, plan.blocks, plan.num_blocks)]
    if not any(padded):
        return None
    stack = np.arange(plan.stack)
    rows: list[np.ndarray | None] = []
    for i, (d, b, n) in enumerate(zip(plan.dims, plan.blocks, plan.num_blocks)):
        if not padded[i]:
            rows.append(None)
            continue
        index = stack // math.prod(plan.num_blocks[i + 1 :]) % n
        real = np.minimum(b, d - index * b)
        rows.append(np.arange(b)[None, :] < real[:, None])
    return tuple(rows)


def _zero_padding(x: jax.Array, rows: tuple[np.ndarray | None, ...]) -> jax.Array:
    """A block view with its padded entries (:func:`_padding_rows`) set to zero."""
    for i, r in enumerate(rows):
        if r is not None:
            shape = [1] * x.ndim
            shape[0], shape[1 + i] = r.shape
            x = jnp.where(np.reshape(r, shape), x, 0.0)
    return x


def _probe(m_hat: jax.Array, plan: _axes.LeafPlan, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A leaf's block view ``g`` (of the momentum) and its Gaussian probe ``v ~ N(0, I)``.

    A tiny random perturbation of ``g`` (``sqrt(eps) * mean|g|``) keeps the fit
    well posed for rank-deficient (e.g. single-example) gradients. With
    ``block_size`` the padded entries of a block get neither probe nor
    perturbation (they stay zero), so the padding takes no part in the fit.
    """
    gb = plan.to_blocks(m_hat)
    k1, k2 = jax.random.split(key)
    v = jax.random.normal(k1, gb.shape, jnp.float32)
    noise = jax.random.normal(k2, gb.shape, jnp.float32)
    rows = _padding_rows(plan)
    if rows is not None:
        v, noise = _zero_padding(v, rows), _zero_padding(noise, rows)
    tiny = jnp.sqrt(jnp.finfo(jnp.float32).eps) * jnp.mean(jnp.abs(gb))
    return gb + tiny * noise, v


def _solve_axes(v: jax.Array, q: tuple[jax.Array, ...], plan: _axes.LeafPlan) -> jax.Array:
    """``Q^{-T} v``: each axis of a block view mapped through its factor's inverse transpose."""
    for i, (kind, qi) in enumerate(zip(plan.kinds, q)):
        if kind == "diag":
            shape = [1] * v.ndim
            shape[0], shape[1 + i] = qi.shape[0], qi.shape[1]
            v = v / jnp.reshape(qi, shape)
        elif kind == "full":
            moved = jnp.moveaxis(v, 1 + i, 1)
            flat = jnp.reshape(moved, moved.shape[:2] + (-1,))
            sol = _linalg.solve_upper_transposed(qi, flat)
            v = jnp.moveaxis(jnp.reshape(sol, moved.shape), 1, 1 + i)
    return v


_FACTOR_STEPS = {"full": _linalg.psgd_step_triangular, "diag": _linalg.psgd_step_diagonal}


def fit_factors(
    q: tuple[jax.Array, ...],
    g: jax.Array,
    v: jax.Array,
    plan: _axes.LeafPlan,
    lr: jax.Array,
) -> tuple[jax.Array, ...]:
    """One Lie-group step of every factor of a leaf (see the module docstring).

    ``A = Q g`` and ``B = Q^{-T} v`` per axis, their per-axis statistics
    ``A_(i) A_(i)^T`` and ``B_(i) B_(i)^T``, then
    :func:`layerwise_optax._linalg.psgd_step_triangular` (or ``_diagonal``) per
    factor. Default matmul precision (TF32 on GPUs, as psgd-jax): the fit is
    stochastic and HIGHEST costs ~1.5x on CPU.

    Args:
      q: The leaf's factors (float32).
      g: Gradient block view ``(stack, b_1..b_k)``.
      v: Gaussian probe of the same shape.
      plan: The leaf's plan.
      lr: Preconditioner step size.

    Returns:
      The new factors (not yet checked for finiteness).
    """
    a = _kron.apply_axis_matrices(g, q, plan, precision=None)
    b = _solve_axes(v, q, plan)
    aa = _kron.axis_stats(a, plan, precision=None)
    bb = _kron.axis_stats(b, plan, precision=None)
    return tuple(
        _FACTOR_STEPS[kind](qi, t1, t2, lr) if kind in _FACTOR_STEPS else qi
        for kind, qi, t1, t2 in zip(plan.kinds, q, aa, bb)
    )


def balance(
    q: tuple[jax.Array, ...], plan: _axes.LeafPlan, v: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Rescales the factors of each block to equal max-abs (their product unchanged).

    ``Q_1 ⊗ Q_2 = (c Q_1) ⊗ (Q_2 / c)``: the fit does not see this freedom, so one
    factor can drift large and another small; balancing keeps both well inside
    float range (:func:`layerwise_optax._linalg.balance_factors` on the factors
    that are not ``'none'``).

    With the block view's probe ``v`` (blocked leaves), the max-abs of a
    triangular factor counts only its real rows and columns: those where the
    probe is not zero along the other axes (padding has a zero probe,
    :func:`_probe`; a real row of Gaussian entries is never all zero), so a
    padded block is balanced exactly as its unpadded sub-array would be.
    """
    idx = [i for i, k in enumerate(plan.kinds) if k != "none"]
    masks = None
    if v is not None:
        masks = []
        for i in idx:
            if plan.kinds[i] != "full":
                masks.append(None)
                continue
            others = tuple(a for a in range(1, v.ndim) if a != 1 + i)
            real = jnp.any(v != 0, axis=others)
            masks.append(real[:, :, None] & real[:, None, :])
    balanced = dict(zip(idx, _linalg.balance_factors([q[i] for i in idx], masks)))
    return tuple(balanced.get(i, f) for i, f in enumerate(q))


def _fit_blocks(
    key: tuple[_axes.LeafPlan, Any], lr: jax.Array, blocked: bool = False
) -> Callable[..., Any]:
    """The fit of a batch of blocks of one layout: ``(g, v, *q) -> (new q, finite per block)``.

    ``blocked``: the blocks may be padded (``block_size``), see :func:`balance`.
    """

    def fit(gb, v, *q):
        local = key[0].as_batch(gb.shape[0])
        new = balance(fit_factors(q, gb, v, local, lr), local, v if blocked else None)
        finite = [jnp.all(jnp.isfinite(jnp.reshape(f, (f.shape[0], -1))), 1) for f in new]
        return new, jnp.all(jnp.stack(finite), axis=0)

    return fit


def _keep_fit(
    q: Any, plan: Any, m: _Moment, done: tuple[Any], *, dtype: Any, salt: jax.Array
) -> _kron.Refreshed:
    """The failure policy of one leaf's fit: all new factors, or all previous ones.

    The factors, fitted in float32, are stored in ``dtype`` by
    :func:`layerwise_optax._kron.stochastic_round` (salted with ``salt``, the
    step count): the fit's small relative steps survive bfloat16 storage.

    The new factors are kept when the leaf's gradient was valid and every new
    factor is finite; a valid leaf whose fit was not finite keeps its previous
    factors and counts one failure (a leaf with an invalid gradient is already
    counted as skipped).

    On a group stack of the owner layout (``plan.per_block``) the same rule
    holds per member leaf: ``done`` holds ``(new, finite, failed)`` with
    ``finite`` already the flag of each block's leaf and ``failed`` the group's
    count per leaf (:func:`_owned_agree`); a padded block is never valid.
    """
    old = _kron.as_factors(q)
    (fitted,) = done
    if fitted is None:
        return _kron.Refreshed(old, (), jnp.zeros([], jnp.int32))
    if plan.per_block:
        new, finite, failed = fitted
        good = jnp.reshape(m.ok, (-1,)) & finite
    else:
        new, finite = fitted
        good = m.ok & jnp.all(finite)
        failed = (m.ok & ~good).astype(jnp.int32)
    kept = tuple(
        _kron.stochastic_round(f, dtype, salt)
        for f in _failure.keep(good, new, tuple(o.astype(jnp.float32) for o in old))
    )
    return _kron.Refreshed(kept, (), failed)


def _fit(
    q: Any,
    plans: Any,
    mom: Any,
    probes: Any,
    lr: jax.Array,
    s: _Settings,
    agree: Callable[[Any], Any] | None = None,
    *,
    salt: jax.Array,
) -> tuple[Any, jax.Array]:
    """Phase 2b: fit every leaf's factors on its momentum and probe (see the module docstring).

    Leaves with the same block layout are fitted as one batch
    (:func:`layerwise_optax._axes.map_grouped`, split over the mesh's devices
    when ``s.distribute``; a group stack of the owner layout on the devices
    that own its blocks), then each leaf keeps its new factors or its old ones
    (:func:`_keep_fit`). Returns ``(factors, failed)``.

    Args:
      q: The factors, a tree like ``plans``.
      plans: The plans (of the params, or of the owner layout's grouped tree).
      mom: Per leaf the :class:`_Moment`.
      probes: Per leaf its probe key (drawn here, :func:`_probe`) or, for a
        group stack, its ``(g, v)`` block views (:func:`_owned_probes`).
      lr: Preconditioner step size.
      s: The settings.
      agree: Applied to the fitted tree before the failure policy (the owner
        layout's per-leaf flags and counts, :func:`_owned_agree`).
      salt: The step count, for the stochastic rounding of the stored factors.
    """

    def prepare(plan, m, q_leaf, probe):
        if not plan.is_preconditioned:
            return [None]
        if plan.per_block:
            gb, v = probe
        else:
            gb, v = _axes.on_gathered(_probe, m.m_hat, plan, probe)
        q32 = tuple(f.astype(jnp.float32) for f in _kron.as_factors(q_leaf))
        return [((plan.as_batch(1), gb.dtype), (gb, v, *q32))]

    batched = functools.partial(_fit_blocks, lr=lr, blocked=s.block_size is not None)
    fitted = _axes.map_grouped(prepare, batched, plans, mom, q, probes, distribute=s.distribute)
    if agree is not None:
        fitted = agree(fitted)
    keep = functools.partial(_keep_fit, dtype=s.precond_dtype, salt=salt)
    out = _axes.map_leaves(keep, plans, q, mom, fitted)
    return _axes.unzip(out, "factors"), _failure.total(_axes.unzip(out, "failed"))


def _no_fit(q: Any) -> tuple[Any, jax.Array]:
    return q, jnp.zeros([], jnp.int32)


def _owned_moments(
    layout: _owner.Layout, plans: Any, updates: Any, mom: Any
) -> tuple[Any, Any, list[Any]]:
    """The grouped tree's plans and :class:`_Moment` s, and each leaf's validity.

    Each leaf's bias-corrected momentum goes to the owners of its blocks
    (:func:`layerwise_optax._owner.to_groups`), filled with NaN where the leaf's
    gradient was not valid; a block's flag is its leaf's (padded blocks: false).

    Returns:
      ``(grouped plans, grouped moments, validity per plan position)``.
    """
    valid = _owner.leaf_validity(plans, updates)
    m_hat = _owner.to_groups(layout, plans, _axes.unzip(mom, "m_hat"), valid=valid)
    blocks = tuple(
        _Moment(
            _owner.per_block(layout, g, jnp.stack([valid[i] for i, _ in g.members]), False), None, x
        )
        for g, x in zip(layout.groups, m_hat["blocks"])
    )
    leaves = tuple(_Moment(valid[i], None, x) for i, x in zip(layout.leaves, m_hat["leaves"]))
    return layout.plans(plans), {"blocks": blocks, "leaves": leaves}, valid


class _Draws(NamedTuple):
    """One leaf's Gaussian draws for its probe (:func:`_probe`), in the leaf's shape."""

    v: jax.Array
    noise: jax.Array


def _owned_probes(
    layout: _owner.Layout, plans: Any, mom: Any, probe_keys: Any
) -> dict[str, tuple[Any, ...]]:
    """The owner layout's probes: per group stack, the ``(g, v)`` of :func:`_probe`.

    The Gaussian draws are made per real leaf from its key, in the shape the
    replicated layout draws them (its block view), so they are the same numbers
    in every layout; they reach the group stacks through
    :func:`layerwise_optax._owner.to_groups` (padded blocks: NaN). The
    perturbation's scale ``sqrt(eps) * mean|g|`` is per leaf too: the block sums
    of ``|m_hat|`` are summed over each member leaf's blocks
    (:func:`layerwise_optax._owner.per_member`) and sent back to its blocks.

    Args:
      layout: The owner layout.
      plans: The plans of the params.
      mom: The grouped tree's :class:`_Moment` per group stack (and leaf).
      probe_keys: Per leaf of the params its probe key (:func:`_draw`).

    Returns:
      ``{'blocks': ((g, v) per group), 'leaves': (None, ...)}``, like the
      grouped tree.
    """

    def draw(key, plan):
        if not plan.is_preconditioned:
            return _Draws(jnp.zeros(()), jnp.zeros(()))
        k1, k2 = jax.random.split(key)  # as in _probe
        normal = (jax.random.normal(k, plan.block_shape, jnp.float32) for k in (k1, k2))
        return _Draws(*(plan.from_blocks(x) for x in normal))

    draws = _axes.map_leaves(draw, plans, probe_keys)
    v, noise = (_owner.to_groups(layout, plans, _axes.unzip(draws, f)) for f in _Draws._fields)
    tiny = jnp.sqrt(jnp.finfo(jnp.float32).eps)
    out = []
    for g, m, vb, nb in zip(layout.groups, mom["blocks"], v["blocks"], noise["blocks"]):
        gb = m.m_hat
        sums = _owner.per_member(
            g, jnp.sum(jnp.abs(gb), axis=tuple(range(1, gb.ndim))), "sum", layout
        )
        sizes = np.array([n for _, n in g.members]) * math.prod(g.key.blocks)
        scale = _owner.per_block(layout, g, tiny * (sums / sizes.astype(sums.dtype)), 0.0)
        out.append((gb + jnp.reshape(scale, (-1,) + (1,) * (gb.ndim - 1)) * nb, vb))
    return {"blocks": tuple(out), "leaves": (None,) * len(layout.leaves)}


def _owned_agree(layout: _owner.Layout, valid: list[Any], fitted: Any) -> Any:
    """The owner layout's fit results with the replicated layout's per-leaf rule.

    Per group, the per-block finiteness of the fit is reduced over each member
    leaf's blocks (:func:`layerwise_optax._owner.per_member`) and sent back to
    its blocks, so a leaf keeps all its new factors or none, as in
    :func:`_keep_fit`; the failures are counted once per valid member leaf
    whose fit was not finite (padded blocks belong to no leaf).

    Args:
      layout: The owner layout.
      valid: Per plan position of the params, the leaf's validity flag.
      fitted: The grouped tree's :func:`layerwise_optax._axes.map_grouped`
        output: per group ``((new, finite),)``.

    Returns:
      ``fitted`` with per group ``((new, finite_of_its_leaf, failed),)``.
    """
    out = []
    for g, (item,) in zip(layout.groups, fitted["blocks"]):
        new, finite = item
        leaf_ok = _owner.per_member(g, finite, "all", layout)
        ok = jnp.stack([valid[i] for i, _ in g.members])
        failed = jnp.sum(ok & ~leaf_ok).astype(jnp.int32)
        out.append(((new, _owner.per_block(layout, g, leaf_ok, False), failed),))
    return {"blocks": tuple(out), "leaves": fitted["leaves"]}


def precondition(g: jax.Array, q: tuple[jax.Array, ...], plan: _axes.LeafPlan) -> jax.Array:
    """``P g = Q^T Q g`` on a block view."""
    qg = _kron.apply_axis_matrices(g, q, plan, precision=None)
    return _kron.apply_axis_matrices(qg, q, plan, transpose=True, precision=None)


def _precondition(m: _Moment, plan: _axes.LeafPlan, q: Any) -> jax.Array:
    """Phase 3: ``u = Q^T Q m_hat`` on a leaf's block view (``m_hat`` where unfactored)."""
    if not plan.is_preconditioned:
        return m.m_hat
    q32 = tuple(f.astype(jnp.float32) for f in q)
    return plan.from_blocks(precondition(plan.to_blocks(m.m_hat), q32, plan))


def _clip(u: jax.Array, plan: Any, ok: Any, g: jax.Array, *, clip: Any) -> jax.Array:
    """Phase 4: ``u * min(1, clip / rms(u))`` (no clipping with ``clip=None``), per leaf.

    Zero for a leaf whose gradient was not valid (``ok`` false); cast to the
    gradient's dtype.
    """
    if clip is not None:
        rms = jnp.sqrt(jnp.mean(u * u))
        u = u * jnp.minimum(1.0, clip / (rms + 1e-30))
    return _failure.zero_unless(ok, u, g.dtype)


def _laid_out_like(u: jax.Array, plan: Any, g: jax.Array) -> jax.Array:
    """``u`` with ``g``'s explicit sharding (a local slice of a replicated ``u``)."""
    spec = _axes._explicit_spec(g)
    return u if spec is None or _axes._explicit_spec(u) == spec else jax.sharding.reshard(u, spec)


def _update(updates: optax.Updates, state: ScaleByPsgdKronState, s: _Settings) -> tuple[Any, Any]:
    """PSGD-Kron's step: momentum, (coin flip) fit on a probe, precondition, clip.

    In the owner layout (:mod:`layerwise_optax._owner`) phases 2 and 3 run on
    the grouped tree: the bias-corrected momentum of each leaf goes to the
    owners of its blocks (NaN where the leaf's gradient was not valid, so its
    fit is never kept), and the preconditioned blocks come back in the
    parameters' shapes (in float32) for the per-leaf clip. The momentum, the
    coin, the probe keys and the skipped counts are per leaf of the params in
    every layout.
    """
    plans = _plans(s, updates)
    layout = _owner.layout_of(state)
    count_inc = _kron.increment(state.count)
    # One arithmetic for plain and injected hyperparameters (float32 first).
    b1, lr = _checks.hyperparameters(s.b1, s.precond_lr)
    clip = None if s.clip_rms is None else _checks.hyperparameters(s.clip_rms)[0]
    mom = _momentum(plans, updates, state.mu, b1, count_inc, s.nesterov)
    key, do_fit, probe_keys = _draw(state.key, state.count, plans, s.precond_update_prob)
    if layout is None:
        work, work_mom, q = plans, mom, state.q
        fit = functools.partial(
            _fit, plans=plans, mom=mom, probes=probe_keys, lr=lr, s=s, salt=state.count
        )
    else:
        _owner.check(layout, plans, updates)
        _owner.check_mapped(layout)
        work, work_mom, valid = _owned_moments(layout, plans, updates, mom)
        q = state.q.tree()

        def fit(q):
            probes = _owned_probes(layout, plans, work_mom, probe_keys)
            agree = functools.partial(_owned_agree, layout, valid)
            new, failed = _fit(q, work, work_mom, probes, lr, s, agree, salt=state.count)
            # Laid out as stored: the fit runs over all the mesh's devices, which
            # with ``owner_axes`` a subset of the axes is another layout.
            return _owner.place_state(layout, new), failed

    q, failed = jax.lax.cond(do_fit, fit, _no_fit, _kron.normalize(work, q))
    u = _axes.map_leaves(_precondition, work, work_mom, q)
    q = _axes.bare(work, q)
    ok = _axes.unzip(mom, "ok")
    clipped = functools.partial(_clip, clip=clip)
    if layout is None:
        u = _axes.map_leaves(clipped, plans, u, ok, updates)
    else:
        # The blocks come back in float32 laid out like the gradient: a leaf
        # whose shards hold whole blocks receives only its own blocks (the
        # owner layout's routes), any other is gathered whole and keeps its
        # shards by a local slice (``_laid_out_like``). The clip reads the
        # update where it lies (its mean is one scalar reduction).
        like = jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), updates)
        u = _owner.from_groups(layout, plans, u, like)
        u = _axes.map_leaves(clipped, plans, u, ok, updates, local=True)
        u = _axes.map_leaves(_laid_out_like, plans, u, updates, local=True)
        q = _owner.grouped(q, layout)
    mu = _axes.map_leaves(
        lambda m, p, old: m.mu.astype(s.mu_dtype or old.dtype), plans, mom, state.mu, local=True
    )
    return u, ScaleByPsgdKronState(
        count=count_inc,
        mu=mu,
        q=q,
        key=key,
        precond_updates=state.precond_updates + do_fit.astype(jnp.int32),
        failures=_failure.add(state.failures, skipped=_failure.count_invalid(ok), failed=failed),
    )


def scale_by_psgd_kron(
    b1: jax.typing.ArrayLike = 0.9,
    precond_lr: jax.typing.ArrayLike = 0.1,
    precond_init_scale: jax.typing.ArrayLike = 1.0,
    precond_update_prob: float | Callable[[jax.Array], jax.Array] | None = None,
    max_precond_dim: int | None = None,
    memory_save_mode: str | None = None,
    *,
    block_size: int | None = None,
    nesterov: bool = False,
    clip_rms: jax.typing.ArrayLike | None = 1.1,
    seed: jax.typing.ArrayLike = 0,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    merge_small_dims: bool = False,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
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
      block_size: Cut every factor dimension longer than this into blocks of
        this length (the last one zero-padded), each block with its own
        factors, probe and fit (static; ``None``: one block per leaf). With
        it, ``max_precond_dim`` applies to the block length. See
        :func:`psgd_kron`.
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
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
      state_layout: Where the factors ``Q`` live on a device mesh. ``'auto'`` (default): the *owner layout* when ``init`` runs
        under a mesh of more than one device (:func:`jax.set_mesh`, or params
        sharded over one; :func:`layerwise_optax.state_shardings` sets it), else
        replicated. ``'owner'``: the blocks of all leaves with the same block
        layout (shape and factor kinds) are stacked and the stack sharded along
        the block axis over the mesh (padded to a multiple of the device count),
        so each device stores and fits only its own blocks (its factors shrink
        with the device count once a layout has as many blocks as devices);
        without a mesh the stacks are kept whole. The momentum is shaped and
        sharded like the params in every layout. ``'replicated'``: per leaf, every factor on every device (the
        layout of earlier versions). The probes, coins, clipping and failure
        counts are per leaf in every layout and the updates are the same.
        Static; checkpoints restore into the layout they were saved in.
      owner_axes: Mesh axes the owner layout shards the block axis over
        (``None``: all of them; a name or a tuple of names); under ``jax.pmap``
        with ``state_layout='owner'``, the pmap's ``axis_name`` (``init`` inside
        the pmap); see :func:`layerwise_optax.scale_by_shampoo`. Static.

    Returns:
      A :class:`optax.GradientTransformation` with state
      :class:`ScaleByPsgdKronState`.

    Raises:
      ValueError: At construction for a hyperparameter out of range (see
        :func:`psgd_kron`); at ``init`` if ``dimension_numbers`` do not fit a
        parameter (naming its path) or ``owner_axes`` names an axis the mesh
        does not have; at ``update`` in the owner layout if the updates do not
        have the params' shapes.
        Also at ``init`` with ``state_layout='owner'`` inside ``jax.pmap``
        without ``owner_axes`` or with one that is not mapped there, or outside
        any mesh and pmap with ``owner_axes``; at ``update`` of a state built
        inside pmap outside a pmap over its axis or over another device count.

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
    s = _validate(_Settings(**locals()))  # the arguments as passed, checked

    def init_fn(params):
        return _init(params, s)

    def update_fn(updates, state, params=None):
        del params
        with jax.named_scope("layerwise_optax.psgd_kron"):
            return _update(updates, state, s)

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
    block_size: int | None = None,
    nesterov: bool = False,
    clip_rms: jax.typing.ArrayLike | None = 1.1,
    seed: jax.typing.ArrayLike = 0,
    distribute: bool = True,
    dimension_numbers: _axes.DimNumsOrFn | None = None,
    merge_small_dims: bool = False,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
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

    **Blocks** (``block_size=b``): every factor dimension ``d > b`` is cut into
    ``ceil(d / b)`` blocks of length ``b`` (the last one zero-padded), so a
    ``d_1 × d_2`` leaf becomes ``ceil(d_1/b) ceil(d_2/b)`` independent
    ``b × b`` sub-matrices ``G_{jk}``, each with its own ``Q = Q_1^{jk} ⊗
    Q_2^{jk}`` (triangular ``b × b`` factors), its own slice of the probe and
    its own fit and balancing. The padding takes no part: its probe is zero,
    so each block is fitted and preconditioned exactly as PSGD-Kron on the
    unpadded sub-array would be (only the perturbation scale and ``clip_rms``
    stay per leaf). What it buys: a matrix leaf's factors hold ``2 b^2`` floats
    per ``b × b`` block, about two per parameter (plus padding), instead of
    ``d_1^2 + d_2^2`` (many per parameter for a long, thin leaf); each fit
    costs ``O(b^3)`` per block instead of ``O(d^3)``; and the many
    same-sized blocks are what the owner layout (``state_layout``) spreads
    evenly over a mesh's devices, so the factors per device shrink with the
    device count. Use it at pod scale or for dimensions in the thousands. What
    it costs: ``P`` is block diagonal, so correlations between parameters in
    different blocks are not whitened, a coarser preconditioner the smaller
    ``b`` is (``b >= d`` is unblocked PSGD-Kron).

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
      block_size: Block length of long dimensions, ``None`` for no blocking
        (static; see above).
      nesterov: Nesterov momentum.
      clip_rms: Per-leaf update RMS cap (``None``: off).
      seed: PRNG seed of the probes and coins (an int; may be traced).
      distribute: Spread the factor fits over the mesh's devices.
      dimension_numbers: Spec tree or callable.
      merge_small_dims: Merge small adjacent axes.
      mu_dtype: Momentum storage dtype.
      precond_dtype: Factor storage dtype.
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
      state_layout: ``'auto'``, ``'owner'`` or ``'replicated'`` (see
        :func:`layerwise_optax.scale_by_psgd_kron`).
      owner_axes: Mesh axes of the owner layout (``None``: all).

    Returns:
      An :class:`optax.GradientTransformation`; ``state[0]`` is the
      :class:`ScaleByPsgdKronState`.

    Raises:
      ValueError: At construction for a hyperparameter out of range (``b1``
        outside ``[0, 1)``, ``precond_lr`` outside ``(0, 1]``, a non-positive
        ``precond_init_scale`` or ``clip_rms``, an unknown ``memory_save_mode``,
        a probability outside ``[0, 1]``, an unknown ``state_layout``, an
        ``owner_axes`` that is not a name or a tuple of names); at ``init`` if
        ``dimension_numbers`` do not fit a parameter (naming its path) or
        ``owner_axes`` names an axis the mesh does not have.

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
            block_size=block_size,
            nesterov=nesterov,
            clip_rms=clip_rms,
            seed=seed,
            distribute=distribute,
            dimension_numbers=dimension_numbers,
            merge_small_dims=merge_small_dims,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            state_layout=state_layout,
            owner_axes=owner_axes,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
