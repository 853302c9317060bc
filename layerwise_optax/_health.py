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
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from layerwise_optax import _checks, _failure, _owner, _registry

# Every library state carries its counters as one ``failures`` field
# (:class:`layerwise_optax._failure.FailureCounts`); the algorithm names come from
# the optimizer registry (:func:`layerwise_optax._registry.algorithm_of`).


def _is_counted(x: Any) -> bool:
    return isinstance(getattr(x, "failures", None), _failure.FailureCounts)


def _counted_states(state: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(path, state)`` for every library state inside an optax state tree.

    A library state that wraps another state (the spike guard's ``inner_state``)
    is listed before the states inside it.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_counted)
    found = []
    for path, s in flat:
        if not _is_counted(s):
            continue
        where = prefix + jax.tree_util.keystr(path)
        found.append((where or "<root>", s))
        for name, child in zip(type(s)._fields, s):
            if name != "failures" and child is not None:
                found += _counted_states(child, f"{where}.{name}")
    return found


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
      layout: Where its per-block state lives: ``'replicated'`` (per leaf, on
        every device), or the owner layout's groups, devices and padding; a
        group with fewer blocks than devices is padded and named here
        (:mod:`layerwise_optax._owner`).
    """

    path: str
    algorithm: str
    steps: int
    skipped: int
    failed: int
    layout: str = "replicated"


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
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"{e.path}: {e.layout}" for e in self.entries if e.layout != "replicated"]
        return "\n".join(lines)


def failure_counts(state: optax.OptState) -> tuple[jax.Array, jax.Array]:
    """Total ``(skipped, failed)`` counts of a state as int32 arrays (traceable).

    Args:
      state: Any optimizer state (works under ``jit``, e.g. to log each step).

    Returns:
      ``(skipped, failed)`` summed over every library transform in the state.
    """
    skipped, failed = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    for _, s in _counted_states(state):
        skipped = skipped + jnp.sum(s.failures.skipped)
        failed = failed + jnp.sum(s.failures.failed)
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
        count = s.count
        entries.append(
            FailureEntry(
                path=path,
                algorithm=_registry.algorithm_of(type(s)),
                steps=int(jnp.max(count)) if count is not None else 0,
                skipped=int(jnp.sum(s.failures.skipped)),
                failed=int(jnp.sum(s.failures.failed)),
                layout=_owner.describe(_owner.layout_of(s)),
            )
        )
    return FailureReport(tuple(entries))


class OptimizerFailureError(FloatingPointError):
    """Raised on the host by :func:`raise_on_failure` when a step skipped or failed.

    Attributes:
      args: The message: the step, each kind of event (skipped gradient, failed
        refresh) with its count, and the tree paths involved: the gradient leaves
        that were invalid, the transform whose refresh failed and its state arrays
        that are not finite.
    """


_POLICY = (
    "(raise_on_failure is on; without it the step would have kept the previous "
    "statistics/preconditioners and counted the event)"
)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _message(
    step: int,
    skipped: int,
    invalid: list[str],
    failures: list[tuple[str, str, int, list[str]]],
    spikes: int = 0,
) -> str:
    """The error text: step, kind of each event, count and paths."""
    parts = []
    if spikes:
        parts.append(
            f"skipped step: {_plural(spikes, 'step')} whose loss or gradient norm was a spike "
            "or not finite (skip_step_on_spikes; the wrapped state was kept)"
        )
    if skipped:
        text = f"skipped gradient: {_plural(skipped, 'leaf')} kept out of every statistic"
        if invalid:
            text += f"; invalid gradient (NaN/Inf or squared norm overflowing float32) at {', '.join(invalid)}"
        if skipped > len(invalid):
            text += f"; {skipped - len(invalid)} more whose new statistics were not finite"
        parts.append(text)
    for where, algorithm, n, arrays in failures:
        text = f"failed refresh: {_plural(n, 'refresh')} of {algorithm} (state {where}) gave a non-finite result, previous kept"
        if arrays:
            text += f"; non-finite state at {', '.join(arrays)}"
        parts.append(text)
    when = f"step {step}" if step >= 0 else "this step"
    return f"layerwise_optax: {when}: " + "; ".join(parts) + f" {_POLICY}."


def _float_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(path), x)
        for path, x in flat
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]


def _invalid_gradient(g: jax.Array) -> jax.Array:
    # The failure policy's validity rule (_failure.guard).
    g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    return ~jnp.isfinite(jnp.sum(jnp.square(g32)))


def raise_on_failure(
    inner: optax.GradientTransformation, *, mode: Literal["callback", "checkify"] = "callback"
) -> optax.GradientTransformationExtraArgs:
    """Wraps a transform so that a skipped or failed event raises on the host.

    For debugging only: by default the library never raises inside ``jit`` (see
    the failure policy above). The wrapper compares the counters before and after
    each update; the inner transform and its state are unchanged, so the wrapper
    can be removed without touching checkpoints.

    The message names the step (the transforms' step count after the update), the
    kind of each event and where it happened:

    * *skipped gradient*: the tree paths of the gradient leaves that were invalid
      (a NaN or Inf entry, or a squared norm that overflows float32);
    * *failed refresh*: the transform (its path in the state and its algorithm),
      how many refreshes failed, and the paths of its state arrays that are not
      finite (typically the statistics that made the refresh fail).

    For example ``layerwise_optax: step 3: skipped gradient: 1 leaf kept out of
    every statistic; invalid gradient (...) at ['w'] (raise_on_failure is on; ...)``.

    Args:
      inner: Any transform whose state holds library states (an alias, a chain).
      mode: ``'callback'``: a :func:`jax.debug.callback` raises
        :class:`OptimizerFailureError` on the host; under ``jit`` it reaches you
        as a :class:`jax.errors.JaxRuntimeError` when the step's results are
        ready, whose message contains this one. ``'checkify'``: one
        :func:`jax.experimental.checkify.check` per gradient leaf and per
        transform, which you functionalize with ``checkify.checkify(update)`` and
        read with ``err.throw()`` (the first failing check: the first invalid
        leaf, else the first transform whose refresh failed).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with the same state.

    Raises:
      ValueError: At construction for an unknown ``mode``.
    """
    _checks.one_of("mode", mode, ("callback", "checkify"))
    inner = optax.with_extra_args_support(inner)
    check = _checkify_checks if mode == "checkify" else _callback_check

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        check(_observe(updates, state, new_state))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


@dataclasses.dataclass(frozen=True)
class _Step:
    """What one update did, as traced values (read by the checks below).

    Attributes:
      step: The transforms' largest step count after the update (-1: none).
      skipped: New skipped events over the whole state.
      grads: ``(path, gradient)`` of every float gradient leaf.
      invalid: Per gradient leaf, whether it breaks the validity rule.
      transforms: ``(state path, algorithm, new failed refreshes, [(array path,
        non-finite)])`` per library state present before and after.
    """

    step: jax.Array
    skipped: jax.Array
    spikes: jax.Array
    grads: list[tuple[str, jax.Array]]
    invalid: list[jax.Array]
    transforms: list[tuple[str, str, jax.Array, list[tuple[str, jax.Array]]]]


def _observe(updates: Any, state: Any, new_state: Any) -> _Step:
    """Compares the counters of ``state`` and ``new_state`` for one update."""
    grads = _float_leaves(updates)
    olds = dict(_counted_states(state))
    counted = _counted_states(new_state)
    steps = [jnp.max(s.count).astype(jnp.int32) for _, s in counted if s.count is not None]
    # Steps the spike guard skipped are reported as such, not as skipped leaves.
    spikes = jnp.zeros([], jnp.int32)
    for where, s in counted:
        if where in olds and _registry.algorithm_of(type(s)) == "spike_guard":
            spikes = spikes + jnp.sum(s.failures.skipped) - jnp.sum(olds[where].failures.skipped)
    transforms = []
    for where, s in counted:
        if where not in olds:
            continue
        n = jnp.sum(s.failures.failed) - jnp.sum(olds[where].failures.failed)
        arrays = [(p, ~jnp.all(jnp.isfinite(x))) for p, x in _float_leaves(s)]
        transforms.append((where, _registry.algorithm_of(type(s)), n.astype(jnp.int32), arrays))
    return _Step(
        step=functools.reduce(jnp.maximum, steps, jnp.int32(-1)),
        skipped=failure_counts(new_state)[0] - failure_counts(state)[0] - spikes,
        spikes=spikes,
        grads=grads,
        invalid=[_invalid_gradient(g) for _, g in grads],
        transforms=transforms,
    )


def _checkify_checks(obs: _Step) -> None:
    """One ``checkify.check`` per gradient leaf and per transform (its arrays, then itself)."""
    step, skipped = obs.step, obs.skipped
    checkify.check(
        obs.spikes == 0,
        "layerwise_optax: step {step}: skipped step: the loss or gradient norm was a spike or "
        f"not finite (skip_step_on_spikes; the wrapped state was kept) {_POLICY}.",
        step=step,
    )
    for (path, _), bad in zip(obs.grads, obs.invalid):
        checkify.check(
            ~bad | (skipped == 0),
            f"layerwise_optax: step {{step}}: skipped gradient: invalid gradient "
            f"(NaN/Inf or squared norm overflowing float32) at {path} {_POLICY}.",
            step=step,
        )
    checkify.check(
        (skipped == 0) | functools.reduce(jnp.logical_or, obs.invalid, jnp.bool_(False)),
        f"layerwise_optax: step {{step}}: skipped gradient: {{n}} leaves whose new "
        f"statistics were not finite {_POLICY}.",
        step=step,
        n=skipped,
    )
    for where, algorithm, n, arrays in obs.transforms:
        for path, bad in arrays:
            checkify.check(
                (n == 0) | ~bad,
                f"layerwise_optax: step {{step}}: failed refresh: {{n}} refreshes of "
                f"{algorithm} (state {where}) gave a non-finite result, previous kept; non-finite "
                f"state at {path} {_POLICY}.",
                step=step,
                n=n,
            )
        checkify.check(
            n == 0,
            f"layerwise_optax: step {{step}}: failed refresh: {{n}} refreshes of "
            f"{algorithm} (state {where}) gave a non-finite result, previous kept {_POLICY}.",
            step=step,
            n=n,
        )


def _callback_check(obs: _Step) -> None:
    """A host callback that raises :class:`OptimizerFailureError` on a new event."""
    grad_paths = [p for p, _ in obs.grads]
    layout = [
        (where, algorithm, [p for p, _ in arrays]) for where, algorithm, _, arrays in obs.transforms
    ]

    def check(step, skipped, spikes, invalid, fails, bad_arrays):
        failures = []
        for (where, algorithm, paths), n, bads in zip(layout, fails, bad_arrays):
            if int(n):
                failures.append((where, algorithm, int(n), [p for p, b in zip(paths, bads) if b]))
        if int(skipped) or int(spikes) or failures:
            bad_paths = [p for p, b in zip(grad_paths, invalid) if b] if int(skipped) else []
            raise OptimizerFailureError(
                _message(int(step), int(skipped), bad_paths, failures, int(spikes))
            )

    jax.debug.callback(
        check,
        obs.step,
        obs.skipped,
        obs.spikes,
        obs.invalid,
        [n for _, _, n, _ in obs.transforms],
        [[b for _, b in arrays] for _, _, _, arrays in obs.transforms],
    )
