"""Construction-time validators for hyperparameters.

Each check only inspects plain Python numbers: arrays, tracers and schedules are
skipped, so every numeric hyperparameter still works under
``optax.inject_hyperparams``. Messages name the argument, the value and what is
allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp


def _is_number(value: Any) -> bool:
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


def positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Checks that a static, shape-determining argument is a Python int >= 1."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a Python int (it is static), got {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}.")


def non_negative_int(name: str, value: Any) -> None:
    """Checks that a static argument is a Python int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a Python int (it is static), got {type(value).__name__} {value!r}."
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Checks that a mode string is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {sorted(allowed)}.")


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


def integer(name: str, value: Any) -> None:
    """Checks that a static argument (e.g. a seed) is a Python int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}.")


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
