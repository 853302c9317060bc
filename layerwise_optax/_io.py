"""Output helpers shared by the zoo's command line, the benchmarks and the notebooks.

Two things every place that writes results gets wrong in the same way, fixed once:

* :func:`atomic_write` writes a file under a temporary name in the same folder and
  renames it, so an interrupted run never leaves a half-written output. The temporary
  file is created by the writer itself (``open``, ``savefig``, ...), so it gets the
  permissions of any new file (``0o666`` minus the umask, usually ``0o644``).
  ``tempfile.mkstemp`` would create it ``0o600``, and the rename keeps that mode: the
  outputs of a run would be unreadable to everyone else on the machine.
* :func:`progress_bar` picks tqdm's frontend for where it runs: the widget bar in a
  Jupyter kernel that has ``ipywidgets`` (Colab), the text bar everywhere else.
  ``tqdm.auto`` picks the widget bar in any kernel and, without ``ipywidgets``, warns
  (``TqdmWarning: IProgress not found``) and prints nothing useful.

Standard library only; tqdm is imported lazily through :mod:`layerwise_optax._optional`.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerwise_optax import _optional


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Writes ``path`` through a temporary file in the same folder, then renames it.

    Args:
      path: the file to write; its folder is created if missing.
      write: called once with the temporary path (a :class:`~pathlib.Path` that does not
        exist yet, ending in ``.tmp``); it must create and fill that file, e.g.
        ``lambda tmp: tmp.write_text(text)`` or
        ``lambda tmp: fig.savefig(tmp, format="png")`` (give the format: the suffix is
        ``.tmp``).

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      Whatever ``write`` raises; the temporary file is removed first and ``path`` is
      left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _in_widget_kernel() -> bool:
    """Whether this process is a Jupyter kernel that can draw ipywidgets."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(needed_by: str = "layerwise_optax's progress bar", **kwargs: Any) -> Any:
    """A ``tqdm`` progress bar with the frontend that renders where this runs.

    Args:
      needed_by: What asks for the bar, for the missing-tqdm message.
      **kwargs: passed to ``tqdm`` (``total``, ``desc``, ``disable``, ``leave``, ...).

    Returns:
      ``tqdm.notebook.tqdm(**kwargs)`` in a Jupyter kernel with ``ipywidgets``,
      ``tqdm.std.tqdm(**kwargs)`` elsewhere.

    Raises:
      ModuleNotFoundError: If tqdm is not installed; the message names the extra
        that installs it (``zoo``).
    """
    frontend = "tqdm.notebook" if _in_widget_kernel() else "tqdm.std"
    return _optional.require(frontend, needed_by, "zoo").tqdm(**kwargs)
