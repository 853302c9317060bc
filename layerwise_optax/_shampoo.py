"""Shampoo: per-axis Kronecker-factored preconditioning with layer-wise grafting.

One update is three phases, each a module-level function with its maths:
:func:`_accumulate` (moments and factor EMAs), :func:`_refresh` (inverse roots,
every ``precondition_frequency`` steps under ``lax.switch``) and
:func:`_precondition` (apply the roots, graft). The parts SOAP writes the same
way live in :mod:`layerwise_optax._factored`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _factored, _failure, _grafting, _kron

_DEFAULT_MAX_PRECOND_DIM = 1024

_STATIC_ARGS = (
    "state_layout",
    "owner_axes",
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
    "factor_exponents",
    "trace_normalize",
)

# ``factor_exponents``: a preset name or ``dims -> one root order (or None) per factor``.
FactorExponents = Literal["one_sided"] | Callable[[tuple[int, ...]], Sequence[int | None]]


class ScaleByShampooState(NamedTuple):
    """State for :func:`scale_by_shampoo`.

    Attributes:
      count: int32 scalar, number of updates so far.
      mu: First moment, same tree and shapes as the params, dtype ``mu_dtype``.
      nu: EMA of squared gradients for ``'adam'``/``'rmsprop'`` grafting, their
        running sum for ``'adagrad'`` (same tree as the params, float32 or the
        param dtype if wider); ``None`` otherwise.
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
    nu: Any  # a params tree, or None (grafting without a second moment)
    stats: optax.Updates
    roots: optax.Updates
    failures: _failure.FailureCounts


@dataclasses.dataclass(frozen=True)
class _Options(_factored.FactoredOptions):
    """The arguments of :func:`scale_by_shampoo`, validated (:func:`_options`)."""

    damping: Any
    start_preconditioning_step: Any
    grafting: str
    root_exponent: int | None
    root_method: str
    relative_damping: bool
    nesterov: bool
    factor_estimation: str
    factor_bias_correction: bool
    factor_exponents: Any
    trace_normalize: bool

    def root(self, plan: _axes.LeafPlan) -> int | tuple[int, ...]:
        """The root order of a leaf's factors.

        The per-dimension orders of ``factor_exponents`` where it set them
        (:meth:`resolve`), else ``root_exponent``, else ``2k`` (KL: 2).
        """
        if plan.exponents:
            return plan.exponents
        default = 2 if self.factor_estimation == "kl" else 2 * max(plan.num_factors, 1)
        return self.root_exponent or default

    def resolve(self, tree: Any) -> Any:
        """The plans of ``tree``, with ``factor_exponents`` applied (:func:`_with_exponents`)."""
        plans = super().resolve(tree)
        if self.grouped_plans is not None or self.factor_exponents is None:
            return plans
        return jax.tree_util.tree_map_with_path(
            functools.partial(_with_exponents, self), plans, is_leaf=_axes.is_plan_leaf
        )


def _as_int(e: Any) -> Any:
    """``e`` as a Python int if it is an integer scalar (has ``__index__``), else ``e``."""
    index = getattr(type(e), "__index__", None)
    if index is None:
        return e
    try:
        return index(e)
    except TypeError:  # a float array's __index__
        return e


def _one_sided(root: int, dims: tuple[int, ...]) -> tuple[int | None, ...]:
    """``factor_exponents='one_sided'``: a root for the shortest factor dimension only.

    Unit dimensions (no factor) are skipped; ties go to the first.
    """
    real = [i for i, d in enumerate(dims) if d > 1]
    keep = min(real, key=lambda i: dims[i]) if real else None
    return tuple(root if i == keep else None for i in range(len(dims)))


def _with_exponents(o: _Options, path: Any, plan: Any) -> Any:
    """A leaf's plan with the root orders of ``factor_exponents`` (unchanged without factors).

    Raises ``ValueError`` naming the leaf if the callable's answer does not fit.
    """
    if not isinstance(plan, _axes.LeafPlan) or plan.spec is None:
        return plan
    k = len(plan.spec.factor_axes)
    dims = tuple(plan.dims[:k])
    where = f"param {_axes.path_label(path)} with shape {plan.shape}"
    if o.factor_exponents == "one_sided":
        raw: Any = _one_sided(o.root_exponent or 2, dims)
    else:
        try:
            raw = o.factor_exponents(dims)
        except Exception as e:  # the user's callable: say which leaf it failed on
            raise ValueError(
                f"{where}: factor_exponents{dims} raised {type(e).__name__}: {e}"
            ) from e
    got: tuple[Any, ...] = tuple(raw) if isinstance(raw, (tuple, list)) else ()
    # NumPy and JAX integer scalars count as ints (``__index__``); bools do not.
    got = tuple(e if e is None or isinstance(e, bool) else _as_int(e) for e in got)
    valid = [e is None or (isinstance(e, int) and not isinstance(e, bool) and e >= 1) for e in got]
    if len(got) != k or not all(valid):
        raise ValueError(
            f"{where}: factor_exponents{dims} must give a tuple (or list) with None or an "
            "int >= 1 (a Python or NumPy integer) "
            f"for each of its {k} factor dimensions, got {raw!r}."
        )
    if o.factor_estimation == "kl" and any(
        e is not None and e % 2 and kind != "none" for e, kind in zip(got, plan.kinds)
    ):
        raise ValueError(
            f"{where}: factor_exponents{dims} gave {got}; with factor_estimation='kl' "
            "every root order must be even (the statistics use L^(-1/2) = root^(p/2))."
        )
    extra = (None,) * (len(plan.kinds) - k)  # the identity group, never a factor
    return plan.with_exponents(got + extra)


class _Hyper(NamedTuple):
    """The float hyperparameters as float32 arrays (:func:`_checks.hyperparameters`)."""

    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    decay: jax.Array
    damping: jax.Array


def _options(args: dict[str, Any]) -> _Options:
    """Checks the factory's arguments (``ValueError`` naming argument, value, range)."""
    _checks.non_negative("damping", args["damping"])
    _checks.traceable_int(
        "start_preconditioning_step", args["start_preconditioning_step"], minimum=0
    )
    _checks.one_of("grafting", args["grafting"], _grafting.GRAFTING)
    _checks.positive_int("root_exponent", args["root_exponent"], allow_none=True)
    _checks.one_of("root_method", args["root_method"], ("eigh", "newton"))
    for name in ("relative_damping", "factor_bias_correction", "nesterov"):
        _checks.boolean(name, args[name])
    _checks.one_of("factor_estimation", args["factor_estimation"], ("shampoo", "kl"))
    _checks.boolean("trace_normalize", args["trace_normalize"])
    exponents = args["factor_exponents"]
    if exponents is not None and exponents != "one_sided" and not callable(exponents):
        raise ValueError(
            f"factor_exponents must be None, 'one_sided' or a callable "
            f"dims -> tuple of root orders (None: no factor), got {exponents!r}."
        )
    if callable(exponents) and args["root_exponent"] is not None:
        raise ValueError(
            f"root_exponent={args['root_exponent']!r} and a callable factor_exponents both "
            "set the root orders: give the orders in factor_exponents only."
        )
    if args["trace_normalize"] and args["factor_estimation"] == "kl":
        raise ValueError(
            "trace_normalize=True with factor_estimation='kl': KL-Shampoo's factors carry "
            "the preconditioner's overall scale (that is why it needs no grafting), and "
            "dividing each by its trace would discard it; use one or the other."
        )
    root_exponent = args["root_exponent"]
    if args["factor_estimation"] == "kl" and root_exponent is not None and root_exponent % 2:
        raise ValueError(
            f"root_exponent must be even with factor_estimation='kl' (the statistics "
            f"use L^(-1/2) = root^(p/2)), got {root_exponent}."
        )
    return _factored.factored_options(_Options, args, _DEFAULT_MAX_PRECOND_DIM)


def _init(o: _Options, params: optax.Params) -> ScaleByShampooState:
    """Zero moments and statistics, identity roots."""
    start = _factored.init_factored(o, params)
    nu = None
    if _grafting.needs_second_moment(o.grafting):
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, _grafting.moment_dtype(p)), params)
    zero = jnp.zeros([], jnp.int32)
    return ScaleByShampooState(zero, start.mu, nu, start.stats, start.identity, _failure.zeros())


def _accumulate(o, h, g, plan, mu, nu, stats, roots) -> _factored.Accumulated:
    r"""Accumulate: the guarded moments and factor EMAs of one leaf.

    .. math::
      m \leftarrow b_1 m + (1-b_1) G, \quad
      \nu \leftarrow b_2 \nu + (1-b_2) G^2, \quad
      L_i \leftarrow \beta L_i + (1-\beta) \hat L_i

    with ``\hat L_i = G_(i) G_(i)^T``, or KL-Shampoo's
    ``G_(i) (⊗_{j≠i} L_j^{-1}) G_(i)^T / n_i`` from the last roots
    (:func:`layerwise_optax._kron.kl_axis_stats`); ``\nu`` only for Adam/RMSProp
    grafting (AdaGrad grafting sums instead: ``\nu \leftarrow \nu + G^2``). A valid gradient has finite plain statistics; KL's go through the
    roots and can still overflow, and then nothing is accumulated
    (``check_estimates`` of :func:`layerwise_optax._factored.accumulate`). A running
    sum (``factor_decay=1``) that overflows later shows up as failed refreshes,
    the roots kept.
    """
    estimate = None
    if o.factor_estimation == "kl":
        estimate = functools.partial(
            _kron.kl_axis_stats, roots=roots, plan=plan, root=plan.exponents or o.root_exponent or 2
        )
    # Shampoo checks the plain statistics too: one path for both estimates.
    a = _factored.accumulate(g, plan, mu, stats, h.b1, h.decay, estimate, check_estimates=True)
    if nu is None:
        return a
    if o.grafting == "adagrad":  # a running sum, no decay
        return a._replace(nu=_failure.keep(a.ok, nu + a.g32**2, nu))
    return a._replace(nu=_failure.keep(a.ok, h.b2 * nu + (1 - h.b2) * a.g32**2, nu))


def _refresh(o, h, plans, count_inc, stats, roots) -> tuple[Any, jax.Array]:
    r"""Refresh: the damped inverse roots ``(L_i + δ I)^{-1/p}`` of every factor.

    With ``factor_bias_correction`` the roots are of ``L_i / (1 - β^t) + δ I``:
    the EMA starts at zero, so its weights sum to ``1 - β^t`` (``t`` counts steps,
    skipped ones too; :func:`layerwise_optax._kron.ema_debias`). Same-sized blocks
    of all leaves are one batch each, split over the devices of the mesh when
    there is one; a block whose root is not finite keeps its previous root and is
    counted (:func:`layerwise_optax._kron.inverse_roots_tree`).
    """
    if o.factor_bias_correction:
        corr = _kron.ema_debias(h.decay, count_inc)
        stats = jax.tree.map(lambda s: s * corr.astype(s.dtype), stats)
    if o.trace_normalize:
        stats = _axes.map_leaves(lambda s, plan: _kron.trace_normalized(s, plan), plans, stats)
    return _kron.inverse_roots_tree(
        stats,
        roots,
        plans,
        root=o.root,
        damping=h.damping,
        relative_damping=o.relative_damping,
        method=o.root_method,
        distribute=o.distribute,
    )


def _precondition(o, h, count_inc, use_precond, g, plan, a, roots) -> jax.Array:
    r"""Precondition and graft: one leaf's update.

    .. math::
      D = \mathrm{graft}(\hat m, \nu), \qquad
      U = \hat m \times_1 R_1 \cdots \times_k R_k, \qquad
      U_b \leftarrow U_b \, \|D_b\| / \|U_b\| \text{ per block } b

    with ``\hat m`` the bias-corrected (or Nesterov) first moment, ``D`` the
    graft method's diagonal update (:func:`layerwise_optax._grafting.graft_update`)
    and ``R_i`` the roots; no rescaling with ``grafting='none'``. Leaves without
    factors, and every leaf before ``start_preconditioning_step``, take ``D``; an
    invalid gradient leaf gets zero.
    """
    m_hat = _grafting.bias_corrected_first_moment(
        a.mu.astype(a.g32.dtype), a.g32, h.b1, count_inc, o.nesterov
    )
    diag = _grafting.graft_update(o.grafting, m_hat, a.nu, h.b2, h.eps, count_inc)
    if not plan.is_preconditioned:
        return _failure.zero_unless(a.ok, diag, g.dtype)
    pb = _kron.apply_axis_matrices(plan.to_blocks(m_hat), roots, plan)
    if o.grafting != "none":
        pb = _grafting.graft_blocks(pb, plan.block_sum_squares(diag))
    return _failure.zero_unless(a.ok, jnp.where(use_precond, plan.from_blocks(pb), diag), g.dtype)


def _update(o: _Options, updates, state, params=None):
    """One Shampoo step: accumulate, refresh every ``precondition_frequency`` steps, precondition."""
    del params
    h = _Hyper(*_checks.hyperparameters(o.b1, o.b2, o.eps, o.factor_decay, o.damping))
    with jax.named_scope("layerwise_optax.shampoo"):
        plans = o.resolve(updates)
        count_inc = _kron.increment(state.count)
        stats, roots = _kron.normalize(plans, state.stats), _kron.normalize(plans, state.roots)
        use_nu = _grafting.needs_second_moment(o.grafting)
        nus = state.nu if use_nu else jax.tree.map(lambda _: None, updates)
        accumulate = functools.partial(_accumulate, o, h)
        acc = _axes.map_leaves(accumulate, plans, updates, state.mu, nus, stats, roots)
        roots, failed = _kron.on_schedule(
            _kron.every(state.count, o.precondition_frequency),
            [functools.partial(_refresh, o, h, plans, count_inc)],
            lambda s, r: r,
            _axes.unzip(acc, "stats"),
            roots,
        )
        use_precond = state.count >= o.start_preconditioning_step
        precondition = functools.partial(_precondition, o, h, count_inc, use_precond)
        new_updates = _axes.map_leaves(precondition, plans, updates, acc, roots)
        nu = _axes.unzip(acc, "nu") if use_nu else None
        kept = _factored.stored(o, plans, acc, state, failed)
        roots = _axes.bare(plans, roots)
        return new_updates, ScaleByShampooState(
            count_inc, kept.mu, nu, kept.stats, roots, kept.failures
        )


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
    grafting: Literal["adam", "rmsprop", "adagrad", "sgd", "none"] = "adam",
    root_exponent: int | None = None,
    root_method: Literal["eigh", "newton"] = "eigh",
    relative_damping: bool = True,
    mu_dtype: jax.typing.DTypeLike | None = None,
    precond_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    factor_estimation: Literal["shampoo", "kl"] = "shampoo",
    distribute: bool = True,
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    factor_bias_correction: bool = False,
    factor_exponents: FactorExponents | None = None,
    trace_normalize: bool = False,
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
      grafting: ``'adam'``, ``'rmsprop'``, ``'adagrad'``, ``'sgd'`` or ``'none'``
        (see :mod:`layerwise_optax._grafting`).
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
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
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
      state_layout: Where the per-block state (statistics, roots) lives
        on a device mesh. ``'auto'`` (default): the *owner layout* when
        ``init`` runs under a mesh of more than one device (:func:`jax.set_mesh`,
        or params sharded over one; :func:`layerwise_optax.state_shardings` sets
        it), else replicated. ``'owner'``: the blocks of all leaves with the same
        block shape are stacked and the stack sharded along the block axis over
        the mesh (padded to a multiple of the device count), so each device
        stores, accumulates and refreshes only its own blocks and the state per
        device shrinks with the device count; without a mesh the stacks are kept
        whole. ``'replicated'``: per leaf, every factor on every device (the
        layout of earlier versions). The updates are the same in every layout.
        In the owner layout ``distribute`` has no effect (each device refreshes
        the blocks it holds). Static; checkpoints restore into the layout they
        were saved in (:func:`layerwise_optax.restore_state` resizes the
        padding for another device count).
      owner_axes: Mesh axes the owner layout shards the block axis over
        (``None``: all of them; a name or a tuple of names). Under ``jax.pmap``
        (or ``jax.shard_map``) with ``state_layout='owner'`` it names the mapped
        axis (pmap's ``axis_name``): ``init`` runs inside the pmap and each
        device's state holds only its ``padded / devices`` blocks of every group;
        ``update`` runs inside a pmap over the same axis and device count, takes
        each device's blocks at ``lax.axis_index`` and gathers the preconditioned
        ones with one ``lax.all_gather`` per group. Static.
      factor_exponents: Root orders per factor instead of one for all (static;
        see :func:`shampoo`). ``None`` (default): ``root_exponent`` for every
        factor. ``'one_sided'``: only the shortest factor dimension of each leaf
        gets a factor, with ``p = root_exponent`` or 2 (``(G G^T)^{-1/2} G`` for
        a wide matrix). A callable ``dims -> orders``: called for each leaf with
        factors at ``init`` and ``update`` with the tuple of its factor
        dimensions (the merged sizes ``d_1..d_k`` of its factor groups, before
        blocking), it returns one entry per dimension: an int ``p >= 1`` (the
        factor's inverse root ``L^{-1/p}``) or ``None`` (no factor: identity,
        nothing stored). Entries for unit dimensions are not used. With a
        callable, ``root_exponent`` must be ``None``.
      trace_normalize: Take the roots of ``L / (tr(L) / b)`` instead of ``L``,
        per block of length ``b`` (static; default ``False``; see
        :func:`shampoo`). Not with ``factor_estimation='kl'``.

    Returns:
      A :class:`optax.GradientTransformation` with state
      :class:`ScaleByShampooState`.

    Raises:
      ValueError: At construction for out-of-range hyperparameters, an unknown
        ``factor_exponents``, a callable ``factor_exponents`` with
        ``root_exponent``, or ``trace_normalize`` with KL-Shampoo; at ``init`` if
        ``dimension_numbers`` do not fit a parameter, or ``factor_exponents``
        returns something other than one ``None`` or int ``>= 1`` per factor
        dimension (odd orders with KL-Shampoo), naming its path.
        Also at ``init`` with ``state_layout='owner'`` inside ``jax.pmap``
        without ``owner_axes`` or with one that is not mapped there, or outside
        any mesh and pmap with ``owner_axes``; at ``update`` of a state built
        inside pmap outside a pmap over its axis or over another device count.

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
    options = _options(dict(locals()))  # every argument above, checked
    return optax.GradientTransformation(
        functools.partial(_factored.owned_init, options, init=_init, factors=("stats",)),
        functools.partial(_factored.owned_update, options, _update),
    )


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
    grafting: Literal["adam", "rmsprop", "adagrad", "sgd", "none"] = "adam",
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
    state_layout: Literal["auto", "owner", "replicated"] = "auto",
    owner_axes: str | tuple[str, ...] | None = None,
    factor_bias_correction: bool = False,
    factor_exponents: FactorExponents | None = None,
    trace_normalize: bool = False,
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

    **Per-factor root orders** (``factor_exponents``). The update becomes
    ``U = \hat m \times_1 R_1 \cdots \times_k R_k`` with
    ``R_i = (L^{(i)} + δI)^{-1/p_i}`` where an order ``p_i`` is given, and
    ``R_i = I`` where it is ``None``: that factor is not kept at all (its
    statistic and root are empty ``(stack, 0)`` placeholders, so a one-sided
    ``m × n`` leaf with ``m < n`` stores ``2 m^2`` floats instead of
    ``2 (m^2 + n^2)``), and its axis is still contracted in the other factors'
    statistics. ``'one_sided'`` keeps only the shortest side of each leaf, with
    ``p = 2``: ``(G G^T)^{-1/2} G``, the cheapest full-matrix Shampoo, which
    whitens the shorter side. With ``block_size`` the orders hold per block
    (each block is one-sided on its own); grafting and
    ``start_preconditioning_step`` work as before, and a leaf with no factor
    left takes the graft update. This is the per-dimension exponent override of
    Meta's Distributed Shampoo (``inverse_exponent_override``: an exponent per
    tensor order and dimension index, 0 for none); here the rule sees the
    dimension sizes, so it can pick a side by size. For a per-leaf choice use
    ``dimension_numbers`` with ``identity_axes``. With KL-Shampoo a dropped
    factor counts as ``L^{(j)} = I`` in the other factors' statistics: the
    KL-closest Kronecker-factored second moment with that factor held at the
    identity (for gradients ``A^{1/2} Z`` the kept factor is ``A``); the orders
    must be even there.

    **Trace normalization** (``trace_normalize=True``). Each factor (per block)
    is divided by its mean eigenvalue before damping and the root,
    ``R_i = (L^{(i)} / τ_i + δI)^{-1/p}`` with ``τ_i = tr(L^{(i)}) / b_i``, so the
    roots no longer depend on the gradients' scale: without grafting the update
    scales like the first moment (plain Shampoo's ``L^{-1/4} G R^{-1/4}`` is
    scale-free instead), and an absolute ``damping`` is relative to the mean
    eigenvalue. With grafting and the default relative damping it changes the
    update only through float32 round-off (each root is scaled by a positive
    number per block, which grafting divides out), but an ill-conditioned or
    rank-deficient factor amplifies that round-off in its eigendecomposition:
    up to ~2e-2 relative on a 64 x 16 leaf's rank-16 64 x 64 factor with
    ``damping=1e-6``, below 1e-4 with ``damping=1e-3``. It is meant for
    ``grafting='none'`` or ``relative_damping=False``. Not available with KL-Shampoo, whose factors
    carry the preconditioner's overall scale.

    Weight decay is decoupled and multiplied by the learning rate, as in
    :func:`optax.adamw`.

    Where to use it / what to tune: hidden matrices and conv kernels of networks
    whose gradients have strongly correlated rows/columns (ill-conditioned
    inputs, deep nets). Start from your AdamW learning rate (Adam grafting keeps
    the update size), then tune ``precondition_frequency`` (cost vs freshness),
    ``block_size`` (memory and refresh cost grow as ``b^2`` and ``b^3``) and
    ``damping``. When the long side's factor dominates memory or refresh time
    (very wide or embedding-like matrices), ``factor_exponents='one_sided'``
    keeps only the short side.

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
      grafting: ``'adam'``, ``'rmsprop'``, ``'adagrad'``, ``'sgd'`` or ``'none'``
        (see :mod:`layerwise_optax._grafting`).
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
        Computed in float32; a narrower dtype (``jnp.bfloat16`` halves
        this state) is written with unbiased stochastic rounding
        (:func:`layerwise_optax._kron.stochastic_round`), so EMAs keep moving.
      nesterov: Nesterov momentum.
      factor_estimation: ``'shampoo'`` or ``'kl'`` (KL-Shampoo; roots default to
        ``L^{-1/2}``).
      distribute: Spread the refresh over the mesh's devices (see
        :func:`scale_by_shampoo`).
      state_layout: ``'auto'``, ``'owner'`` or ``'replicated'`` (see
        :func:`layerwise_optax.scale_by_shampoo`).
      owner_axes: Mesh axes of the owner layout (``None``: all).
      factor_exponents: ``None``, ``'one_sided'`` or a callable
        ``dims -> orders`` (one int ``>= 1`` or ``None`` per factor dimension;
        see above and :func:`scale_by_shampoo`). Static.
      trace_normalize: Roots of trace-normalized factors (static; see above).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: At construction if a hyperparameter is out of range or two
        options conflict; at ``init`` if ``dimension_numbers`` or the orders of
        ``factor_exponents`` do not fit a parameter.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> params = {'w': jnp.ones((4, 3)), 'b': jnp.zeros(3)}
      >>> tx = lo.shampoo(learning_rate=1e-2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> jax.tree.map(jnp.shape, updates)
      {'b': (3,), 'w': (4, 3)}

      One-sided Shampoo keeps only the shorter side's factor of a ``64 x 16``
      kernel (the other is an empty placeholder):

      >>> tx = lo.shampoo(1e-2, factor_exponents='one_sided')
      >>> [s.shape for s in tx.init({'w': jnp.ones((64, 16))})[0].stats['w']]
      [(1, 0), (1, 16, 16)]

    References:
      Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
      Optimization <https://arxiv.org/abs/1802.09568>`_, 2018.
      Anil et al., `Scalable Second Order Optimization for Deep Learning
      <https://arxiv.org/abs/2002.09018>`_, 2020.
      Lin et al., Understanding and Improving Shampoo and SOAP via
      Kullback-Leibler Minimization, 2025 (KL-Shampoo).
      Meta's Distributed Shampoo, `facebookresearch/optimizers
      <https://github.com/facebookresearch/optimizers>`_
      (``inverse_exponent_override``: per-dimension root orders).

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
            state_layout=state_layout,
            owner_axes=owner_axes,
            relative_damping=relative_damping,
            factor_bias_correction=factor_bias_correction,
            factor_exponents=factor_exponents,
            trace_normalize=trace_normalize,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            nesterov=nesterov,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
