"""A spike guard: skip the whole step when the loss or gradient norm jumps.

Large-scale training stacks (MaxText, levanter) skip an update when the loss or
the global gradient norm is an outlier against its recent history, instead of
letting one bad batch wreck the preconditioner statistics and the weights.
:func:`skip_step_on_spikes` does that around any optax transformation; the
skipped steps are counted in the failure counters :func:`layerwise_optax.failure_report`
reads, under the algorithm name ``'spike_guard'``.

Design choices (the issue leaves them open):

* the history is a ring buffer of the last ``window`` *accepted* values, so the
  statistics are exact (a float64 NumPy reference can reproduce them) and a
  skipped value never enters them: a run of spikes cannot drag the mean up until
  spikes stop looking like spikes;
* the test is one-sided (a loss or gradient norm *above* the mean), with the
  sample standard deviation (``ddof=1``) floored at ``1e-6 |mean|`` so that a
  constant history does not flag float32 rounding noise;
* on a skipped step the inner transformation's update is still computed (a
  ``select``, not a ``cond``: under ``vmap`` both branches run anyway) and its
  new state is discarded, leaf by leaf, in favour of the old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layerwise_optax import _checks, _failure

WATCHABLE = ("loss", "grad_norm")

# window and watch fix the history's shape; the rest may be injected.
_STATIC_ARGS = ("window", "watch")


class SkipStepOnSpikesState(NamedTuple):
    """State of :func:`skip_step_on_spikes`.

    Attributes:
      count: int32 scalar, steps seen (accepted and skipped).
      accepted: int32 scalar, steps accepted so far; the next accepted value is
        written at row ``accepted % window`` of ``history``.
      history: float32 ``(window, len(watch))``, the last ``min(accepted,
        window)`` accepted values of each watched quantity, in ``watch`` order
        (rows not yet written are zero).
      inner_state: The wrapped transformation's state; left exactly as it was
        on a skipped step.
      failures: :class:`~layerwise_optax.FailureCounts`; ``skipped`` counts the
        skipped *steps* (spikes, and steps with a non-finite loss or gradient),
        ``failed`` stays 0.
    """

    count: jax.Array
    accepted: jax.Array
    history: jax.Array
    inner_state: Any
    failures: _failure.FailureCounts


def _check_watch(watch: Any) -> tuple[str, ...]:
    if not isinstance(watch, (tuple, list)):
        raise TypeError(
            f"watch must be a tuple of names from {WATCHABLE}, got {type(watch).__name__} "
            f"{watch!r}."
        )
    if not watch or len(set(watch)) != len(watch) or not set(watch) <= set(WATCHABLE):
        raise ValueError(
            f"watch must be a non-empty tuple of distinct names from {WATCHABLE}, got {watch!r}."
        )
    return tuple(watch)


def _global_norm(tree: Any) -> jax.Array:
    """The Frobenius norm of a gradient tree in float32 (inf when it overflows)."""
    squares = [
        jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
        for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32))).astype(jnp.float32)


def window_statistics(history: jax.Array, accepted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample standard deviation of the filled rows of ``history``.

    Args:
      history: ``(window, k)`` ring buffer.
      accepted: int32 scalar, values written so far (``min(accepted, window)``
        rows are filled).

    Returns:
      ``(mean, std)``, each ``(k,)`` float32; ``std`` uses ``ddof=1`` and is 0
      with fewer than two values.
    """
    window = history.shape[0]
    n = jnp.minimum(accepted, window)
    filled = (jnp.arange(window) < n)[:, None]
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(filled, history, 0.0), axis=0) / nf
    dev = jnp.where(filled, history - mean[None, :], 0.0)
    var = jnp.sum(jnp.square(dev), axis=0) / jnp.maximum(n - 1, 1).astype(jnp.float32)
    return mean, jnp.sqrt(var)


def skip_step_on_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 100,
    threshold: float = 6.0,
    warmup: int = 20,
    watch: Sequence[str] = WATCHABLE,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips an update whose loss or gradient norm is a z-score outlier.

    Each step observes the watched quantities ``x``: the loss (the extra
    argument ``value=``, optax's name for it in
    :func:`optax.contrib.reduce_on_plateau` and :func:`optax.lbfgs`) and the
    global gradient norm ``||g||_F`` over the whole incoming gradient tree. With
    ``mean`` and ``std`` (sample, ``ddof=1``) of the last ``min(n, window)``
    *accepted* values, the step is a spike when any watched quantity has

    .. math:: x - \mathrm{mean} > \mathrm{threshold} \cdot
       \max(\mathrm{std}, 10^{-6} |\mathrm{mean}|)

    and at least ``warmup`` values have been accepted (one-sided: a drop is never
    a spike), or when any watched quantity (or any gradient entry, through the
    norm) is not finite, warm or not. On a spike the update is zero, the inner
    state is kept exactly as it was, the value is *not* added to the history, and
    ``failures.skipped`` grows by one. Otherwise the inner update and state are
    returned and the values join the history.

    Composes with any optax transformation (chains, ``inject_hyperparams``,
    ``MultiSteps`` inside or outside) and runs under ``jit`` and ``vmap``; extra
    arguments, ``value`` included, are passed on to ``inner``.

    Args:
      inner: The transformation to guard.
      window: Number of accepted values the statistics use, a Python int >= 2
        (static: the history's shape).
      threshold: How many standard deviations above the mean a value may lie,
        > 0 (may be injected).
      warmup: Accepted values needed before outliers are tested, an int >= 2
        (may be traced); until then only non-finite values are skipped.
      watch: Which quantities to test, a tuple from ``('loss', 'grad_norm')``.
        With ``'loss'``, every update must pass ``value=loss``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`~layerwise_optax.SkipStepOnSpikesState`.

    Raises:
      ValueError: At construction, if ``window < 2``, ``threshold <= 0``,
        ``warmup < 2`` or ``watch`` names something else; at trace time if
        ``'loss'`` is watched and no ``value=`` is passed.
      TypeError: At construction for non-numeric values or a ``watch`` that is
        not a tuple or list.

    Examples:
      >>> import jax.numpy as jnp, optax, layerwise_optax as lo
      >>> tx = lo.skip_step_on_spikes(optax.sgd(0.1), window=4, warmup=2, watch=("loss",))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.ones(2)}
      >>> for loss in (1.0, 1.1, 0.9):
      ...     _, state = tx.update(g, state, params, value=loss)
      >>> u, state = tx.update(g, state, params, value=50.0)
      >>> u["w"].tolist(), lo.failure_report(state).skipped
      ([0.0, 0.0], 1)

    References:
      The loss/gradient-norm spike skipping of large-scale training stacks
      (MaxText, levanter); this is the library's own formulation.
    """
    _checks.positive_int("window", window)
    if window < 2:
        raise ValueError(
            f"window must be >= 2 (a standard deviation needs two values), got {window!r}."
        )
    _checks.positive("threshold", threshold)
    _checks.traceable_int("warmup", warmup, minimum=2)
    watch = _check_watch(watch)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipStepOnSpikesState(
            count=jnp.zeros([], jnp.int32),
            accepted=jnp.zeros([], jnp.int32),
            history=jnp.zeros((window, len(watch)), jnp.float32),
            inner_state=inner.init(params),
            failures=_failure.zeros(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        observed = []
        for name in watch:
            if name == "loss":
                if extra_args.get("value") is None:
                    raise ValueError(
                        "skip_step_on_spikes watches 'loss': pass the loss as value=loss to "
                        "update (or leave 'loss' out of watch)."
                    )
                observed.append(jnp.asarray(extra_args["value"], jnp.float32).reshape(()))
            else:
                observed.append(_global_norm(updates))
        x = jnp.stack(observed)
        (thr,) = _checks.hyperparameters(threshold)
        mean, std = window_statistics(state.history, state.accepted)
        scale = jnp.maximum(std, 1e-6 * jnp.abs(mean))
        warm = state.accepted >= jnp.asarray(warmup, jnp.int32)
        outlier = warm & jnp.any(x - mean > thr * scale)
        spike = outlier | ~jnp.all(jnp.isfinite(x))

        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), new_updates)
        inner_state = _failure.keep(~spike, new_inner, state.inner_state)

        row = state.accepted % window
        written = state.history.at[row].set(x)
        history = jnp.where(spike, state.history, written)
        accepted = jnp.where(spike, state.accepted, optax.safe_increment(state.accepted))
        return new_updates, SkipStepOnSpikesState(
            count=jnp.asarray(optax.safe_increment(state.count)),
            accepted=accepted,
            history=history,
            inner_state=inner_state,
            failures=_failure.add(state.failures, skipped=spike),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
