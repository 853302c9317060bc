"""Optional dependencies: every import of one says which extra installs it.

The core package needs only jax, optax and numpy. ``layerwise_optax.flax`` needs
Flax, ``layerwise_optax.zoo`` Flax, matplotlib (figures) and tqdm (progress bars).
:func:`require` imports such a module and, when it is missing, raises a
:class:`ModuleNotFoundError` that names the part of the package that needs it and
the ``pip install`` line of its extra (the extras are in ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
import types

# Top-level optional module -> the extra that installs it, per part of the package.
EXTRAS: dict[str, str] = {
    "flax": "flax",
    "matplotlib": "zoo",
    "tqdm": "zoo",
    "threadpoolctl": "zoo",
}


def install_hint(extra: str) -> str:
    """The ``pip install`` line of an extra."""
    return f"pip install 'layerwise-optax[{extra}]'"


def require(name: str, needed_by: str, extra: str | None = None) -> types.ModuleType:
    """Imports ``name``; if it is not installed, says which extra to install.

    Args:
      name: Module to import (dotted names allowed, e.g. ``'tqdm.std'``).
      needed_by: What needs it, for the message (e.g. ``'layerwise_optax.zoo'``).
      extra: The extra to name; default the one :data:`EXTRAS` lists for the
        top-level module.

    Returns:
      The imported module.

    Raises:
      ModuleNotFoundError: The module (or one it imports) is not installed; the
        message names ``needed_by``, the missing module and the extra.
    """
    top = name.split(".")[0]
    extra = extra or EXTRAS[top]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or top
        raise ModuleNotFoundError(
            f"{needed_by} needs the optional dependency {top!r}, which is not installed "
            f"(missing module {missing!r}). Install it with: {install_hint(extra)}",
            name=missing,
        ) from err
