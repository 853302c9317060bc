"""The phases Shampoo and SOAP share, written once.

Both keep a first moment and per-axis factor EMAs of each leaf, refresh a
per-factor matrix (roots, eigenbases) every ``precondition_frequency`` steps and
store the same state parts. What differs (Shampoo's roots, graft and KL
statistics; SOAP's rotated second moment and bases) stays in their modules:

* :class:`FactoredOptions`: the arguments both take, checked at construction
  (:func:`factored_options`), and the plans they give (``resolve``);
* :func:`init_factored`: plans, zero first moment and statistics, identity factors;
* :func:`accumulate`: the guarded accumulate phase of one leaf (:class:`Accumulated`);
* :func:`stored`: the first moment in its storage dtype, the statistics stored
  bare, the failure counts (:class:`Stored`).

The refresh schedule is :func:`layerwise_optax._kron.on_schedule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _axes, _checks, _failure, _kron, _owner

_O = TypeVar("_O", bound="FactoredOptions")


class Accumulated(NamedTuple):
    """One leaf after the accumulate phase of Shampoo or SOAP (see :func:`accumulate`)."""

    ok: jax.Array  # bool scalar: gradient and its statistics were valid
    g32: jax.Array  # the gradient in at least float32, zero where not ok
    blocks: jax.Array  # its block view
    mu: jax.Array  # the new first moment (float32 or wider)
    stats: _kron.Factors  # the new factor EMAs
    nu: Any = None  # the optimizer's second moment, filled in by the caller


def accumulate(
    g: jax.Array,
    plan: _axes.LeafPlan,
    mu: jax.Array,
    stats: _kron.Factors,
    b1: jax.Array,
    decay: jax.Array,
    estimate: Callable[[jax.Array], _kron.Factors] | None = None,
    *,
    check_estimates: bool = False,
) -> Accumulated:
    """The guarded accumulate phase: first moment and factor EMAs of one leaf.

    .. math::
      m \\leftarrow b_1 m + (1 - b_1) G, \\qquad
      L_i \\leftarrow \\beta L_i + (1 - \\beta) \\hat L_i(G)

    with ``\\hat L_i = G_(i) G_(i)^T`` (:func:`layerwise_optax._kron.axis_stats`)
    unless ``estimate`` gives another per-axis estimate (KL-Shampoo's
    :func:`layerwise_optax._kron.kl_axis_stats`), and the EMA rule of
    :func:`layerwise_optax._kron.ema` (``decay == 1`` sums).

    Failure policy: a gradient that is not valid
    (:func:`layerwise_optax._failure.guard`) changes neither ``m`` nor ``L`` and
    has ``ok`` false. The plain statistics of a valid gradient are finite (see
    :func:`~layerwise_optax._failure.guard`); estimates that go through other
    matrices (KL's inverses) can still overflow, and ``check_estimates`` treats
    those like an invalid gradient.

    Args:
      g: Gradient leaf (any float dtype).
      plan: Its plan.
      mu: The stored first moment.
      stats: The stored factor EMAs (factor tuple).
      b1: First-moment decay (float32 scalar).
      decay: Factor EMA decay (float32 scalar).
      estimate: ``blocks -> factor tuple``; ``None``:
        :func:`layerwise_optax._kron.axis_stats`.
      check_estimates: Also require every estimate to be finite.

    Returns:
      An :class:`Accumulated` with ``nu`` left ``None``.
    """
    ok, g32 = _failure.guard(g, per_block=plan.per_block)
    blocks = plan.to_blocks(g32)
    new = _kron.axis_stats(blocks, plan) if estimate is None else estimate(blocks)
    if check_estimates:
        ok = ok & _failure.fit(_kron.all_finite(new, per_block=plan.per_block), ok)
    mu = _failure.keep(ok, b1 * mu + (1 - b1) * g32, mu)
    return Accumulated(ok, g32, blocks, mu, _kron.ema(stats, new, decay, valid=ok))


@dataclasses.dataclass(frozen=True)
class FactoredOptions:
    """The arguments Shampoo and SOAP share, validated (see :func:`factored_options`).

    Float hyperparameters may be traced (``optax.inject_hyperparams``); the rest
    are static. Shampoo's options extend these.
    """

    b1: Any
    b2: Any
    eps: Any
    factor_decay: Any
    precondition_frequency: Any
    max_precond_dim: int
    block_size: int | None
    merge_small_dims: bool
    distribute: bool
    dimension_numbers: Any
    mu_dtype: Any
    precond_dtype: Any
    state_layout: str
    owner_axes: Any
    # Set on the copy of the options that runs on an owner layout's grouped tree
    # (:func:`owned_update`): the grouped tree's plans.
    grouped_plans: Any = dataclasses.field(default=None, kw_only=True)
    # ... and its layout (:class:`layerwise_optax._owner.Layout`: which blocks are padding).
    grouped_layout: Any = dataclasses.field(default=None, kw_only=True)

    def resolve(self, tree: Any) -> Any:
        """The plans of ``tree`` (:func:`layerwise_optax._axes.resolve`)."""
        if self.grouped_plans is not None:
            return self.grouped_plans
        return _axes.resolve(
            self.dimension_numbers,
            tree,
            max_precond_dim=self.max_precond_dim,
            block_size=self.block_size,
            merge_small_dims=self.merge_small_dims,
        )


def factored_options(cls: type[_O], args: Mapping[str, Any], default_max_precond_dim: int) -> _O:
    """``cls(**args)`` after checking the :class:`FactoredOptions` fields.

    Raises ``ValueError`` naming the argument and the allowed range; fills in
    ``max_precond_dim`` (``None``: ``default_max_precond_dim``) and the dtypes
    (``precond_dtype`` ``None``: float32).
    """
    if args["dimension_numbers"] is not None:
        _checks.tree_or_callable("dimension_numbers", args["dimension_numbers"])
    for name in ("b1", "b2"):
        _checks.in_unit_interval(name, args[name])
    _checks.non_negative("eps", args["eps"])
    _checks.in_unit_interval("factor_decay", args["factor_decay"], right_closed=True)
    _checks.positive("factor_decay", args["factor_decay"])
    _checks.traceable_int("precondition_frequency", args["precondition_frequency"], minimum=1)
    _checks.positive_int("max_precond_dim", args["max_precond_dim"], allow_none=True)
    _checks.positive_int("block_size", args["block_size"], allow_none=True)
    for name in ("merge_small_dims", "distribute"):
        _checks.boolean(name, args[name])
    _checks.one_of("state_layout", args["state_layout"], _owner.LAYOUTS)
    _checks.axis_names("owner_axes", args["owner_axes"])
    max_dim = args["max_precond_dim"]
    return cls(
        **{
            **args,
            "max_precond_dim": default_max_precond_dim if max_dim is None else max_dim,
            "mu_dtype": _checks.canonicalize_dtype(args["mu_dtype"], "mu_dtype"),
            "precond_dtype": _checks.canonicalize_dtype(args["precond_dtype"], "precond_dtype")
            or jnp.float32,
        }
    )


class FactoredInit(NamedTuple):
    """The parts of a Shampoo or SOAP state that ``init`` builds alike."""

    plans: Any
    mu: Any  # zeros like the params, dtype ``mu_dtype``
    stats: Any  # zero factor statistics, stored bare
    identity: Any  # identity factors (roots or bases), stored bare


def init_factored(options: FactoredOptions, params: Any) -> FactoredInit:
    """Plans, zero first moment, zero statistics and identity factors of ``params``."""
    plans = options.resolve(params)
    return FactoredInit(
        plans,
        optax.tree.zeros_like(params, dtype=options.mu_dtype),
        _kron.init_factor_tree(plans, params, options.precond_dtype),
        _kron.init_factor_tree(plans, params, options.precond_dtype, identity=True),
    )


class Stored(NamedTuple):
    """The parts of a new Shampoo or SOAP state written alike (:func:`stored`)."""

    mu: Any
    stats: Any
    failures: _failure.FailureCounts


def stored(options: FactoredOptions, plans: Any, acc: Any, state: Any, failed: jax.Array) -> Stored:
    """The first moment in its storage dtype, the factor EMAs stored bare, the counts.

    The EMAs, computed in float32, are stored in the dtype of ``state.stats``
    (``precond_dtype``) by :func:`layerwise_optax._kron.store`: stochastic
    rounding to a narrower dtype, salted with the step count.

    Args:
      options: The optimizer's options (``mu_dtype``; ``None``: the stored dtype).
      plans: The plans.
      acc: Per leaf the :class:`Accumulated` of this step.
      state: The previous state (``count``, ``mu``, ``stats`` and ``failures`` fields).
      failed: This step's failed refreshes (int32).

    Returns:
      A :class:`Stored`; ``failures`` adds this step's invalid leaves as skipped.
    """
    mu = _axes.unzip(acc, "mu")
    mu = (
        optax.tree.cast(mu, options.mu_dtype)
        if options.mu_dtype is not None
        else optax.tree.cast_like(mu, state.mu)
    )
    skipped = _failure.count_invalid(_axes.unzip(acc, "ok"))
    return Stored(
        mu,
        _kron.store(_axes.bare(plans, _axes.unzip(acc, "stats")), state.stats, state.count),
        _failure.add(state.failures, skipped=skipped, failed=failed),
    )


def owned_init(
    options: FactoredOptions, params: Any, init: Callable[[Any, Any], Any], factors: Sequence[str]
) -> Any:
    """``init(options, params)``, in the owner layout when :func:`_owner.decide` says so.

    In the owner layout the state's params-like fields hold
    :class:`layerwise_optax._owner.Grouped` trees built by ``init`` on the grouped
    tree (:mod:`layerwise_optax._owner`), laid out along the block axis over the
    mesh; the statistics fields named in ``factors`` hold the identity in padded
    blocks (:func:`layerwise_optax._owner.pad_identity`).
    """
    plans = options.resolve(params)
    layout = _owner.decide(options.state_layout, options.owner_axes, plans, params)
    if layout is None:
        return init(options, params)
    inner = dataclasses.replace(options, grouped_plans=layout.plans(plans))
    state = init(inner, _owner.zeros(layout, plans, params))
    fields = {}
    for name in state._fields:
        value = getattr(state, name)
        if isinstance(value, dict) and set(value) == {"blocks", "leaves"}:
            if name in factors:
                eyes = _kron.init_factor_tree(
                    inner.grouped_plans, value, options.precond_dtype, identity=True
                )
                value = {
                    **value,
                    "blocks": _owner.pad_identity(layout, value["blocks"], eyes["blocks"]),
                }
            fields[name] = _owner.grouped(_owner.place_state(layout, value), layout)
    return state._replace(**fields)


def owned_update(
    options: FactoredOptions,
    update: Callable[[Any, Any, Any], tuple[Any, Any]],
    updates: Any,
    state: Any,
    params: Any = None,
    *,
    counters: Sequence[str] = (),
) -> tuple[Any, Any]:
    """``update(options, updates, state)`` on the grouped tree of an owner-layout state.

    The gradient of each leaf is checked once (the failure policy's
    :func:`layerwise_optax._failure.guard`); its blocks go to their owners
    (:func:`layerwise_optax._owner.to_groups`, NaN where the leaf is not valid),
    the optimizer's own code runs on the grouped tree, and the new updates come
    back in the parameters' shapes (:func:`layerwise_optax._owner.from_groups`).
    Skipped events are counted per leaf, as in the replicated layout; inside
    ``jax.pmap`` (a mapped layout) each device refreshes only its own blocks,
    and the failed refreshes are summed over the devices, as are the int32 state
    fields named in ``counters`` (where not ``None``; SOAP's ``refresh_skips``).
    """
    del params  # Shampoo and SOAP do not read them.
    layout = _owner.layout_of(state)
    if layout is None:
        return update(options, updates, state)
    plans = options.resolve(updates)
    _owner.check(layout, plans, updates)
    _owner.check_mapped(layout)
    nodes = _owner.plan_nodes(plans)
    bare = _owner._bare_leaves(plans, updates)
    valid = [
        None if _axes.is_masked(plan) else _failure.guard(x)[0] for plan, x in zip(nodes, bare)
    ]
    grouped_updates = _owner.to_groups(layout, plans, updates, valid=valid)
    inner = dataclasses.replace(options, grouped_plans=layout.plans(plans), grouped_layout=layout)
    fields = {
        name: (value.tree() if isinstance(value, _owner.Grouped) else value)
        for name, value in zip(state._fields, state)
    }
    new_grouped, new_state = update(inner, grouped_updates, type(state)(**fields))
    skipped = _failure.count_invalid([v for v in valid if v is not None])
    failures = _failure.FailureCounts(
        state.failures.skipped + skipped,
        _owner.total_failed(layout, state.failures.failed, new_state.failures.failed),
    )
    out = {
        name: (
            _owner.grouped(getattr(new_state, name), layout)
            if isinstance(getattr(state, name), _owner.Grouped)
            else getattr(new_state, name)
        )
        for name in state._fields
    }
    out["failures"] = failures
    for name in counters:
        if getattr(new_state, name) is not None:
            out[name] = _owner.total_failed(layout, getattr(state, name), getattr(new_state, name))
    return _owner.from_groups(layout, plans, new_grouped, updates), type(state)(**out)
