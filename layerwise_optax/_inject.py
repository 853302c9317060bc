"""``inject_hyperparams`` that knows each factory's static arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optax

from layerwise_optax import _checks, _registry


def static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments of a layerwise_optax factory that must stay static.

    Args:
      factory: An alias or ``scale_by_*`` function of this library (an entry of
        its optimizer registry).

    Returns:
      The names that fix shapes, modes or trees (they cannot be traced).

    Raises:
      ValueError: If ``factory`` is not a factory of this library.
    """
    try:
        declared = _registry.static_args_of(factory)
    except KeyError:
        raise ValueError(
            f"factory must be an optimizer factory of layerwise_optax, got {factory!r}."
        ) from None
    # A module declares one tuple for its alias and its scale_by_* function; each
    # factory keeps the names it actually has.
    params = inspect.signature(factory).parameters
    return tuple(a for a in declared if a in params)


def inject_hyperparams(
    factory: Callable[..., Any], hyperparam_dtype: Any = None
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """:func:`optax.inject_hyperparams` with the factory's static arguments filled in.

    Numeric hyperparameters (``learning_rate``, ``b1``, ``damping``, refresh
    periods, PSGD's ``seed``, ...) become part of the state and may be schedules;
    shape- and mode-determining ones (``block_size``, ``max_precond_dim``,
    ``ns_steps``, ``grafting``, ``dimension_numbers``, ...) stay static.

    Plain :func:`optax.inject_hyperparams` works too: every shape-determining
    argument defaults to ``None`` (or a string or bool), which optax leaves
    static, so only values you pass for them need ``static_args``. Either way the
    updates equal those of the plain factory: each float hyperparameter is
    rounded to float32 before any arithmetic, whether it arrives as a Python
    number or as a float32/float64 array from the state.

    Args:
      factory: An alias or ``scale_by_*`` function of this library.
      hyperparam_dtype: Optional dtype of the injected hyperparameters.

    Returns:
      A factory with the same signature whose state holds the hyperparameters.

    Examples:
      >>> import optax, jax.numpy as jnp
      >>> import layerwise_optax as lo
      >>> tx = lo.inject_hyperparams(lo.shampoo)(
      ...     learning_rate=optax.linear_schedule(1e-3, 0.0, 100), block_size=128)
      >>> state = tx.init({'w': jnp.ones((4, 3))})
      >>> round(float(state.hyperparams['learning_rate']), 6)
      0.001
    """
    static = static_args(factory)
    _checks.canonicalize_dtype(hyperparam_dtype, "hyperparam_dtype")
    return optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=hyperparam_dtype)
