"""Peer optimizers for side-by-side runs, with the compatibility shims they need.

Shims live here (and in tests), never in the library. Each loader returns
``None`` and a message naming the peer when it cannot be imported, so the rest of
a benchmark still runs.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.tree_util as tree_util
import optax


def _restore_jax_tree_aliases() -> None:
    """precondition-opt 0.3.0 calls ``jax.tree_map`` & co., removed from new jax."""
    for name in ("tree_map", "tree_leaves", "tree_flatten", "tree_unflatten", "tree_structure"):
        if not hasattr(jax, name):
            setattr(jax, name, getattr(tree_util, name))


def distributed_shampoo() -> tuple[Any, str | None]:
    """precondition-opt's Distributed Shampoo module, or ``(None, reason)``."""
    try:
        _restore_jax_tree_aliases()
        from precondition import distributed_shampoo as ds
    except Exception as e:  # noqa: BLE001 - report any import failure by name
        return None, f"precondition-opt (Distributed Shampoo) unavailable: {type(e).__name__}: {e}"
    return ds, None


def ds_shampoo(
    *,
    learning_rate: float,
    block_size: int,
    frequency: int,
    graft: str,
    damping: float,
    nesterov: bool,
):
    """Distributed Shampoo configured to match ``layerwise_optax.shampoo`` settings.

    Matched: block size, refresh period (``preconditioning_compute_steps``),
    statistics EMA 0.999 (``beta2``), momentum 0.9, relative damping, grafting
    (RMSProp, SGD), Nesterov, no merging beyond the block size, preconditioning
    from step 1. Its roots use the coupled Newton iteration.
    """
    ds, err = distributed_shampoo()
    if ds is None:
        raise ImportError(err)
    graft_type = {"rmsprop": ds.GraftingType.RMSPROP, "sgd": ds.GraftingType.SGD}[graft]
    tx = ds.distributed_shampoo(
        learning_rate=learning_rate,
        block_size=block_size,
        beta1=0.9,
        beta2=0.999,
        diagonal_epsilon=1e-8,
        matrix_epsilon=damping,
        relative_matrix_epsilon=True,
        start_preconditioning_step=1,
        preconditioning_compute_steps=frequency,
        statistics_compute_steps=1,
        graft_type=graft_type,
        nesterov=nesterov,
        moving_average_for_momentum=True,
        merge_small_dims_block_size=block_size,
        skip_preconditioning_dim_size_gt=1 << 30,
        generate_training_metrics=False,
    )
    return optax.GradientTransformation(_quiet(tx.init), _quiet(tx.update))


def _quiet(fn):
    """Runs DS under its own assumptions: implicit rank promotion allowed (our test
    suite raises on it), and its float64 requests (truncated to float32 without x64)
    not reported as warnings."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings(), jax.numpy_rank_promotion("allow"):
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            return fn(*args, **kwargs)

    return wrapped


def kfac_jax() -> tuple[Any, str | None]:
    """kfac-jax with its graph matcher patched for jax >= 0.10, or ``(None, reason)``.

    kfac-jax 0.0.8's ``tag_graph_matcher.eval_jaxpr_eqn`` unpacks
    ``Primitive.get_bind_params`` as ``(subfuns, params)``; jax 0.10 returns the
    params only (``ValueError: too many values to unpack`` at the first step). The
    shim accepts both return shapes. Benchmark-only: never imported by the library.
    """
    try:
        import kfac_jax as kj
        from kfac_jax._src import tag_graph_matcher as tgm
    except Exception as e:  # noqa: BLE001 - report any import failure by name
        return None, f"kfac-jax unavailable: {type(e).__name__}: {e}"

    def eval_jaxpr_eqn(eqn, in_values):
        bound = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
        with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
            out = eqn.primitive.bind(*subfuns, *in_values, **params)
        return out if isinstance(out, list) else [out]

    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    return kj, None


def psgd_jax() -> tuple[Any, str | None]:
    """psgd-jax's ``kron`` module with its optax import shimmed, or ``(None, reason)``.

    psgd-jax 0.2.9 imports ``optax._src.clipping``, which optax 0.2.8 moved to
    ``optax.transforms._clipping``; the shim aliases the old module name before the
    import. Benchmark-only: never imported by the library.
    """
    try:
        import sys

        import optax.transforms._clipping as clipping

        sys.modules.setdefault("optax._src.clipping", clipping)
        import optax._src as optax_src

        if not hasattr(optax_src, "clipping"):
            optax_src.clipping = clipping
        from psgd_jax import kron
    except Exception as e:  # noqa: BLE001 - report any import failure by name
        return None, f"psgd-jax unavailable: {type(e).__name__}: {e}"
    return kron, None
