"""The failure policy's read-out: counting skipped and failed events in any state.

Every transform in the library follows one policy (see the README's
"Failure policy"):

* a gradient leaf that is not valid (a NaN or Inf entry, or a squared norm that
  overflows float32) enters no statistic or moment; its update is zero, and the
  event is counted as *skipped*;
* a refresh (inverse root, inverse, eigenbasis, PSGD fit, Newton-Schulz
  orthogonalization, dual map) whose result is not finite keeps the previous good
  result where the transform stores one (zero update for that leaf where it does
  not), and the event is counted as *failed*.

Neither ever raises inside ``jit``. :func:`failure_report` reads the counters out
of a state on the host; :func:`raise_on_failure` wraps a transform so that a new
event raises on the host instead, for debugging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from layerwise_optax import _checks, _grafting, _kfac, _muon, _psgd, _shampoo, _soap, _steepest

# State type -> (algorithm name, skipped-counter field, failed-counter field or None).
# The field names are each algorithm's own (they say what failed: roots, inverses,
# bases); the report gives them one vocabulary.
COUNTERS: dict[type, tuple[str, str, str | None]] = {
    _shampoo.ScaleByShampooState: ("shampoo", "skipped_stats", "failed_roots"),
    _soap.ScaleBySoapState: ("soap", "skipped_stats", "failed_refreshes"),
    _kfac.ScaleByKfacState: ("kfac", "skipped_stats", "failed_inverses"),
    _muon.ScaleByMuonState: ("muon", "skipped", "failed"),
    _steepest.ScaleBySteepestDescentState: ("steepest_descent", "skipped", "failed"),
    _psgd.ScaleByPsgdKronState: ("psgd_kron", "skipped", "failed"),
    _grafting.ScaleByGuardedAdamState: ("adam", "skipped", None),
}


def _is_counted(x: Any) -> bool:
    return type(x) in COUNTERS


def _counted_states(state: Any) -> list[tuple[str, Any]]:
    """``(path, state)`` for every library state inside an optax state tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_counted)
    return [(jax.tree_util.keystr(path) or "<root>", s) for path, s in flat if _is_counted(s)]


@dataclasses.dataclass(frozen=True)
class FailureEntry:
    """Counters of one library transform inside a state.

    Attributes:
      path: Where the transform's state sits in the whole state (``keystr``).
      algorithm: Which transform (``'shampoo'``, ``'adam'`` for Muon's diagonal
        part, ...).
      steps: Its step count.
      skipped: (leaf, step) pairs whose gradient was invalid and was kept out.
      failed: (block or leaf, refresh) pairs whose refreshed result was not finite
        (0 for transforms that refresh nothing).
    """

    path: str
    algorithm: str
    steps: int
    skipped: int
    failed: int


@dataclasses.dataclass(frozen=True)
class FailureReport:
    """What :func:`failure_report` returns: one entry per library transform.

    Attributes:
      entries: One :class:`FailureEntry` per library state found, in tree order.
    """

    entries: tuple[FailureEntry, ...]

    @property
    def skipped(self) -> int:
        """Total skipped (leaf, step) pairs."""
        return sum(e.skipped for e in self.entries)

    @property
    def failed(self) -> int:
        """Total failed refreshes."""
        return sum(e.failed for e in self.entries)

    @property
    def ok(self) -> bool:
        """Whether nothing was skipped and nothing failed."""
        return self.skipped == 0 and self.failed == 0

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{path: {algorithm, steps, skipped, failed}}``, e.g. for a metrics logger."""
        return {e.path: dataclasses.asdict(e) for e in self.entries}

    def __str__(self) -> str:
        if not self.entries:
            return "no layerwise_optax state found"
        rows = [("path", "algorithm", "steps", "skipped", "failed")]
        rows += [
            (e.path, e.algorithm, str(e.steps), str(e.skipped), str(e.failed)) for e in self.entries
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def failure_counts(state: optax.OptState) -> tuple[jax.Array, jax.Array]:
    """Total ``(skipped, failed)`` counts of a state as int32 arrays (traceable).

    Args:
      state: Any optimizer state (works under ``jit``, e.g. to log each step).

    Returns:
      ``(skipped, failed)`` summed over every library transform in the state.
    """
    skipped, failed = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    for _, s in _counted_states(state):
        _, skip_field, fail_field = COUNTERS[type(s)]
        skipped = skipped + jnp.sum(getattr(s, skip_field))
        if fail_field is not None:
            failed = failed + jnp.sum(getattr(s, fail_field))
    return skipped, failed


def failure_report(state: optax.OptState) -> FailureReport:
    """Reads the failure counters of every library transform in a state.

    Works on any optax state tree: an alias's, a ``chain``/``partition``/
    ``masked``/``inject_hyperparams``/``MultiSteps`` around one, or several at
    once. Counters of a ``vmap``-ed state are summed over the batch.

    Example::

      >>> import jax.numpy as jnp, layerwise_optax as lo
      >>> tx = lo.shampoo(1e-2)
      >>> params = {"w": jnp.ones((3, 2))}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.full((3, 2), jnp.nan)}, state, params)
      >>> report = lo.failure_report(state)
      >>> report.skipped, report.failed
      (1, 0)

    Args:
      state: An optimizer state (concrete arrays, not tracers).

    Returns:
      A :class:`FailureReport`; ``str(report)`` is a small table.
    """
    entries = []
    for path, s in _counted_states(state):
        algorithm, skip_field, fail_field = COUNTERS[type(s)]
        count = s.count
        entries.append(
            FailureEntry(
                path=path,
                algorithm=algorithm,
                steps=int(jnp.max(count)) if count is not None else 0,
                skipped=int(jnp.sum(getattr(s, skip_field))),
                failed=0 if fail_field is None else int(jnp.sum(getattr(s, fail_field))),
            )
        )
    return FailureReport(tuple(entries))


class OptimizerFailureError(FloatingPointError):
    """Raised on the host by :func:`raise_on_failure` when a step skipped or failed.

    Attributes:
      args: The message: how many gradient leaves the step skipped and how many
        refreshes failed.
    """


def _message(skipped: Any, failed: Any) -> str:
    return (
        f"layerwise_optax: this step skipped {int(skipped)} invalid gradient leaves and "
        f"{int(failed)} refreshes failed (raise_on_failure is on; without it the step "
        "would have kept the previous statistics/preconditioners and counted the event)."
    )


def raise_on_failure(
    inner: optax.GradientTransformation, *, mode: Literal["callback", "checkify"] = "callback"
) -> optax.GradientTransformationExtraArgs:
    """Wraps a transform so that a skipped or failed event raises on the host.

    For debugging only: by default the library never raises inside ``jit`` (see
    the failure policy above). The wrapper compares the total counters before
    and after each update; the inner transform and its state are unchanged, so
    the wrapper can be removed without touching checkpoints.

    Args:
      inner: Any transform whose state holds library states (an alias, a chain).
      mode: ``'callback'``: a :func:`jax.debug.callback` raises
        :class:`OptimizerFailureError` on the host (under ``jit`` it reaches you as
        a runtime error when the step's results are ready, with this message);
        ``'checkify'``: a :func:`jax.experimental.checkify.check` that you
        functionalize with ``checkify.checkify(update)`` and read with
        ``err.throw()``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with the same state.
    """
    _checks.one_of("mode", mode, ("callback", "checkify"))
    inner = optax.with_extra_args_support(inner)

    def check(skipped: jax.Array, failed: jax.Array) -> None:
        if int(skipped) or int(failed):
            raise OptimizerFailureError(_message(skipped, failed))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        before, after = failure_counts(state), failure_counts(new_state)
        skipped, failed = after[0] - before[0], after[1] - before[1]
        if mode == "checkify":
            checkify.check(
                (skipped == 0) & (failed == 0),
                "layerwise_optax: this step skipped {s} invalid gradient leaves and {f} "
                "refreshes failed (raise_on_failure is on).",
                s=skipped,
                f=failed,
            )
        else:
            jax.debug.callback(check, skipped, failed)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
