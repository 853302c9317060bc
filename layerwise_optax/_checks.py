"""Construction-time validators for hyperparameters.

Each check only inspects plain Python numbers: arrays, tracers and schedules are
skipped, so every numeric hyperparameter still works under
``optax.inject_hyperparams``. Messages name the argument, the value and what is
allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric(name: str, value: Any) -> None:
    """Checks that a numeric hyperparameter is a number, an array or a schedule.

    Strings, ``None``, bools and containers raise ``TypeError`` naming the
    argument; arrays, tracers (``inject_hyperparams``) and callables (schedules)
    pass unchecked.
    """
    if value is None or isinstance(value, (str, bytes, bool, list, tuple, dict, set)):
        raise TypeError(
            f"{name} must be a number, an array or a schedule, got {type(value).__name__} "
            f"{value!r}."
        )


def tree_or_callable(name: str, value: Any) -> None:
    """Checks a tree-valued option (mask, roles, dimension numbers) is not a scalar or string."""
    if isinstance(value, (str, bytes, bool, int, float)):
        raise TypeError(
            f"{name} must be None, a pytree or a callable of the params, got "
            f"{type(value).__name__} {value!r}."
        )


def in_unit_interval(name: str, value: Any, *, right_closed: bool = False) -> None:
    """Checks ``0 <= value < 1`` (or ``<= 1`` when ``right_closed``)."""
    numeric(name, value)
    if _is_number(value):
        ok = 0 <= value <= 1 if right_closed else 0 <= value < 1
        if not ok:
            bracket = "]" if right_closed else ")"
            raise ValueError(f"{name} must be in [0, 1{bracket}, got {value!r}.")


def tolerance(name: str, value: Any) -> None:
    """Checks an optional relative tolerance: ``None``, or a real number in ``[0, 1]``.

    Arrays and tracers (``inject_hyperparams``) pass unchecked when scalar. Raises
    ``ValueError`` naming the argument for anything else (a string, a bool, NaN,
    a value outside ``[0, 1]``, a non-scalar array).
    """
    if value is None:
        return
    if isinstance(value, (jax.Array, np.ndarray, np.floating)) and not isinstance(value, bool):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be None or a scalar, got shape {np.shape(value)}.")
        if isinstance(value, np.floating):
            value = float(value)
        else:
            return
    if not _is_number(value):
        raise ValueError(
            f"{name} must be None or a float in [0, 1], got {type(value).__name__} {value!r}."
        )
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be None or in [0, 1], got {value!r}.")


def non_negative(name: str, value: Any) -> None:
    """Checks ``value >= 0`` (plain numbers only)."""
    numeric(name, value)
    if _is_number(value) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def positive(name: str, value: Any) -> None:
    """Checks ``value > 0`` (plain numbers only)."""
    numeric(name, value)
    if _is_number(value) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def _static_message(name: str, value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)):
        # optax.inject_hyperparams turns every int default into a traced array.
        return (
            f"{name} fixes shapes or unrolled loops, so it must be a Python int, got an "
            f"array {value!r}; with optax.inject_hyperparams pass "
            f"static_args=({name!r},), or use layerwise_optax.inject_hyperparams."
        )
    return f"{name} must be a Python int (it is static), got {type(value).__name__} {value!r}."


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Checks that a static, shape-determining argument is a Python int >= 1."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(_static_message(name, value))
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}.")


def non_negative_int(name: str, value: Any) -> None:
    """Checks that a static argument is a Python int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(_static_message(name, value))
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def traceable_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    """Checks an integer argument that may be traced (a step period, a seed).

    A Python int must be ``>= minimum``; an integer scalar array (a value that
    ``optax.inject_hyperparams`` put in its state, or a tracer) passes unchecked.
    Anything else (floats, bools, strings, non-scalar or float arrays) raises
    ``TypeError`` naming the argument.
    """
    if isinstance(value, (jax.Array, np.ndarray, np.integer)) and not isinstance(value, bool):
        if np.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{name} must be an int or an integer scalar array, got an array of "
                f"shape {np.shape(value)} and dtype {value.dtype}."
            )
        if isinstance(value, np.integer):
            value = int(value)
        else:
            return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Checks that a mode string is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {sorted(allowed)}.")


def axis_names(name: str, value: Any) -> None:
    """Checks an optional tuple of mesh axis names (``None``, a string or a sequence of strings)."""
    if value is None or isinstance(value, str):
        return
    if (
        not isinstance(value, (tuple, list))
        or not value
        or not all(isinstance(a, str) for a in value)
    ):
        raise ValueError(
            f"{name} must be None, a mesh axis name or a non-empty tuple of mesh axis names, "
            f"got {value!r}."
        )


def boolean(name: str, value: Any) -> None:
    """Checks a static flag is a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}.")


def alias_args(learning_rate: Any, weight_decay: Any, mask: Any, prefix: str = "") -> None:
    """The arguments every alias passes to optax: rates and masks."""
    non_negative(f"{prefix}learning_rate", learning_rate)
    non_negative(f"{prefix}weight_decay", weight_decay)
    if mask is not None:
        tree_or_callable(f"{prefix}mask", mask)


def hyperparameters(*values: Any) -> tuple[jax.Array, ...]:
    """Float hyperparameters as float32 arrays, before any arithmetic on them.

    One arithmetic for plain and injected values: Python would compute ``1 - b2``
    in float64 and round once, while a value that ``optax.inject_hyperparams`` put
    in its state (float32, or float64 under ``jax_enable_x64``) is rounded first;
    the two differ by ~1e-5 relative at ``b2 = 0.999``. Rounding every
    hyperparameter to float32 first makes both give bit-identical updates, in
    float32 and float64 modes alike.
    """
    return tuple(jnp.asarray(v, jnp.float32) for v in values)


def canonicalize_dtype(dtype: Any, name: str = "dtype") -> Any:
    """Returns ``None`` unchanged, otherwise the canonical jnp dtype (a float dtype)."""
    if dtype is None:
        return None
    try:
        out = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a dtype such as jnp.float32, got {dtype!r}.") from e
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype, got {out.name}.")
    return out
